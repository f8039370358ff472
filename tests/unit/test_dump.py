"""The streaming pipeline both ways, on the local storage backend with a stand-in for pg_dump."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import threading
from pathlib import Path

import pyrage
import pytest
import zstandard

from ops import dump, fetch
from ops.errors import CheckFailed, StepFailed, UsageError
from ops.output import human_size
from ops.storage import StorageConfig, open_storage

MiB = 1024 * 1024


@pytest.fixture
def storage(tmp_path: Path):
    store = open_storage(StorageConfig(provider="local", bucket="backups", path=str(tmp_path / "buckets"),
                                       prefix="prod/"))
    store.create_bucket()
    return store


def writer_command(size: int, exit_code: int = 0, stderr: str = "") -> list[str]:
    """A child process that writes `size` pseudo-random bytes (seeded: reproducible) then exits."""
    script = ("import random, sys\nrandom.seed(7)\nleft = int(sys.argv[1])\n"
              "while left > 0:\n    n = min(left, 1 << 20)\n    sys.stdout.buffer.write(random.randbytes(n))\n"
              "    left -= n\nsys.stdout.flush()\nsys.stderr.write(sys.argv[3])\nsys.exit(int(sys.argv[2]))\n")
    return [sys.executable, "-c", script, str(size), str(exit_code), stderr]


def expected_bytes(size: int) -> bytes:
    import random

    random.seed(7)
    chunks, left = [], size
    while left > 0:
        chunks.append(random.randbytes(min(left, 1 << 20)))
        left -= 1 << 20
    return b"".join(chunks)


def test_chunk_queue_passes_bytes_and_errors_between_threads():
    queue = dump.ChunkQueue(limit=64)
    received = []

    def read_all():
        received.append(b"".join(iter(lambda: queue.read(10), b"")))

    reader = threading.Thread(target=read_all)
    reader.start()
    for index in range(100):
        queue.write(bytes([index]) * 7)  # blocks whenever 64 bytes are waiting: bounded
    queue.close()
    reader.join(timeout=10)
    assert received == [b"".join(bytes([i]) * 7 for i in range(100))]

    failing = dump.ChunkQueue()
    failing.write(b"partial")
    failing.close(StepFailed("pg_dump failed"))
    with pytest.raises(StepFailed, match="pg_dump failed"):
        failing.read()

    abandoned = dump.ChunkQueue()
    abandoned.abandon()
    with pytest.raises(dump.ReaderGone):
        abandoned.write(b"x")


def test_dump_round_trip_through_storage(storage):
    size = 21 * MiB + 123  # three parts of 8 MiB: a real multipart upload path
    stored = dump.dump_to_storage(writer_command(size), dict(os.environ), storage, "backups/a/dump.pgc.zst",
                                  level=1, part_size=8 * MiB)
    raw = storage.get_bytes("backups/a/dump.pgc.zst")
    assert stored.size == len(raw) and stored.sha256 == hashlib.sha256(raw).hexdigest()
    assert stored.dump_size == size
    assert raw[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame anybody can decompress
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read() == expected_bytes(size)

    sink = io.BytesIO()
    fetched = fetch.fetch_and_decode(storage, "backups/a/dump.pgc.zst", sink)
    assert (fetched.sha256, fetched.size, fetched.decoded_size) == (stored.sha256, stored.size, size)
    assert sink.getvalue() == expected_bytes(size)
    assert fetch.differences(stored.size, stored.sha256, fetched, size) == []


class ShortWrites(io.BytesIO):
    """A sink that takes at most 1000 bytes a call, as a raw pipe may when a signal arrives mid-write."""

    def write(self, data):
        return super().write(bytes(data[:1000]))


def test_decoding_into_a_sink_that_takes_part_of_each_write_loses_nothing(storage):
    size = 3 * MiB + 7
    dump.dump_to_storage(writer_command(size), dict(os.environ), storage, "backups/s/dump.pgc.zst", level=1)
    sink = ShortWrites()
    fetched = fetch.fetch_and_decode(storage, "backups/s/dump.pgc.zst", sink)
    assert fetched.decoded_size == size and fetched.decode_error is None
    assert sink.getvalue() == expected_bytes(size)


def test_a_failing_dump_stores_nothing_and_says_why(storage):
    with pytest.raises(StepFailed) as failure:
        dump.dump_to_storage(writer_command(12 * MiB, exit_code=1, stderr="permission denied for table secret"),
                             dict(os.environ), storage, "backups/b/dump.pgc.zst", part_size=8 * MiB, what="pg_dump")
    assert "pg_dump failed (exit 1)" in str(failure.value) and "permission denied" in str(failure.value)
    assert list(storage.list("backups/")) == [] and storage.list_incomplete_uploads() == []


def test_encryption_round_trip_and_wrong_key(storage, tmp_path: Path):
    identity = pyrage.x25519.Identity.generate()
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"# created: today\n# public key: {identity.to_public()}\n{identity}\n")
    recipients = dump.parse_recipients([str(identity.to_public())])
    stored = dump.dump_to_storage(writer_command(3 * MiB), dict(os.environ), storage, "backups/c/dump.pgc.zst.age",
                                  recipients=recipients)
    raw = storage.get_bytes("backups/c/dump.pgc.zst.age")
    assert raw.startswith(b"age-encryption.org/v1") and b"\x28\xb5\x2f\xfd" not in raw[:200]

    sink = io.BytesIO()
    fetched = fetch.fetch_and_decode(storage, "backups/c/dump.pgc.zst.age", sink,
                                    identities=dump.load_identities(key_file), encrypted=True)
    assert fetched.sha256 == stored.sha256 and sink.getvalue() == expected_bytes(3 * MiB)

    other = [pyrage.x25519.Identity.generate()]
    wrong = fetch.fetch_and_decode(storage, "backups/c/dump.pgc.zst.age", io.BytesIO(), identities=other,
                                  encrypted=True)
    assert wrong.sha256 == stored.sha256 and "identities" in wrong.decode_error
    with pytest.raises(UsageError, match="none of the given age identities"):
        fetch.check_fetched("c", "backups/c/dump.pgc.zst.age", stored.size, stored.sha256, wrong)
    (tmp_path / "public-only.txt").write_text(f"{identity.to_public()}\n")
    with pytest.raises(UsageError, match="holds no age identity"):
        dump.load_identities(tmp_path / "public-only.txt")


def test_bytes_in_memory_are_stored_as_a_streamed_dump_is(storage, tmp_path: Path):
    """The globals, read ahead of the dump into memory: the same zstd (with its checksum) and age encoding,
    read back by the same decoder and checked against the same sha256 and sizes."""
    script = b"CREATE ROLE app;\nALTER ROLE app WITH LOGIN;\n" * 500
    identity = pyrage.x25519.Identity.generate()
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"{identity}\n")
    for key, recipients, identities in (("backups/g/globals.sql.zst", None, None),
                                        ("backups/g/globals.sql.zst.age", [identity.to_public()],
                                         dump.load_identities(key_file))):
        stored = dump.bytes_to_storage(script, storage, key, level=1, recipients=recipients)
        raw = storage.get_bytes(key)
        assert (stored.size, stored.sha256, stored.dump_size) == (len(raw), hashlib.sha256(raw).hexdigest(),
                                                                  len(script))
        sink = io.BytesIO()
        fetched = fetch.fetch_and_decode(storage, key, sink, identities=identities, encrypted=bool(recipients))
        fetch.check_fetched("g", key, stored.size, stored.sha256, fetched, stored.dump_size)
        assert sink.getvalue() == script


def test_a_flipped_byte_is_named_as_damage(storage):
    stored = dump.dump_to_storage(writer_command(2 * MiB), dict(os.environ), storage, "backups/d/dump.pgc.zst")
    raw = bytearray(storage.get_bytes("backups/d/dump.pgc.zst"))
    raw[len(raw) // 2] ^= 0x01
    storage.put_bytes("backups/d/dump.pgc.zst", bytes(raw))
    fetched = fetch.fetch_and_decode(storage, "backups/d/dump.pgc.zst", fetch.NullSink())
    with pytest.raises(CheckFailed) as failure:
        fetch.check_fetched("d", "backups/d/dump.pgc.zst", stored.size, stored.sha256, fetched)
    assert "backup d is damaged" in str(failure.value) and "sha256" in str(failure.value)


def test_bad_recipients_are_named():
    with pytest.raises(Exception) as failure:
        dump.parse_recipients(["age1notakey", "ssh-nonsense AAAA"])
    assert "backups.encrypt_to.0" in str(failure.value) and "backups.encrypt_to.1" in str(failure.value)


@pytest.mark.parametrize(("estimate", "part"), [
    (0, 8 * MiB), (10 * 1024 * MiB, 8 * MiB), (200 * 1024 * MiB, 23 * MiB),
])
def test_part_size_keeps_under_the_part_limit(estimate, part):
    assert dump.part_size_for(estimate) == part
    assert estimate / dump.part_size_for(estimate) <= dump.MAX_PARTS_PLANNED


@pytest.mark.parametrize(("size", "text"), [(0, "0 B"), (1536, "1.5 KiB"), (5 * MiB, "5.0 MiB")])
def test_human_size(size, text):
    assert human_size(size) == text
