"""Folder backend: a bucket is `<path>/<bucket>`, an object `<path>/<bucket>/<prefix><key>`.

It behaves like S3 where callers can tell: lexicographic listings, S3-style
ETags (md5, or md5-of-part-md5s "-N" for multipart), metadata and content type
kept beside the object, and atomic writes: data is written under
`<bucket>/.incomplete/<upload-id>/` and moved into place with os.replace, so a
half-written object never exists under its key. Leftovers of interrupted
writes are the "incomplete uploads". Sidecars live under `<bucket>/.meta/`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat as stat_mode
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from ops import ids
from ops.errors import InventoryError, StepFailed, UsageError
from ops.secrets import redact
from ops.storage.base import (
    DEFAULT_PART_SIZE,
    BucketNotFound,
    EtagBuilder,
    IncompleteUpload,
    ObjectInfo,
    ObjectLock,
    ObjectNotFound,
    Storage,
    StorageConfig,
    check_part_size,
    read_full,
    validate_prefix,
)
from ops.storage.registry import register_backend

INCOMPLETE_DIR = ".incomplete"
META_DIR = ".meta"
RESERVED = (INCOMPLETE_DIR, META_DIR)
DATA_FILE = "data"
UPLOAD_FILE = "meta.json"  # names the key from the start; becomes the sidecar at the end


def _mtime(stat: os.stat_result) -> datetime:
    return datetime.fromtimestamp(stat.st_mtime, UTC)


def _check_local_name(full_key: str, *, is_prefix: bool) -> None:
    """Refuse what a filesystem would silently rewrite ("a//b") or what collides
    with our own bookkeeping folders."""
    segments = full_key.split("/")
    if is_prefix:
        segments = segments[:-1]  # "backups/" ends with an empty segment, "backups/20" with a partial name
    if any(not segment for segment in segments) or (not is_prefix and full_key.endswith("/")):
        raise UsageError(f"object key {full_key!r} refused by the local backend: empty path segment",
                         hint="remove doubled or trailing '/' from the key")
    if full_key.split("/")[0] in RESERVED:
        raise UsageError(f"object key {full_key!r} refused: {RESERVED} are reserved by the local backend",
                         hint="use another key")


@register_backend("local")
class LocalStorage(Storage):
    """A bucket that is a folder on this machine (the sandbox, tests, a mounted disk)."""

    def __init__(self, config: StorageConfig):
        super().__init__(config)
        if "/" in config.bucket or config.bucket in (".", ".."):
            raise InventoryError(f"storage.bucket {config.bucket!r} is not a valid folder name",
                                 hint="use a plain name such as acme-backups")
        self.root = Path(config.path or ".") / config.bucket

    def describe(self) -> str:
        return redact(f"local bucket {self.config.bucket}/{self.config.prefix} at {self.config.path}")

    # -- paths ------------------------------------------------------------
    def full_key(self, key: str) -> str:
        full_key = super().full_key(key)
        _check_local_name(full_key, is_prefix=False)
        return full_key

    def _object_path(self, full_key: str) -> Path:
        return self.root / full_key

    def _meta_path(self, full_key: str) -> Path:
        return self.root / META_DIR / f"{full_key}.json"

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            reason = redact(error.strerror or error)
            raise StepFailed(f"{self.describe()}: {action} failed: {reason} ({redact(error.filename)})",
                             hint="check the folder's permissions and free space") from None

    # -- buckets ----------------------------------------------------------
    def bucket_exists(self) -> bool:
        return self.root.is_dir()

    def create_bucket(self) -> None:
        with self._errors("creating the bucket"):
            self.root.mkdir(parents=True, exist_ok=True)

    def _require_bucket(self, action: str) -> None:
        if not self.bucket_exists():
            raise BucketNotFound(f"{self.describe()}: {action} failed: bucket folder {self.root} does not exist",
                                 hint="create it (inv provision / inv sandbox.up) or fix storage.bucket and path")

    # -- reading ----------------------------------------------------------
    def _sidecar(self, full_key: str) -> dict[str, Any]:
        try:
            return json.loads(self._meta_path(full_key).read_text())
        except (OSError, ValueError):
            return {}  # an object put there by hand: no ETag or metadata known

    def head(self, key: str) -> ObjectInfo | None:
        full_key = self.full_key(key)
        self._require_bucket(f"reading the info of {full_key}")
        try:
            stat = self._object_path(full_key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat_mode.S_ISREG(stat.st_mode):
            return None  # a folder: the "directory" of other objects, not an object
        sidecar = self._sidecar(full_key)
        return ObjectInfo(key=key, size=stat.st_size, etag=sidecar.get("etag"), last_modified=_mtime(stat),
                          metadata=dict(sidecar.get("metadata") or {}),
                          content_type=sidecar.get("content_type"))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = self.config.prefix + validate_prefix(prefix)
        if full_prefix:
            _check_local_name(full_prefix, is_prefix=True)
        self._require_bucket(f"listing {full_prefix or '/'}")
        directory, _, name_start = full_prefix.rpartition("/")
        key_prefix = f"{directory}/" if directory else ""
        for full_key, stat in self._walk(self.root / directory, key_prefix, name_start):
            yield ObjectInfo(key=self.relative_key(full_key), size=stat.st_size,
                             etag=self._sidecar(full_key).get("etag"), last_modified=_mtime(stat))

    def _walk(self, directory: Path, key_prefix: str, name_start: str) -> Iterator[tuple[str, os.stat_result]]:
        """Files under `directory` in S3 key order: sorting "name/" for folders and
        "name" for files orders the full keys the way S3 does."""
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        ordered = []
        for entry in entries:
            if (not key_prefix and entry.name in RESERVED) or not entry.name.startswith(name_start):
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            ordered.append((entry.name + "/" if is_dir else entry.name, entry, is_dir))
        ordered.sort(key=lambda item: item[0])
        for _, entry, is_dir in ordered:
            if is_dir:
                yield from self._walk(Path(entry.path), f"{key_prefix}{entry.name}/", "")
            elif entry.is_file():
                yield f"{key_prefix}{entry.name}", entry.stat()

    def list_prefixes(self, prefix: str = "", delimiter: str = "/") -> list[str]:
        # Derived from the objects themselves so an empty folder never shows, as on S3.
        found: set[str] = set()
        for info in self.list(prefix):
            position = info.key.find(delimiter, len(prefix))
            if position >= 0:
                found.add(info.key[: position + len(delimiter)])
        return sorted(found)

    @contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        full_key = self.full_key(key)
        self._require_bucket(f"reading {full_key}")
        try:
            reader = open(self._object_path(full_key), "rb")  # noqa: SIM115 - closed below, after the yield
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(f"{self.describe()}: no object {full_key!r}",
                                 hint="list the bucket to find the right key") from None
        with reader:
            yield reader

    # -- writing ----------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None,
                  content_type: str | None = None, lock: ObjectLock | None = None) -> ObjectInfo:
        self._refuse_lock(lock)
        return self._write(key, io.BytesIO(data), max(len(data), 1), metadata, content_type, None)

    def upload_stream(self, key: str, source: BinaryIO, *, part_size: int = DEFAULT_PART_SIZE,
                      metadata: dict[str, str] | None = None,
                      on_progress: Callable[[int], None] | None = None,
                      content_type: str | None = None, lock: ObjectLock | None = None) -> ObjectInfo:
        check_part_size(part_size)  # same rule as S3, so code tried here works there
        self._refuse_lock(lock)
        return self._write(key, source, part_size, metadata, content_type, on_progress)

    def _refuse_lock(self, lock: ObjectLock | None) -> None:
        if lock is not None:  # a folder cannot refuse a deletion: never pretend it holds the object
            raise UsageError(f"{self.describe()}: a folder cannot lock objects",
                             hint="unset backups.lock_days, or keep backups in an S3 or R2 bucket")

    def _write(self, key: str, source: BinaryIO, part_size: int, metadata: dict[str, str] | None,
               content_type: str | None, on_progress: Callable[[int], None] | None) -> ObjectInfo:
        full_key = self.full_key(key)
        self._require_bucket(f"writing {full_key}")
        upload_dir = self._start_upload(full_key)
        try:
            etag = self._write_parts(upload_dir / DATA_FILE, source, part_size, on_progress, full_key)
            sidecar = {"key": full_key, "etag": etag, "metadata": dict(metadata or {}),
                       "content_type": content_type}
            with self._errors(f"writing {full_key}"):
                (upload_dir / UPLOAD_FILE).write_text(json.dumps(sidecar))
            self._move_into_place(upload_dir, full_key)
        except BaseException:
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise
        shutil.rmtree(upload_dir, ignore_errors=True)
        with self._errors(f"writing {full_key}"):
            stat = self._object_path(full_key).stat()
        return ObjectInfo(key=key, size=stat.st_size, etag=sidecar["etag"], last_modified=_mtime(stat),
                          metadata=sidecar["metadata"], content_type=content_type)

    def _start_upload(self, full_key: str) -> Path:
        upload_dir = self.root / INCOMPLETE_DIR / ids.uuid4_hex()
        with self._errors(f"starting the upload of {full_key}"):
            upload_dir.mkdir(parents=True)
            (upload_dir / UPLOAD_FILE).write_text(json.dumps({"key": full_key}))
        return upload_dir

    def _write_parts(self, target: Path, source: BinaryIO, part_size: int,
                     on_progress: Callable[[int], None] | None, full_key: str) -> str:
        # Only file operations are wrapped: the source's own errors propagate untouched.
        action = f"writing {full_key}"
        etag = EtagBuilder()
        total = 0
        with self._errors(action):
            output = open(target, "wb")  # noqa: SIM115 - closed by the with below
        with output:
            while True:
                chunk = read_full(source, part_size)
                if not chunk and total:
                    break
                etag.add_part(chunk)
                with self._errors(action):
                    output.write(chunk)
                total += len(chunk)
                if not chunk:
                    break  # an empty object: one empty part, the md5 of nothing
                if on_progress:
                    on_progress(total)
            with self._errors(action):
                output.flush()
                os.fsync(output.fileno())
        return etag.etag()

    def _move_into_place(self, upload_dir: Path, full_key: str) -> None:
        target, meta = self._object_path(full_key), self._meta_path(full_key)
        with self._errors(f"writing {full_key}"):
            # is_dir() first: a stat is much cheaper than a failing mkdir on some filesystems.
            try:
                if not target.parent.is_dir():
                    target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise self._conflict(full_key) from None
            if not meta.parent.is_dir():
                meta.parent.mkdir(parents=True, exist_ok=True)
            # Sidecar first: a crash in between leaves a sidecar without its object
            # (harmless) rather than an object described by a stale sidecar.
            os.replace(upload_dir / UPLOAD_FILE, meta)
            try:
                os.replace(upload_dir / DATA_FILE, target)
            except IsADirectoryError:
                meta.unlink(missing_ok=True)
                raise self._conflict(full_key) from None

    def _conflict(self, full_key: str) -> StepFailed:
        return StepFailed(f"{self.describe()}: cannot write {full_key}: a folder cannot hold both an object "
                          "and other objects under the same name (S3 can, the local backend cannot)",
                          hint="use keys that are not prefixes of other keys")

    # -- deleting ---------------------------------------------------------
    def delete(self, key: str) -> None:
        full_key = self.full_key(key)
        self._require_bucket(f"deleting {full_key}")
        with self._errors(f"deleting {full_key}"):
            target = self._object_path(full_key)
            if target.is_file():
                target.unlink()
            self._meta_path(full_key).unlink(missing_ok=True)
        # Empty folders would show up as "directories"; S3 has none.
        self._prune(self._object_path(full_key).parent, self.root)
        self._prune(self._meta_path(full_key).parent, self.root / META_DIR)

    @staticmethod
    def _prune(directory: Path, stop: Path) -> None:
        while directory != stop and stop in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return  # not empty (or already gone): the folders above are in use too
            directory = directory.parent

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)

    def list_incomplete_uploads(self, prefix: str = "") -> list[IncompleteUpload]:
        full_prefix = self.config.prefix + validate_prefix(prefix)
        self._require_bucket("listing incomplete uploads")
        uploads = []
        for entry in sorted((self.root / INCOMPLETE_DIR).glob("*/")):
            try:
                full_key = json.loads((entry / UPLOAD_FILE).read_text())["key"]
                initiated = _mtime(entry.stat())
            except (OSError, ValueError, KeyError):
                continue  # vanished meanwhile, or a write that died before naming its key
            if full_key.startswith(full_prefix):
                uploads.append(IncompleteUpload(key=self.relative_key(full_key), upload_id=entry.name,
                                                initiated=initiated))
        return uploads

    def abort_incomplete_upload(self, upload: IncompleteUpload) -> None:
        if not upload.upload_id or "/" in upload.upload_id or upload.upload_id in (".", ".."):
            raise UsageError(f"upload id {upload.upload_id!r} is not one of ours",
                             hint="take ids from list_incomplete_uploads()")
        with self._errors(f"aborting the upload of {upload.key}"), suppress(FileNotFoundError):
            shutil.rmtree(self.root / INCOMPLETE_DIR / upload.upload_id)
