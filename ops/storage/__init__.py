"""One interface over object storage: Cloudflare R2 / S3 (boto3) and a local folder.

Every key a caller passes is relative to the configured prefix (`prod/` for
example); every key handed back is relative to it as well. Backends:

- `ops.storage.s3.S3Storage`       provider "r2" or "s3" (any S3-compatible endpoint)
- `ops.storage.local.LocalStorage` provider "local": `<path>/<bucket>/<prefix><key>`

Both write objects atomically (an object exists under its key only once it is
complete), stream large objects with bounded memory, and raise errors from
ops/errors.py that name the provider, endpoint, bucket and key, never a secret.

Layout: base.py holds the interface, registry.py maps provider names to backends
and loads a backend's module on first use; the backends register themselves.
"""

from ops.storage.base import (
    DEFAULT_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    BucketNotFound,
    EarlyRead,
    EtagBuilder,
    IncompleteUpload,
    ObjectInfo,
    ObjectLock,
    ObjectNotFound,
    PreconditionFailed,
    Storage,
    StorageConfig,
    StoredObject,
    check_part_size,
    read_full,
    validate_key,
    validate_prefix,
)
from ops.storage.registry import PROVIDERS, backend_for, open_storage, register_backend

__all__ = [
    "DEFAULT_PART_SIZE",
    "MAX_PARTS",
    "MIN_PART_SIZE",
    "PROVIDERS",
    "BucketNotFound",
    "EarlyRead",
    "EtagBuilder",
    "IncompleteUpload",
    "ObjectInfo",
    "ObjectLock",
    "ObjectNotFound",
    "PreconditionFailed",
    "Storage",
    "StorageConfig",
    "StoredObject",
    "backend_for",
    "check_part_size",
    "open_storage",
    "read_full",
    "register_backend",
    "validate_key",
    "validate_prefix",
]
