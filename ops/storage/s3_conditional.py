"""Conditional writes on S3-compatible storage (AWS S3, Cloudflare R2, moto): the ground of a lease.

`If-None-Match: *` creates an object only where none is; `If-Match: ETAG` replaces or deletes it only
while it is the version we last saw. The server answers 412 (PreconditionFailed) otherwise, 409
(ConditionalRequestConflict) when another conditional write to the key is under way, and 404 for an
If-Match on a key that is gone: each of them means "not as you expected" to the caller. Mixed into
S3Storage (ops/storage/s3.py), whose client and error mapping these methods use; botocore's
exceptions come through ops.aws, looked up only when one is raised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ops import aws
from ops.storage.base import PreconditionFailed, StoredObject

if TYPE_CHECKING:
    from botocore.client import BaseClient

    from ops.storage.base import StorageConfig

# what the server answers a condition that does not hold
NOT_AS_EXPECTED = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404", "NotFound"}
MISSING = {"NoSuchKey", "404", "NotFound"}


def utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def bare_etag(raw: str | None) -> str | None:
    return raw.strip('"') if raw else None


def server_time(response: dict[str, Any]) -> datetime:
    """The server's Date header (what Last-Modified will say, to the second), else our clock."""
    from email.utils import parsedate_to_datetime  # the email package: only when a server answers

    header = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return utc(parsedate_to_datetime(header)) if header else datetime.now(UTC)
    except (TypeError, ValueError):
        return datetime.now(UTC)


class ConditionalWrites:
    """put_if_absent / put_if_match / delete_if_match / get_with_etag for S3Storage."""

    config: StorageConfig
    client: BaseClient

    if TYPE_CHECKING:  # S3Storage's, which these rely on (stubs here would shadow them)
        def full_key(self, key: str) -> str: ...
        def describe(self) -> str: ...
        def _errors(self, action: str) -> AbstractContextManager[None]: ...
        @staticmethod
        def _code(error: Exception) -> str: ...

    @property
    def conditional_writes(self) -> bool:
        return True

    @contextmanager
    def _condition(self, full_key: str, condition: str) -> Iterator[None]:
        """A write that must meet `condition`; PreconditionFailed when the server says it does not."""
        try:
            yield
        except aws.ClientError as error:
            if self._code(error) not in NOT_AS_EXPECTED:
                raise
            raise PreconditionFailed(f"{self.describe()}: {full_key} is not as expected ({condition} failed)",
                                     hint="another run changed it: read it again") from None

    def get_with_etag(self, key: str) -> StoredObject | None:
        full_key = self.full_key(key)
        with self._errors(f"reading {full_key}"):
            try:
                response = self.client.get_object(Bucket=self.config.bucket, Key=full_key)
            except aws.ClientError as error:
                if self._code(error) in MISSING:
                    return None
                raise
            with response["Body"] as body:
                data = body.read()
        return StoredObject(key=key, data=data, etag=bare_etag(response.get("ETag")) or "",
                            last_modified=utc(response["LastModified"]), server_time=server_time(response))

    def _put(self, key: str, data: bytes, condition: dict[str, str], content_type: str | None) -> str:
        full_key = self.full_key(key)
        arguments = {"ContentType": content_type} if content_type else {}
        with self._errors(f"writing {full_key}"), self._condition(full_key, " ".join(condition)):
            response = self.client.put_object(Bucket=self.config.bucket, Key=full_key, Body=data,
                                              **condition, **arguments)
        return bare_etag(response.get("ETag")) or ""

    def put_if_absent(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        return self._put(key, data, {"IfNoneMatch": "*"}, content_type)

    def put_if_match(self, key: str, data: bytes, etag: str, *, content_type: str | None = None) -> str:
        return self._put(key, data, {"IfMatch": f'"{etag}"'}, content_type)

    def delete_if_match(self, key: str, etag: str) -> None:
        full_key = self.full_key(key)
        with self._errors(f"deleting {full_key}"), self._condition(full_key, "IfMatch"):
            self.client.delete_object(Bucket=self.config.bucket, Key=full_key, IfMatch=f'"{etag}"')
