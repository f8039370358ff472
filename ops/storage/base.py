"""The storage interface: configuration, object records, errors, the `Storage` base class
and the helpers its backends share. Backends live beside it (ops/storage/s3.py,
ops/storage/local.py) and are found through ops/storage/registry.py; this module
imports none of them.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import field
from datetime import datetime
from typing import Any, BinaryIO
from urllib.parse import quote

from ops.errors import CheckFailed, StepFailed, UsageError
from ops.lazy_dataclasses import dataclass
from ops.secrets import Secret

DEFAULT_PART_SIZE = 16 * 1024 * 1024
# S3 (and moto) refuse parts under 5 MiB except the last one.
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000


@dataclass(frozen=True)
class StorageConfig:
    provider: str  # "r2" | "s3" | "local"
    bucket: str
    endpoint: str | None = None
    region: str | None = None  # r2 -> "auto" when not given
    access_key_id: Secret | str | None = None
    secret_access_key: Secret | None = None
    path: str | None = None  # local provider: the folder that holds buckets (<path>/<bucket>/<key>)
    prefix: str = ""  # all keys are relative to this prefix (e.g. "prod/")
    public_base: str | None = None

    def __post_init__(self) -> None:
        # A plain string secret would print itself; wrap it so it never does.
        if self.secret_access_key is not None and not isinstance(self.secret_access_key, Secret):
            object.__setattr__(self, "secret_access_key", Secret(self.secret_access_key))


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the prefix
    size: int
    etag: str | None
    last_modified: datetime  # timezone-aware UTC
    metadata: dict[str, str] = field(default_factory=dict)  # head() fills it; list() leaves it empty
    content_type: str | None = None  # head() only
    retain_until: datetime | None = None  # head() only: the object lock's retention, when it has one


@dataclass(frozen=True)
class ObjectLock:
    """The retention a write asks for (S3 Object Lock): this version of the object cannot be deleted or
    overwritten until `retain_until`; GOVERNANCE yields to keys allowed s3:BypassGovernanceRetention,
    COMPLIANCE to nobody."""

    mode: str  # "GOVERNANCE" | "COMPLIANCE"
    retain_until: datetime  # timezone-aware UTC


@dataclass(frozen=True)
class IncompleteUpload:
    key: str  # relative to the prefix
    upload_id: str
    initiated: datetime  # timezone-aware UTC


@dataclass(frozen=True)
class StoredObject:
    """A small object read whole, with what a conditional write needs: its ETag, and the server's clock."""

    key: str  # relative to the prefix
    data: bytes
    etag: str
    last_modified: datetime  # timezone-aware UTC, the server's
    server_time: datetime  # the server's Date when it answered (our clock when it gave none)


class BucketNotFound(CheckFailed):
    """The configured bucket does not exist (or is not visible with these keys)."""


class ObjectNotFound(StepFailed):
    """The object asked for does not exist."""


class PreconditionFailed(StepFailed):
    """A conditional write found the object other than expected: there already, gone, or changed."""


def validate_key(key: str) -> str:
    """`key` unchanged when it is safe as an object key; UsageError otherwise.

    Refuses what could escape a folder or means different things on different
    backends: empty keys, a leading "/", "." or ".." segments, NUL characters.
    """
    if not key:
        raise UsageError("empty object key", hint="pass the key of an object, e.g. backups/ID/manifest.json")
    if key.startswith("/") or "\x00" in key:
        raise UsageError(f"object key {key!r} refused: keys are relative and contain no NUL",
                         hint="drop the leading '/'")
    if any(segment in (".", "..") for segment in key.split("/")):
        raise UsageError(f"object key {key!r} refused: '.' and '..' segments are not allowed",
                         hint="use a plain relative key such as backups/ID/dump.pgc.zst")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty is fine, otherwise the same rules as a key."""
    return validate_key(prefix) if prefix else prefix


def read_full(source: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes from `source`; fewer only at end of stream.

    Pipes return short reads; R2 needs every part but the last the same size, so
    a part is filled completely before it is sent.
    """
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = source.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class EtagBuilder:
    """The ETag S3 gives an object: md5 of the content, or for a multipart upload
    md5 of the parts' binary md5s followed by "-<part count>"."""

    def __init__(self) -> None:
        self._part_digests: list[bytes] = []

    def add_part(self, data: bytes) -> None:
        self._part_digests.append(hashlib.md5(data, usedforsecurity=False).digest())

    def etag(self) -> str:
        if len(self._part_digests) <= 1:
            digest = self._part_digests[0] if self._part_digests else hashlib.md5(b"").digest()
            return digest.hex()
        combined = hashlib.md5(b"".join(self._part_digests), usedforsecurity=False).hexdigest()
        return f"{combined}-{len(self._part_digests)}"


def check_part_size(part_size: int) -> None:
    if part_size < MIN_PART_SIZE:
        raise UsageError(f"part size {part_size} is below the 5 MiB minimum of S3 multipart uploads",
                         hint="use part_size >= 5 MiB (16 MiB is the default)")


class Storage(ABC):
    """A bucket (and a prefix inside it) on some provider."""

    config: StorageConfig

    def __init__(self, config: StorageConfig):
        self.config = config

    # -- naming ---------------------------------------------------------
    @abstractmethod
    def describe(self) -> str:
        """One line naming provider, bucket, prefix and location; no secrets."""

    def full_key(self, key: str) -> str:
        """The key inside the bucket: the configured prefix + `key`, validated."""
        return self.config.prefix + validate_key(key)

    def relative_key(self, full_key: str) -> str:
        return full_key[len(self.config.prefix):]

    def public_url(self, key: str) -> str | None:
        """The URL the public (CDN) serves `key` at, when a public_base is set."""
        if not self.config.public_base:
            return None
        return f"{self.config.public_base.rstrip('/')}/{quote(self.full_key(key))}"

    # -- buckets --------------------------------------------------------
    @abstractmethod
    def bucket_exists(self) -> bool: ...

    @abstractmethod
    def create_bucket(self) -> None: ...

    # -- objects --------------------------------------------------------
    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """The object's info with metadata, or None when there is no such object."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under `prefix`, all pages, in lexicographic key order."""

    @abstractmethod
    def list_prefixes(self, prefix: str = "", delimiter: str = "/") -> list[str]:
        """The "directories" directly under `prefix` (each ends with the delimiter)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None,
                  content_type: str | None = None, lock: ObjectLock | None = None) -> ObjectInfo: ...

    @abstractmethod
    def open_read(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A streaming reader (`.read(n)`); ObjectNotFound when the key is missing."""

    def get_bytes(self, key: str) -> bytes:
        """The whole object in memory: for small objects such as manifests."""
        with self.open_read(key) as reader:
            return reader.read()

    @abstractmethod
    def upload_stream(self, key: str, source: BinaryIO, *, part_size: int = DEFAULT_PART_SIZE,
                      metadata: dict[str, str] | None = None,
                      on_progress: Callable[[int], None] | None = None,
                      content_type: str | None = None, lock: ObjectLock | None = None) -> ObjectInfo:
        """Upload `source` read `part_size` bytes at a time; memory stays around
        one or two parts. The object exists only once complete: on any failure,
        interrupts included, the partial upload is removed before re-raising.
        `on_progress` gets the total number of bytes stored so far; `lock` is kept with the object."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    @abstractmethod
    def delete_many(self, keys: Iterable[str]) -> None: ...

    @abstractmethod
    def list_incomplete_uploads(self, prefix: str = "") -> list[IncompleteUpload]: ...

    @abstractmethod
    def abort_incomplete_upload(self, upload: IncompleteUpload) -> None:
        """Drop a leftover partial upload; one already gone is not an error."""

    # -- conditional writes (leases) ----------------------------------------
    @property
    def conditional_writes(self) -> bool:
        """Whether put_if_absent / put_if_match / delete_if_match work here (S3, R2; not a folder)."""
        return False

    def get_with_etag(self, key: str) -> StoredObject | None:
        """The whole (small) object with its ETag and the server's time, or None when there is none."""
        raise UsageError(f"{self.describe()}: no conditional writes here", hint="use an S3 or R2 bucket")

    def put_if_absent(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        """Create `key` only if no object has it (If-None-Match: *): its ETag; PreconditionFailed if there."""
        raise UsageError(f"{self.describe()}: no conditional writes here", hint="use an S3 or R2 bucket")

    def put_if_match(self, key: str, data: bytes, etag: str, *, content_type: str | None = None) -> str:
        """Replace `key` only if its ETag is still `etag` (If-Match): the new ETag; PreconditionFailed if not."""
        raise UsageError(f"{self.describe()}: no conditional writes here", hint="use an S3 or R2 bucket")

    def delete_if_match(self, key: str, etag: str) -> None:
        """Delete `key` only if its ETag is still `etag`; PreconditionFailed if it changed or is gone."""
        raise UsageError(f"{self.describe()}: no conditional writes here", hint="use an S3 or R2 bucket")

    # -- object lock ----------------------------------------------------------
    def object_lock_enabled(self) -> bool:
        """Whether the bucket takes per-object retention (S3 Object Lock); a folder never does."""
        return False

    def delete_locked_version(self, key: str, *, bypass_governance: bool) -> bool:
        """Try to delete the current version of `key` for good (not a delete marker): True when the
        storage did, False when its object lock refused."""
        raise UsageError(f"{self.describe()}: this provider has no object lock", hint="use an S3 bucket")

    def same_account(self, other: Storage) -> bool:
        """Whether `server_side_copy` from `other` into this storage can work."""
        return False

    def server_side_copy(self, source: Storage, info: ObjectInfo, dest_key: str, *,
                         metadata: dict[str, str] | None = None, lock: ObjectLock | None = None) -> bool:
        """Copy `info` of `source` without it passing through this process (see S3Storage)."""
        raise UsageError(f"{self.describe()}: no server-side copy here", hint="use copy_object")

    def multipart_copy(self, source: Storage, info: ObjectInfo, dest_key: str, *,
                       part_size: int = DEFAULT_PART_SIZE, lock: ObjectLock | None = None) -> bool:
        """`server_side_copy` for objects of any size, part by part (see S3Storage)."""
        raise UsageError(f"{self.describe()}: no server-side copy here", hint="use copy_object")

    def lifecycle_rules(self) -> list[dict[str, Any]]:
        """The bucket's lifecycle rules, in the S3 API's shape."""
        raise UsageError(f"{self.describe()}: this provider has no lifecycle rules")

    def set_lifecycle_rules(self, rules: list[dict[str, Any]]) -> None:
        """Replace the bucket's whole lifecycle configuration with `rules`."""
        raise UsageError(f"{self.describe()}: this provider has no lifecycle rules")

    def copy_object(self, source: Storage, key: str, dest_key: str) -> ObjectInfo:
        """Copy `key` of `source` to `dest_key` here, streamed through this process.
        Backends override this with a server-side copy where they can."""
        info = source.head(key)
        if info is None:
            raise ObjectNotFound(f"{source.describe()}: no object {key!r} to copy",
                                 hint="list the source bucket to find the right key")
        with source.open_read(key) as reader:
            return self.upload_stream(dest_key, reader, metadata=info.metadata,
                                      content_type=info.content_type)


class EarlyRead(AbstractContextManager[BinaryIO]):
    """`storage.open_read(key)` started now in a thread, so waiting for the server's first
    byte overlaps the caller's other set-up. Enter it to get the reader (or the error)."""

    def __init__(self, storage: Storage, key: str):
        self._stack = ExitStack()
        self._reader: BinaryIO | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._open, args=(storage, key), name="opsbook-open", daemon=True)
        self._thread.start()

    def _open(self, storage: Storage, key: str) -> None:
        try:
            self._reader = self._stack.enter_context(storage.open_read(key))
        except BaseException as error:  # handed to the caller's thread in __enter__
            self._error = error

    def __enter__(self) -> BinaryIO:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._reader is not None
        return self._reader

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Also for an EarlyRead never entered: closes the response the thread opened."""
        self._thread.join()
        self._stack.close()
