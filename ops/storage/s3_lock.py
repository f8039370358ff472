"""S3 Object Lock for S3Storage: the retention headers a locked write sends, whether the bucket takes
them, and a delete of one version for good (what a leaked key would try), for preflight's probe.

R2 has no per-object retention: its bucket lock rules are set through Cloudflare's API (ops/r2_lock.py).
"""

from __future__ import annotations

import base64
import hashlib
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from ops import aws
from ops.errors import UsageError
from ops.storage.base import ObjectLock, StorageConfig

if TYPE_CHECKING:
    from botocore.client import BaseClient

LOCK_REFUSED = {"AccessDenied", "InvalidRequest", "403"}  # what S3 and moto answer a delete the lock forbids


def content_md5(data: bytes | bytearray) -> str:
    """S3 wants Content-MD5 (or a checksum) on every write that carries a retention."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class ObjectLocks:
    """object_lock_enabled / delete_locked_version and the lock arguments of writes, for S3Storage."""

    config: StorageConfig
    client: BaseClient

    if TYPE_CHECKING:  # S3Storage's
        def full_key(self, key: str) -> str: ...
        def describe(self) -> str: ...
        def _errors(self, action: str) -> AbstractContextManager[None]: ...
        @staticmethod
        def _code(error: Exception) -> str: ...

    def lock_arguments(self, lock: ObjectLock | None) -> dict[str, Any]:
        """PutObject / CreateMultipartUpload arguments for `lock` ({} without one)."""
        if lock is None:
            return {}
        if self.config.provider != "s3":
            raise UsageError(f"{self.describe()}: {self.config.provider} has no per-object retention",
                             hint="on R2 backups.lock_days sets a bucket lock rule instead")
        return {"ObjectLockMode": lock.mode, "ObjectLockRetainUntilDate": lock.retain_until}

    def retain(self, full_key: str, version_id: str | None, lock: ObjectLock) -> None:
        """PutObjectRetention: `lock` on one version of an object already stored."""
        version = {"VersionId": version_id} if version_id else {}
        with self._errors(f"locking {full_key} until {lock.retain_until:%Y-%m-%dT%H:%M:%SZ}"):
            self.client.put_object_retention(Bucket=self.config.bucket, Key=full_key, **version,
                                             Retention={"Mode": lock.mode, "RetainUntilDate": lock.retain_until})

    def object_lock_enabled(self) -> bool:
        with self._errors("reading the object lock configuration"):
            try:
                response = self.client.get_object_lock_configuration(Bucket=self.config.bucket)
            except aws.ClientError as error:
                if self._code(error) in ("ObjectLockConfigurationNotFoundError", "404", "NotImplemented"):
                    return False
                raise
        return (response.get("ObjectLockConfiguration") or {}).get("ObjectLockEnabled") == "Enabled"

    def delete_locked_version(self, key: str, *, bypass_governance: bool) -> bool:
        full_key = self.full_key(key)
        with self._errors(f"deleting a version of {full_key}"):
            version = self.client.head_object(Bucket=self.config.bucket, Key=full_key)["VersionId"]
            arguments: dict[str, Any] = {"BypassGovernanceRetention": True} if bypass_governance else {}
            try:
                self.client.delete_object(Bucket=self.config.bucket, Key=full_key, VersionId=version, **arguments)
            except aws.ClientError as error:
                if self._code(error) in LOCK_REFUSED:
                    return False
                raise
        return True
