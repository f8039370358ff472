"""Reading a stored dump back, with bounded memory: the other direction of ops/dump.py.

Fetch:   Storage.open_read → sha256 + size → age decrypt (optional) → zstd → a sink
         (pg_restore's stdin, a file for pg_restore -j, or nothing when only verifying)

The object is always read to its end, so a damaged object (its sha256 differs) is
told apart from a wrong key or a consumer that stopped reading.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ops.dump import CHUNK, ChunkQueue, Digest, Progress, ReaderGone, decode_into
from ops.errors import CheckFailed, OpsError, UsageError
from ops.lazy_dataclasses import dataclass
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.backup_manifest import Manifest
    from ops.storage import Storage


class NullSink:
    """Counts what is written and keeps nothing (verification without a copy)."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


@dataclass
class Fetched:
    """What reading a stored dump back found: size, checksum, decoded size, and why it stopped."""

    size: int  # bytes read from storage
    sha256: str
    decoded_size: int | None  # bytes of dump produced; None when decoding failed or was skipped
    decode_error: str | None = None
    sink_closed: bool = False  # the consumer (pg_restore) stopped reading: its own exit status says why


def fetch_and_decode(storage: Storage, key: str, sink: Any, *, identities: list[Any] | None = None,
                     encrypted: bool = False, decode: bool = True, on_progress: Progress | None = None,
                     abort_sink: Callable[[], None] | None = None,
                     opened: contextlib.AbstractContextManager[BinaryIO] | None = None) -> Fetched:
    """Read the stored object whole, hashing it, and decode it into `sink` (unless not `decode`).

    The object is always read to its end, even when decoding fails early, so the
    caller can tell a damaged object (sha256 differs) from a wrong key. On an
    interruption `abort_sink` is called first, to unblock a decoder stuck writing
    into a process that has stopped reading. `opened` is the object's read already
    under way (ops.storage.EarlyRead), else it is opened here.
    """
    queue = ChunkQueue()
    outcome: dict[str, Any] = {}
    decoder = threading.Thread(target=_decode, args=(queue, sink, identities if encrypted else None, outcome),
                               name="opsbook-decode", daemon=True)
    if decode:
        decoder.start()
    else:
        outcome["error"] = None
    digest = Digest()
    feeding = decode
    try:
        with opened or storage.open_read(key) as reader:
            for chunk in iter(lambda: reader.read(CHUNK), b""):
                digest.update(chunk)
                if on_progress:
                    on_progress(digest.size)
                if feeding:
                    try:
                        queue.write(chunk)
                    except ReaderGone:
                        feeding = False  # decoding failed: keep hashing to tell damage from a wrong key
        queue.close()
    except BaseException:
        queue.close(ReaderGone("the download stopped"))
        if abort_sink:
            abort_sink()
        if decode:
            decoder.join(timeout=30)
        raise
    if decode:
        decoder.join()
    error = outcome.get("error")
    return Fetched(size=digest.size, sha256=digest.hexdigest, decoded_size=None if error else outcome.get("size"),
                   decode_error=error, sink_closed=outcome.get("sink_closed", False))


def _decode(queue: ChunkQueue, sink: Any, identities: list[Any] | None, outcome: dict[str, Any]) -> None:
    counter = _CountingWriter(sink)
    try:
        decode_into(queue, counter, identities)
        outcome["size"] = counter.size
    except ReaderGone:
        outcome["error"] = "the download stopped"
    except Exception as error:
        if counter.closed:  # (age may wrap the exception raised inside its writes)
            outcome["error"], outcome["sink_closed"] = "the restoring process stopped reading", True
            queue.abandon()
            return
        outcome["error"] = describe_decode_error(error, encrypted=identities is not None)
        queue.abandon()


def describe_decode_error(error: Exception, *, encrypted: bool) -> str:
    text = redact(str(error)) or type(error).__name__
    if "no matching keys" in text.lower():
        return "none of the given age identities can decrypt it (it was encrypted to other recipients)"
    if encrypted and "decrypt" in text.lower():
        return f"age decryption failed ({text}): the object is damaged or not an age file"
    return f"decompression failed ({text}): the object is damaged or not a zstd stream"


class SinkClosed(Exception):
    """The process reading the decoded dump exited (its pipe is closed)."""


class _CountingWriter:
    def __init__(self, sink: Any):
        self.sink = sink
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        # A raw pipe may take part of a write (a signal arriving mid-write): loop, or
        # the rest is silently lost and pg_restore reads a damaged dump.
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[self.sink.write(view):]  # sinks return the bytes they took (io.RawIOBase.write)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            raise SinkClosed() from None
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        with contextlib.suppress(AttributeError):
            self.sink.flush()


def differences(expected_size: int, expected_sha256: str, fetched: Fetched,
                expected_dump_size: int | None = None) -> list[str]:
    """What differs between the manifest and what was read back (empty when they agree)."""
    found = []
    if fetched.size != expected_size:
        found.append(f"size: stored object has {fetched.size} bytes, the manifest says {expected_size}")
    if fetched.sha256 != expected_sha256:
        found.append(f"sha256: stored object hashes to {fetched.sha256}, the manifest says {expected_sha256}")
    if (not found and expected_dump_size is not None and fetched.decoded_size is not None
            and fetched.decoded_size != expected_dump_size):
        found.append(f"dump size: decoded to {fetched.decoded_size} bytes, the manifest says {expected_dump_size}")
    return found


def check_fetched(backup_id: str, key: str, expected_size: int, expected_sha256: str, fetched: Fetched,
                  expected_dump_size: int | None = None) -> None:
    """CheckFailed naming the backup and what differs; StepFailed when it cannot be decoded."""
    found = differences(expected_size, expected_sha256, fetched, expected_dump_size)
    if found:
        raise CheckFailed(f"backup {backup_id} is damaged: {key}: {'; '.join(found)}",
                          hint="do not restore it; use another backup (`inv backup.list`) and take a fresh one")
    if fetched.decode_error:
        no_key = "identities" in fetched.decode_error
        error_type: type[OpsError] = UsageError if no_key else CheckFailed
        raise error_type(f"backup {backup_id}: {key} matches its checksum but {fetched.decode_error}",
                         hint="pass --identity FILE (or set backups.identity_file) with the age key matching "
                              "backups.encrypt_to" if no_key else "the backup was written damaged; take a fresh one")


def fetch_verified(storage: Storage, manifest: Manifest, *, path: Path | None = None,
                   identities: list[Any] | None = None, on_progress: Progress | None = None) -> Fetched:
    """Read a backup's stored object and check it against its manifest.

    With `path`, the decoded dump (pg_dump custom format) is written there (mode 0600:
    it holds all the data) for pg_restore; the file is removed again on any failure.
    Without identities an encrypted object is only hashed, not decrypted.
    """
    decode = identities is not None or not manifest.encrypted
    try:
        with _sink(path) as sink:
            fetched = fetch_and_decode(storage, manifest.object.key, sink, identities=identities,
                                       encrypted=manifest.encrypted, decode=decode, on_progress=on_progress)
        check_fetched(manifest.id, manifest.object.key, manifest.size, manifest.sha256, fetched,
                      manifest.object.dump_size if decode else None)
    except BaseException:
        if path is not None:
            path.unlink(missing_ok=True)
        raise
    return fetched


@contextlib.contextmanager
def _sink(path: Path | None) -> Iterator[Any]:
    if path is None:
        yield NullSink()
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb", buffering=CHUNK) as handle:
        yield handle
