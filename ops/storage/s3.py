"""S3-compatible backend (Cloudflare R2, AWS S3, MinIO, moto) on boto3.

boto3/botocore are imported inside functions: importing this module stays cheap.
Every botocore failure is turned into an error from ops/errors.py whose message
names provider, endpoint, bucket and key, passed through redact().
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO

from ops import aws
from ops.errors import ConnectionFailed, OpsError, StepFailed
from ops.secrets import redact, reveal
from ops.storage.base import (
    BucketNotFound,
    IncompleteUpload,
    ObjectInfo,
    ObjectLock,
    ObjectNotFound,
    Storage,
    validate_prefix,
)
from ops.storage.registry import register_backend
from ops.storage.s3_conditional import ConditionalWrites
from ops.storage.s3_conditional import bare_etag as _etag
from ops.storage.s3_conditional import server_time as _server_time
from ops.storage.s3_conditional import utc as _utc
from ops.storage.s3_lock import ObjectLocks, content_md5
from ops.storage.s3_multipart import MultipartUploads

if TYPE_CHECKING:
    from botocore.client import BaseClient

DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
MAX_COPY_OBJECT_SIZE = 5 * 1024**3  # CopyObject's limit; larger objects are streamed
AUTH_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
               "ExpiredToken", "Unauthorized", "Forbidden", "403", "401", "AllAccessDisabled"}
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
CLIENT_SETTINGS: dict[str, Any] = {
    # Recent boto3 adds CRC checksums R2 rejects; only send what the API requires.
    "request_checksum_calculation": "when_required",
    "response_checksum_validation": "when_required",
    "retries": {"max_attempts": 5, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 60,
}


def _server_said(error: Any) -> str:
    """What the server answered, for the operator: `InvalidAccessKeyId: The AWS Access Key Id you provided
    does not exist in our records. (HTTP 403 on ListObjectsV2)`; a HEAD has no body, only its status."""
    response = getattr(error, "response", None) or {}
    details = response.get("Error", {})
    code, message = str(details.get("Code", "")), str(details.get("Message", ""))
    words = [word for word in (code if not code.isdigit() else "", message) if word]
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or (code if code.isdigit() else "?")
    operation = getattr(error, "operation_name", None) or "the request"
    return redact(f"{': '.join(words) or 'no error text'} (HTTP {status} on {operation})")


@register_backend("r2", "s3")
class S3Storage(MultipartUploads, ConditionalWrites, ObjectLocks, Storage):
    """A bucket on R2 or any S3-compatible service."""

    # -- connection -------------------------------------------------------
    @property
    def region(self) -> str:
        if self.config.region:
            return self.config.region
        return "auto" if self.config.provider == "r2" else "us-east-1"

    def describe(self) -> str:
        where = self.config.endpoint or f"AWS {self.region}"
        return redact(f"{self.config.provider} bucket {self.config.bucket}/{self.config.prefix} at {where}")

    @property
    def client(self) -> BaseClient:
        endpoint = self.config.endpoint
        settings = {**CLIENT_SETTINGS, "s3": {"addressing_style": "path"}} if endpoint else CLIENT_SETTINGS
        return aws.client("s3", endpoint=endpoint, region=self.region, access_key_id=reveal(self.config.access_key_id),
                          secret_access_key=reveal(self.config.secret_access_key), settings=settings)

    def same_account(self, other: Storage) -> bool:
        """True when a server-side copy from `other` can work: same service and keys."""
        if not isinstance(other, S3Storage):
            return False
        mine, theirs = self.config, other.config
        return (mine.provider, mine.endpoint, self.region, reveal(mine.access_key_id),
                reveal(mine.secret_access_key)) == (
            theirs.provider, theirs.endpoint, other.region, reveal(theirs.access_key_id),
            reveal(theirs.secret_access_key))

    # -- error mapping ----------------------------------------------------
    def _translate(self, error: Exception, action: str) -> OpsError:
        """Our error for a botocore failure while doing `action` (e.g. "reading KEY")."""
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        subject = f"{self.describe()}: {action} failed"
        detail = redact(error)
        if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            return ConnectionFailed(f"{subject}: no usable access keys",
                                    hint="set storage.access_key_id and storage.secret_access_key")
        if isinstance(error, (ConnectionError, HTTPClientError)):
            return ConnectionFailed(
                f"{subject}: cannot reach {self.config.endpoint or 'S3'} ({detail})",
                hint="check storage.endpoint, the network and that the service is up")
        if not isinstance(error, ClientError):
            return StepFailed(f"{subject}: {detail}", hint="see the storage provider's status and retry")
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return BucketNotFound(f"{subject}: bucket {self.config.bucket!r} does not exist ({_server_said(error)})",
                                  hint="create it (inv provision) or fix storage.bucket")
        if code in AUTH_ERRORS:
            return ConnectionFailed(
                f"{subject}: the storage refused our keys ({_server_said(error)})",
                hint="check storage.access_key_id / secret_access_key: revoked, mistyped, "
                     "or without permission on this bucket (inv keys.status)")
        if code == "EntityTooSmall":
            return StepFailed(f"{subject}: a part is below the 5 MiB minimum ({detail})",
                              hint="use a part size of at least 5 MiB")
        return StepFailed(f"{subject}: {detail}", hint="retry; if it persists check the provider's status")

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as error:
            raise self._translate(error, action) from None

    @staticmethod
    def _code(error: Exception) -> str:
        response = getattr(error, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    # -- buckets ----------------------------------------------------------
    def bucket_exists(self) -> bool:
        from botocore.exceptions import ClientError

        with self._errors("checking the bucket"):
            try:
                self.client.head_bucket(Bucket=self.config.bucket)
            except ClientError as error:
                if self._code(error) in ("404", "NoSuchBucket", "NotFound"):
                    return False
                raise
        return True

    def create_bucket(self) -> None:
        arguments: dict[str, Any] = {"Bucket": self.config.bucket}
        # us-east-1 and R2 take no location constraint; other AWS regions require one.
        if self.config.provider == "s3" and self.region != "us-east-1":
            arguments["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        from botocore.exceptions import ClientError

        with self._errors("creating the bucket"):
            try:
                self.client.create_bucket(**arguments)
            except ClientError as error:
                if self._code(error) != "BucketAlreadyOwnedByYou":  # already there: done, as locally
                    raise

    def _require_bucket(self, action: str) -> None:
        if not self.bucket_exists():
            raise BucketNotFound(f"{self.describe()}: {action} failed: bucket {self.config.bucket!r} "
                                 "does not exist", hint="create it (inv provision) or fix storage.bucket")

    # -- reading ----------------------------------------------------------
    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        full_key = self.full_key(key)
        with self._errors(f"reading the info of {full_key}"):
            try:
                response = self.client.head_object(Bucket=self.config.bucket, Key=full_key)
            except ClientError as error:
                if self._code(error) not in NOT_FOUND:
                    raise
                # HEAD has no body: a missing bucket also answers a bare 404.
                self._require_bucket(f"reading the info of {full_key}")
                return None
        return ObjectInfo(key=key, size=response["ContentLength"], etag=_etag(response.get("ETag")),
                          last_modified=_utc(response["LastModified"]),
                          metadata=dict(response.get("Metadata") or {}),
                          content_type=response.get("ContentType"),
                          retain_until=_utc(response["ObjectLockRetainUntilDate"])
                          if response.get("ObjectLockRetainUntilDate") else None)

    def _pages(self, operation: str, action: str, **arguments: Any) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator(operation)
        with self._errors(action):
            yield from paginator.paginate(Bucket=self.config.bucket, **arguments)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = self.config.prefix + validate_prefix(prefix)
        for page in self._pages("list_objects_v2", f"listing {full_prefix or '/'}", Prefix=full_prefix):
            for item in page.get("Contents", []):
                yield ObjectInfo(key=self.relative_key(item["Key"]), size=item["Size"],
                                 etag=_etag(item.get("ETag")), last_modified=_utc(item["LastModified"]))

    def list_prefixes(self, prefix: str = "", delimiter: str = "/") -> list[str]:
        full_prefix = self.config.prefix + validate_prefix(prefix)
        found: list[str] = []
        for page in self._pages("list_objects_v2", f"listing {full_prefix or '/'}",
                                Prefix=full_prefix, Delimiter=delimiter):
            found += [self.relative_key(item["Prefix"]) for item in page.get("CommonPrefixes", [])]
        return sorted(found)

    @contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        full_key = self.full_key(key)
        action = f"reading {full_key}"
        with self._errors(action):
            try:
                response = self.client.get_object(Bucket=self.config.bucket, Key=full_key)
            except Exception as error:
                if self._code(error) in NOT_FOUND:
                    raise ObjectNotFound(f"{self.describe()}: no object {full_key!r}",
                                         hint="list the bucket to find the right key") from None
                raise
        reader = io.BufferedReader(_TranslatingReader(response["Body"], self, action), buffer_size=1024 * 1024)
        with reader:  # closing it closes the HTTP response
            yield reader

    # -- writing ----------------------------------------------------------
    def _put_arguments(self, metadata: dict[str, str] | None, content_type: str | None,
                       lock: ObjectLock | None = None) -> dict[str, Any]:
        arguments: dict[str, Any] = self.lock_arguments(lock)
        if metadata:
            arguments["Metadata"] = dict(metadata)
        if content_type:
            arguments["ContentType"] = content_type
        return arguments

    def _stored(self, key: str) -> ObjectInfo:
        info = self.head(key)
        if info is None:
            raise StepFailed(f"{self.describe()}: {self.full_key(key)} is missing right after it was written",
                             hint="the bucket may be replicated or eventually consistent; retry")
        return info

    def put_bytes(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None,
                  content_type: str | None = None, lock: ObjectLock | None = None) -> ObjectInfo:
        """One PUT; the info comes from its response (no extra round trip)."""
        full_key = self.full_key(key)
        arguments = self._put_arguments(metadata, content_type, lock)
        if lock is not None:
            arguments["ContentMD5"] = content_md5(data)
        with self._errors(f"writing {full_key}"):
            response = self.client.put_object(Bucket=self.config.bucket, Key=full_key, Body=data, **arguments)
        return ObjectInfo(key=key, size=len(data), etag=_etag(response.get("ETag")),
                          last_modified=_server_time(response), metadata=dict(metadata or {}),
                          content_type=content_type)

    def copy_object(self, source: Storage, key: str, dest_key: str) -> ObjectInfo:
        if not self.same_account(source):
            return super().copy_object(source, key, dest_key)
        info = source.head(key)
        if info is None:
            raise ObjectNotFound(f"{source.describe()}: no object {key!r} to copy",
                                 hint="list the source bucket to find the right key")
        if info.size > MAX_COPY_OBJECT_SIZE:
            return super().copy_object(source, key, dest_key)
        full_key = self.full_key(dest_key)
        copy_source = {"Bucket": source.config.bucket, "Key": source.full_key(key)}
        with self._errors(f"copying {copy_source['Key']} to {full_key}"):
            response = self.client.copy_object(Bucket=self.config.bucket, Key=full_key,
                                               CopySource=copy_source)
        result = response.get("CopyObjectResult", {})
        return ObjectInfo(key=dest_key, size=info.size, etag=_etag(result.get("ETag")) or info.etag,
                          last_modified=_utc(result.get("LastModified") or datetime.now(UTC)),
                          metadata=info.metadata, content_type=info.content_type)

    def server_side_copy(self, source: Storage, info: ObjectInfo, dest_key: str, *,
                         metadata: dict[str, str] | None = None, lock: ObjectLock | None = None) -> bool:
        """CopyObject of `info` from `source` (same account, up to MAX_COPY_OBJECT_SIZE): pinned to
        its ETag and keeping its metadata, or with `metadata` replacing it; `lock`: the copy's
        retention (S3 copies none from the source). False when the source changed or went since
        `info` was read."""
        from botocore.exceptions import ClientError

        self.lock_arguments(lock)  # refused where there is no per-object retention
        arguments: dict[str, Any] = {}
        if metadata is None:
            arguments["CopySourceIfMatch"] = f'"{info.etag}"'
        else:
            arguments.update(Metadata=metadata, MetadataDirective="REPLACE")
            if info.content_type:
                arguments["ContentType"] = info.content_type
        copy_source = {"Bucket": source.config.bucket, "Key": source.full_key(info.key)}
        full_key = self.full_key(dest_key)
        with self._errors(f"copying {copy_source['Key']} to {full_key}"):
            try:
                copied = self.client.copy_object(Bucket=self.config.bucket, Key=full_key, CopySource=copy_source,
                                                 **arguments)
            except ClientError as error:
                if metadata is None and self._code(error) in ("PreconditionFailed", "412", "NoSuchKey"):
                    return False
                raise
        if lock is not None:  # set on the version just made (a CopyObject with lock headers wants a Content-MD5)
            self.retain(full_key, copied.get("VersionId"), lock)
        return True

    def lifecycle_rules(self) -> list[dict[str, Any]]:
        from botocore.exceptions import ClientError

        with self._errors("reading the lifecycle rules"):
            try:
                response = self.client.get_bucket_lifecycle_configuration(Bucket=self.config.bucket)
            except ClientError as error:
                if self._code(error) == "NoSuchLifecycleConfiguration":
                    return []
                raise
        return list(response.get("Rules") or [])

    def set_lifecycle_rules(self, rules: list[dict[str, Any]]) -> None:
        with self._errors("setting the lifecycle rules"):
            self.client.put_bucket_lifecycle_configuration(Bucket=self.config.bucket,
                                                           LifecycleConfiguration={"Rules": rules})

    # -- deleting ---------------------------------------------------------
    def delete(self, key: str) -> None:
        full_key = self.full_key(key)
        with self._errors(f"deleting {full_key}"):
            self.client.delete_object(Bucket=self.config.bucket, Key=full_key)

    def delete_many(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(self.full_key(key))
            if len(batch) == DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, full_keys: list[str]) -> None:
        with self._errors(f"deleting {len(full_keys)} objects"):
            response = self.client.delete_objects(
                Bucket=self.config.bucket,
                Delete={"Objects": [{"Key": key} for key in full_keys], "Quiet": True})
        errors = response.get("Errors") or []
        if errors:
            sample = ", ".join(f"{item.get('Key')} ({item.get('Code')})" for item in errors[:5])
            raise StepFailed(redact(f"{self.describe()}: {len(errors)} objects were not deleted: {sample}"),
                             hint="check the keys' permissions and retry")

    def list_incomplete_uploads(self, prefix: str = "") -> list[IncompleteUpload]:
        full_prefix = self.config.prefix + validate_prefix(prefix)
        uploads: list[IncompleteUpload] = []
        for page in self._pages("list_multipart_uploads", "listing incomplete uploads", Prefix=full_prefix):
            uploads += [IncompleteUpload(key=self.relative_key(item["Key"]), upload_id=item["UploadId"],
                                         initiated=_utc(item["Initiated"]))
                        for item in page.get("Uploads", [])]
        return uploads

    def abort_incomplete_upload(self, upload: IncompleteUpload) -> None:
        from botocore.exceptions import ClientError

        full_key = self.full_key(upload.key)
        with self._errors(f"aborting the upload of {full_key}"):
            try:
                self.client.abort_multipart_upload(Bucket=self.config.bucket, Key=full_key,
                                                   UploadId=upload.upload_id)
            except ClientError as error:
                if self._code(error) not in ("NoSuchUpload", "404"):
                    raise


class _TranslatingReader(io.RawIOBase):
    """A response body whose read errors become our errors (a connection reset
    halfway through a 10 GB dump is an expected failure, not a traceback)."""

    def __init__(self, body: Any, storage: S3Storage, action: str):
        super().__init__()
        self._body = body
        self._storage = storage
        self._action = action

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        try:
            data = self._body.read(len(buffer))
        except (BotoCoreError, HTTPError, OSError) as error:
            raise self._storage._translate(_as_connection_error(error), self._action) from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def _as_connection_error(error: Exception) -> Exception:
    from botocore.exceptions import BotoCoreError, ConnectionError

    if isinstance(error, BotoCoreError):
        return error
    return ConnectionError(error=redact(error))
