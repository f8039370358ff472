"""Streamed multipart uploads to S3-compatible storage, with memory bounded to the parts in flight.

Mixed into S3Storage (ops/storage/s3.py), whose client, key mapping and error translation these methods
use; a stream that fits in one part is a plain PUT.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, suppress
from typing import TYPE_CHECKING, Any, BinaryIO

from ops.errors import StepFailed
from ops.storage.base import DEFAULT_PART_SIZE, MAX_PARTS, ObjectInfo, ObjectLock, StorageConfig, check_part_size
from ops.storage.s3_lock import content_md5

if TYPE_CHECKING:
    from botocore.client import BaseClient

# Two parts travel at once: one waits on the server while the other is sent, and
# memory holds at most two parts (one more would buy nothing on 2 cores).
PARTS_IN_FLIGHT = 2
# The read past a full first part: small, so a source that returns whole parts (an object streamed from
# another server) adds no third part to memory.
PEEK_BYTES = 64 * 1024


class MultipartUploads:
    """upload_stream for S3Storage."""

    config: StorageConfig
    client: BaseClient

    if TYPE_CHECKING:  # S3Storage's, which these rely on (stubs here would shadow them)
        def full_key(self, key: str) -> str: ...
        def describe(self) -> str: ...
        def _errors(self, action: str) -> AbstractContextManager[None]: ...
        def _put_arguments(self, metadata: dict[str, str] | None, content_type: str | None,
                           lock: ObjectLock | None = None) -> dict[str, Any]: ...
        def _stored(self, key: str) -> ObjectInfo: ...
        @staticmethod
        def _code(error: Exception) -> str: ...
        def put_bytes(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None,
                      content_type: str | None = None, lock: ObjectLock | None = None) -> ObjectInfo: ...

    def upload_stream(self, key: str, source: BinaryIO, *, part_size: int = DEFAULT_PART_SIZE,
                      metadata: dict[str, str] | None = None,
                      on_progress: Callable[[int], None] | None = None,
                      content_type: str | None = None, lock: ObjectLock | None = None) -> ObjectInfo:
        check_part_size(part_size)
        full_key = self.full_key(key)
        first = _read_part(source, part_size)
        # One read past a full first part tells a stream that fits in one part from a longer one, so the
        # first part is on its way while the second fills (the upload is the slow side of a backup).
        more = source.read(PEEK_BYTES) if len(first) == part_size else b""
        if not more:  # fits in one part: a plain PUT, no multipart bookkeeping
            info = self.put_bytes(key, bytes(first), metadata=metadata, content_type=content_type, lock=lock)
            if on_progress:
                on_progress(len(first))
            return info
        with self._errors(f"starting the upload of {full_key}"):
            upload_id = self.client.create_multipart_upload(
                Bucket=self.config.bucket, Key=full_key,
                **self._put_arguments(metadata, content_type, lock))["UploadId"]
        pending = [first]
        del first  # only `pending` may hold parts, so each is freed once sent
        try:
            self._upload_parts(full_key, upload_id, pending, _Prepended(more, source), part_size, on_progress,
                               checksum=lock is not None)
        except BaseException:
            self._abort_quietly(full_key, upload_id)
            raise
        return self._stored(key)

    def multipart_copy(self, source: Any, info: ObjectInfo, dest_key: str, *,
                       part_size: int = DEFAULT_PART_SIZE, lock: ObjectLock | None = None) -> bool:
        """A server-side copy of any size (UploadPartCopy, for objects past CopyObject's 5 GiB): no byte
        passes through this process. Each part is pinned to `info`'s ETag: False, with nothing left behind,
        when the source changed or went meanwhile."""
        check_part_size(part_size)
        if -(-info.size // part_size) > MAX_PARTS:
            part_size = -(-info.size // MAX_PARTS)
        full_key = self.full_key(dest_key)
        copy_source = {"Bucket": source.config.bucket, "Key": source.full_key(info.key)}
        with self._errors(f"starting the copy of {copy_source['Key']} to {full_key}"):
            upload_id = self.client.create_multipart_upload(
                Bucket=self.config.bucket, Key=full_key,
                **self._put_arguments(info.metadata, info.content_type, lock))["UploadId"]
        try:
            parts = self._copy_parts(copy_source, full_key, upload_id, info, part_size)
            current = source.head(info.key)  # some servers ignore the per-part condition: ask once more
            if parts is None or current is None or current.etag != info.etag:
                self._abort_quietly(full_key, upload_id)
                return False
            with self._errors(f"completing the copy to {full_key}"):
                self.client.complete_multipart_upload(Bucket=self.config.bucket, Key=full_key,
                                                      UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            self._abort_quietly(full_key, upload_id)
            raise
        return True

    def _copy_parts(self, copy_source: dict[str, str], full_key: str, upload_id: str, info: ObjectInfo,
                    part_size: int) -> list[dict[str, Any]] | None:
        """UploadPartCopy of each range of the source; None when the source no longer matches its ETag."""
        parts = []
        for number, start in enumerate(range(0, max(info.size, 1), part_size), start=1):
            end = max(min(start + part_size, info.size) - 1, 0)
            with self._errors(f"copying {copy_source['Key']} to {full_key} (part {number})"):
                try:
                    response = self.client.upload_part_copy(
                        Bucket=self.config.bucket, Key=full_key, UploadId=upload_id, PartNumber=number,
                        CopySource=copy_source, CopySourceRange=f"bytes={start}-{end}",
                        CopySourceIfMatch=f'"{info.etag}"')
                except Exception as error:  # botocore's ClientError; the rest goes to _errors
                    if self._code(error) in ("PreconditionFailed", "412", "NoSuchKey"):
                        return None
                    raise
            parts.append({"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]})
        return parts

    def _upload_parts(self, full_key: str, upload_id: str, pending: list[bytearray], source: BinaryIO,
                      part_size: int, on_progress: Callable[[int], None] | None, *, checksum: bool = False) -> None:
        """Send the parts, PARTS_IN_FLIGHT at a time, then complete.

        A part is read only once fewer than PARTS_IN_FLIGHT are being sent, so at most
        that many parts are in memory; the next part fills while the others travel. `checksum`: each
        part carries its Content-MD5, which S3 wants for an upload under an object lock.
        """
        etags: dict[int, str] = {}
        sending: dict[Future[str], tuple[int, int]] = {}  # future -> (part number, bytes)
        progress = _StoredPrefix(on_progress)
        pool = ThreadPoolExecutor(max_workers=PARTS_IN_FLIGHT, thread_name_prefix="opsbook-upload")
        try:
            while True:
                while len(sending) >= PARTS_IN_FLIGHT:
                    self._collect(sending, wait(sending, return_when=FIRST_COMPLETED).done, etags, progress)
                chunk = pending.pop(0) if pending else _read_part(source, part_size)
                if not chunk:
                    break
                number = len(etags) + len(sending) + 1
                if number > MAX_PARTS:
                    raise StepFailed(f"{self.describe()}: uploading {full_key} failed: more than {MAX_PARTS} parts",
                                     hint=f"use a part size above {part_size} bytes")
                sending[pool.submit(self._upload_part, full_key, upload_id, number, chunk,
                                    checksum)] = (number, len(chunk))
                del chunk  # only the future holds the part now: freed once sent
            while sending:
                self._collect(sending, wait(sending, return_when=FIRST_COMPLETED).done, etags, progress)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        parts = [{"PartNumber": number, "ETag": etags[number]} for number in sorted(etags)]
        with self._errors(f"completing the upload of {full_key}"):
            self.client.complete_multipart_upload(Bucket=self.config.bucket, Key=full_key,
                                                  UploadId=upload_id, MultipartUpload={"Parts": parts})

    def _upload_part(self, full_key: str, upload_id: str, number: int, body: bytes | bytearray,
                     checksum: bool = False) -> str:
        arguments = {"ContentMD5": content_md5(body)} if checksum else {}
        with self._errors(f"uploading {full_key} (part {number})"):
            response = self.client.upload_part(Bucket=self.config.bucket, Key=full_key, UploadId=upload_id,
                                               PartNumber=number, Body=body, **arguments)
        return str(response["ETag"])

    @staticmethod
    def _collect(sending: dict[Any, tuple[int, int]], done: set[Any], etags: dict[int, str],
                 progress: _StoredPrefix) -> None:
        """Record the finished parts (raising the first failure) and report progress."""
        for future in sorted(done, key=lambda finished: sending[finished][0]):
            number, size = sending.pop(future)
            etags[number] = future.result()
            progress.stored(number, size)

    def _abort_quietly(self, full_key: str, upload_id: str) -> None:
        """Best effort while another error propagates; a leftover shows in list_incomplete_uploads."""
        # The original error matters more than a failure to clean up after it.
        with suppress(Exception):
            self.client.abort_multipart_upload(Bucket=self.config.bucket, Key=full_key, UploadId=upload_id)


def _read_part(source: BinaryIO, size: int) -> bytearray:
    """Up to `size` bytes (fewer only at the end), read straight into one buffer: no join copy.

    R2 needs every part but the last the same size, so a part is filled completely."""
    part = bytearray(size)
    view = memoryview(part)
    filled = 0
    with view:
        while filled < size:
            chunk = source.read(size - filled)
            if not chunk:
                break
            view[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
    del part[filled:]  # the last part: shrink in place
    return part


class _Prepended:
    """A reader that returns `head` (bytes already read from `source`) before the rest of `source`."""

    def __init__(self, head: bytes, source: BinaryIO):
        self._head, self._source = head, source

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._source.read(size)
        taken = self._head if size < 0 else self._head[:size]
        self._head = self._head[len(taken):]
        return taken


class _StoredPrefix:
    """Progress as the bytes stored from the start of the object: parts can finish out of order (a
    short last part before the one in flight beside it), and a report never counts past a gap."""

    def __init__(self, on_progress: Callable[[int], None] | None):
        self._on_progress = on_progress
        self._finished: dict[int, int] = {}
        self._next = 1
        self._total = 0

    def stored(self, number: int, size: int) -> None:
        self._finished[number] = size
        while self._next in self._finished:
            self._total += self._finished.pop(self._next)
            self._next += 1
            if self._on_progress:
                self._on_progress(self._total)
