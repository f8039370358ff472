"""Streaming a database dump to storage, with bounded memory (ops/fetch.py reads it back).

Backup:  pg_dump -Fc -Z0 (child process) → zstd (multi-threaded) → age (optional)
         → sha256 + size → Storage.upload_stream (multipart)

Both directions (this and ops/fetch.py) run the encoding side in one thread and the
storage side in the caller's thread, joined by a ChunkQueue bounded in bytes: compression keeps going while a
part uploads, and memory stays bounded whatever the database size. pg_dump's exit
status is checked before the last part is sent, so a failed dump never completes
an upload. Only the stored bytes are hashed, so the manifest's sha256 is what
anybody can recompute from the bucket with standard tools.

The one module that imports zstandard and pyrage (age), inside the functions that use
them: the stream's codec in both directions, and the age keys.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ops import processes
from ops.errors import InventoryError, StepFailed, UsageError
from ops.lazy_dataclasses import dataclass
from ops.secrets import Secret, redact

if TYPE_CHECKING:
    from ops.storage import ObjectLock, Storage

CHUNK = 1024 * 1024
QUEUE_BYTES = 8 * 1024 * 1024  # how far encoding may run ahead of the upload
PIPE_BYTES = 1024 * 1024  # pg_dump's stdout, pg_restore's stdin: fewer wake-ups than the default 64 KiB
F_SETPIPE_SZ = 1031  # Linux fcntl; elsewhere the default pipe size stays
STDERR_TAIL = 16 * 1024
ZSTD_THREADS = os.cpu_count() or 1  # one zstd worker per logical CPU
# zstd's default job (4 windows) costs ~40 MB more memory with two workers for the same speed and ratio
ZSTD_JOB_BYTES = 2 * 1024 * 1024
MIN_PART = 8 * 1024 * 1024
MAX_PARTS_PLANNED = 9000  # of S3's 10,000, leaving room for a database that grew since it was measured

Progress = Callable[[int], None]


# --- plumbing ---------------------------------------------------------------------------------


class ReaderGone(Exception):
    """The consuming side stopped reading (it failed or was interrupted)."""


class ChunkQueue:
    """A pipe between two threads holding at most `limit` bytes; file-like on both ends.

    The writer ends it with close() or close(error): the reader then gets b"" or that
    error. A reader that gives up calls abandon(): the writer's next write raises ReaderGone.
    """

    def __init__(self, limit: int = QUEUE_BYTES):
        self._limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._closed = False
        self._error: BaseException | None = None
        self._abandoned = False
        self._condition = threading.Condition()

    def write(self, data: Any) -> int:
        chunk = bytes(data)  # a copy: callers may reuse their buffer
        if not chunk:
            return 0
        with self._condition:
            while self._size >= self._limit and not self._abandoned:
                self._condition.wait()
            if self._abandoned:
                raise ReaderGone("the reading side stopped")
            self._chunks.append(chunk)
            self._size += len(chunk)
            self._condition.notify_all()
        return len(chunk)

    def flush(self) -> None:
        """File-like writers are flushed by the libraries that write to them."""

    def close(self, error: BaseException | None = None) -> None:
        with self._condition:
            self._closed = True
            self._error = error
            self._condition.notify_all()

    def abandon(self) -> None:
        with self._condition:
            self._abandoned = True
            self._chunks.clear()
            self._size = 0
            self._condition.notify_all()

    def read(self, size: int = -1) -> bytes:
        with self._condition:
            while not self._chunks and not self._closed:
                self._condition.wait()
            if self._error is not None:
                raise self._error
            if not self._chunks:
                return b""
            chunk = self._chunks.popleft()
            if 0 <= size < len(chunk):
                self._chunks.appendleft(chunk[size:])
                chunk = chunk[:size]
            self._size -= len(chunk)
            self._condition.notify_all()
            return chunk

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True


class Digest:
    """sha256 and byte count of what passes through."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class CountingReader:
    """Wraps a reader; counts the bytes read through it (hashing pg_dump's output would only cost CPU)."""

    def __init__(self, source: Any):
        self.source = source
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True


class DigestingReader:
    """Wraps a reader; hashes and counts every byte read through it."""

    def __init__(self, source: Any, digest: Digest | None = None):
        self.source = source
        self.digest = digest or Digest()

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        return data

    def readable(self) -> bool:
        return True


class StderrTail:
    """Collects the last bytes a child process writes on stderr (in a thread, so it never blocks)."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._tail = b""
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        for line in iter(lambda: self._stream.readline(), b""):
            self._tail = (self._tail + line)[-STDERR_TAIL:]

    def text(self) -> str:
        self._thread.join(timeout=10)
        return redact(self._tail.decode(errors="replace").strip())


def part_size_for(estimated_bytes: int) -> int:
    """A multipart part size that keeps a dump of about this size under S3's part limit."""
    needed = -(-max(estimated_bytes, 0) // MAX_PARTS_PLANNED)
    mebibytes = -(-needed // (1024 * 1024))
    return max(MIN_PART, mebibytes * 1024 * 1024)


# --- age keys ---------------------------------------------------------------------------------


def parse_recipients(texts: list[str], where: str = "backups.encrypt_to") -> list[Any]:
    """age recipients from the inventory: native (age1…) or SSH public keys."""
    import pyrage

    recipients, problems = [], []
    for index, text in enumerate(texts):
        text = str(text).strip()
        try:
            if text.startswith("age1"):
                recipients.append(pyrage.x25519.Recipient.from_str(text))
            else:
                recipients.append(pyrage.ssh.Recipient.from_str(text))
        except Exception:  # pyrage's RecipientError says little more than "invalid"
            problems.append(f"{where}.{index}: not an age recipient (age1…) or SSH public key: {text[:16]}…")
    if problems:
        raise InventoryError("invalid age recipients", problems=problems,
                             hint="generate a key pair with `age-keygen -o key.txt`; put its public key (age1…) "
                                  "in encrypt_to and keep key.txt safe, away from the backups")
    return recipients


def load_identities(path: str | Path) -> list[Any]:
    """The age identities (AGE-SECRET-KEY-1…) of an identity file, as `age-keygen` writes it."""
    import pyrage

    file = Path(path).expanduser()
    try:
        lines = file.read_text().splitlines()
    except OSError as error:
        raise UsageError(f"cannot read the age identity file {file}: {error.strerror}",
                         hint="pass --identity FILE or set backups.identity_file to the key that decrypts "
                              "these backups") from None
    identities = []
    for line in lines:
        line = line.strip()
        if line.startswith("AGE-SECRET-KEY-"):
            Secret(line)  # registered for redaction: it never reaches an output
            try:
                identities.append(pyrage.x25519.Identity.from_str(line))
            except Exception:
                raise UsageError(f"{file} holds a malformed age identity",
                                 hint="regenerate it with age-keygen, or pass the right file") from None
    if not identities:
        raise UsageError(f"{file} holds no age identity (AGE-SECRET-KEY-1… lines)",
                         hint="pass the file age-keygen wrote (its private key, not the public age1… line)")
    return identities


# --- backup: pg_dump → zstd → age → storage ---------------------------------------------------


@dataclass
class Stored:
    """What a dump's upload stored: its size and checksum, the dump's own size, the time taken."""

    size: int  # bytes stored
    sha256: str  # of the stored bytes
    dump_size: int  # bytes pg_dump wrote
    seconds: float


def dump_to_storage(command: list[str], environment: dict[str, str], storage: Storage, key: str, *,
                    level: int = 3, recipients: list[Any] | None = None, part_size: int = MIN_PART,
                    on_progress: Progress | None = None, what: str = "pg_dump",
                    lock: ObjectLock | None = None) -> Stored:
    """Run `command` (pg_dump to stdout) and store its output, compressed (and encrypted), under `key`
    (with `lock`'s retention when given).

    On any failure, of pg_dump, the encoder or the storage, the upload is aborted
    (no object under `key`), pg_dump is stopped, and the error says which side failed.
    """
    began = time.monotonic()
    try:
        with processes.child_process(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=environment) as process:
            info, stored, raw = _store_output(process, storage, key, level=level, recipients=recipients,
                                              part_size=part_size, on_progress=on_progress, what=what, lock=lock)
    except processes.CannotStart as error:
        raise StepFailed(f"cannot start {command[0]}: {error}",
                         hint="check the PostgreSQL client installation (OPS_PG_BIN)") from None
    if info.size != stored.digest.size:
        raise StepFailed(f"{storage.describe()}: {key} holds {info.size} bytes but {stored.digest.size} "
                         f"were sent", hint="the storage lost part of the upload; run the backup again")
    return Stored(size=stored.digest.size, sha256=stored.digest.hexdigest, dump_size=raw.size,
                  seconds=round(time.monotonic() - began, 3))


def bytes_to_storage(data: bytes, storage: Storage, key: str, *, level: int = 3, recipients: list[Any] | None = None,
                     lock: ObjectLock | None = None) -> Stored:
    """A tool's output already in memory (the globals: kilobytes), encoded as dump_to_storage encodes a stream
    (zstd with its checksum, then age) and stored in one PUT."""
    import zstandard

    began = time.monotonic()
    parameters = zstandard.ZstdCompressionParameters.from_level(level, write_checksum=True)
    encoded = zstandard.ZstdCompressor(compression_params=parameters).compress(data)
    if recipients:
        import pyrage

        encoded = pyrage.encrypt(encoded, recipients)
    info = storage.put_bytes(key, encoded, content_type="application/octet-stream", lock=lock)
    if info.size != len(encoded):
        raise StepFailed(f"{storage.describe()}: {key} holds {info.size} bytes but {len(encoded)} were sent",
                         hint="the storage lost part of the upload; run the backup again")
    return Stored(size=len(encoded), sha256=hashlib.sha256(encoded).hexdigest(), dump_size=len(data),
                  seconds=round(time.monotonic() - began, 3))


def enlarge_pipe(pipe: Any) -> None:
    """A pipe of PIPE_BYTES (Linux; elsewhere the default stays): fewer wake-ups of the two ends."""
    with contextlib.suppress(OSError, ValueError):
        fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_BYTES)


def _store_output(process: subprocess.Popen[bytes], storage: Storage, key: str, *, level: int,
                  recipients: list[Any] | None, part_size: int, on_progress: Progress | None,
                  what: str, lock: ObjectLock | None = None) -> tuple[Any, DigestingReader, CountingReader]:
    """Compress (and encrypt) `process`'s output in a thread while the main thread uploads it."""
    enlarge_pipe(process.stdout)
    stderr = StderrTail(process.stderr)
    queue = ChunkQueue()
    raw = CountingReader(process.stdout)
    encoder = threading.Thread(target=_encode, args=(raw, queue, process, stderr, level, recipients, what),
                               name="opsbook-encode", daemon=True)
    encoder.start()
    stored = DigestingReader(queue)
    try:
        info = storage.upload_stream(key, stored, part_size=part_size, on_progress=on_progress,
                                     content_type="application/octet-stream", lock=lock)
    except BaseException:
        queue.abandon()
        processes.stop(process)  # before the join: the encoder may be blocked reading its output
        raise
    finally:
        encoder.join(timeout=30)
    return info, stored, raw


def _encode(source: CountingReader, queue: ChunkQueue, process: subprocess.Popen[bytes], stderr: StderrTail,
            level: int, recipients: list[Any] | None, what: str) -> None:
    """The encoding thread: compress (and encrypt) into the queue; close it with pg_dump's verdict."""
    import zstandard

    try:
        parameters = zstandard.ZstdCompressionParameters.from_level(
            level, threads=ZSTD_THREADS, job_size=ZSTD_JOB_BYTES, write_checksum=True)
        compressor = zstandard.ZstdCompressor(compression_params=parameters)
        compressed = compressor.stream_reader(source, read_size=CHUNK)
        if recipients:
            import pyrage

            pyrage.encrypt_io(compressed, queue, recipients)
        else:
            for chunk in iter(lambda: compressed.read(CHUNK), b""):
                queue.write(chunk)
        status = process.wait()
    except ReaderGone:
        processes.stop(process)
        return
    except BaseException as error:
        processes.stop(process)
        if process.returncode not in (0, None) and stderr.text():
            queue.close(_dump_failed(what, process.returncode, stderr.text()))  # pg_dump's reason is the real one
        else:
            queue.close(StepFailed(redact(f"compressing or encrypting the dump failed: {type(error).__name__}: "
                                          f"{error}"), hint="see the message; run the backup again"))
        return
    queue.close(_dump_failed(what, status, stderr.text()) if status != 0 else None)


def decode_into(source: BinaryIO, sink: BinaryIO, identities: list[Any] | None) -> None:
    """Decrypt (with `identities`) and decompress everything `source` holds into `sink`."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor().stream_writer(sink, closefd=False)
    if identities:
        import pyrage

        pyrage.decrypt_io(source, decompressor, identities)
    else:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            decompressor.write(chunk)
    decompressor.flush()


def _dump_failed(what: str, status: int, stderr: str) -> StepFailed:
    reason = " ".join(stderr.split())[-1500:] or f"exit status {status}"
    return StepFailed(f"{what} failed (exit {status}): {reason}",
                      hint="nothing was stored; fix the cause above (permissions, locks, disk) and run it again")
