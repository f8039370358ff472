"""ops.storage against real backends: moto's S3 server on loopback and a folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from datetime import UTC
from pathlib import Path

import pytest

from ops.errors import ConnectionFailed, UsageError
from ops.secrets import Secret, reveal
from ops.storage import BucketNotFound, ObjectNotFound, Storage, StorageConfig, open_storage
from tests.fixtures.streams import MIB, ChunkedSource

REPO_ROOT = Path(__file__).resolve().parents[2]
PART = 5 * MIB


@pytest.fixture(params=["s3", "local"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """An empty bucket with the prefix "prod/", on each backend."""
    if request.param == "s3":
        config = request.getfixturevalue("s3_server").make_bucket(prefix="prod/")
    else:
        config = StorageConfig(provider="local", bucket="acme-backups", path=str(tmp_path / "buckets"),
                               prefix="prod/")
        open_storage(config).create_bucket()
    return open_storage(config)


def sibling(storage: Storage, prefix: str) -> Storage:
    """The same bucket seen with another prefix."""
    return open_storage(replace(storage.config, prefix=prefix))


class ShortReads:
    """Hands out at most `limit` bytes per read, like a pipe from pg_dump."""

    def __init__(self, data: bytes, limit: int):
        self.stream, self.limit = io.BytesIO(data), limit

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(min(size, self.limit) if size >= 0 else self.limit)


def multipart_etag(data: bytes, part_size: int) -> str:
    digests = [hashlib.md5(data[i:i + part_size]).digest() for i in range(0, len(data), part_size)]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def test_put_head_get_roundtrip(storage: Storage) -> None:
    data = b'{"version": 1}'
    info = storage.put_bytes("backups/1/manifest.json", data, metadata={"sha256": "abc"},
                             content_type="application/json")
    head = storage.head("backups/1/manifest.json")
    assert head is not None and head.key == info.key == "backups/1/manifest.json"
    assert head.size == len(data) and head.etag == hashlib.md5(data).hexdigest()
    assert head.metadata == {"sha256": "abc"} and head.content_type == "application/json"
    assert head.last_modified.tzinfo is not None and head.last_modified.utcoffset() == UTC.utcoffset(None)
    assert storage.get_bytes("backups/1/manifest.json") == data
    assert storage.head("backups/1/missing.json") is None
    with pytest.raises(ObjectNotFound, match=r"missing\.json"):
        storage.get_bytes("backups/1/missing.json")
    # The prefix is real: the object lives at prod/backups/... in the bucket.
    assert sibling(storage, "").get_bytes("prod/backups/1/manifest.json") == data
    assert storage.put_bytes("empty", b"").etag == hashlib.md5(b"").hexdigest()
    storage.delete("backups/1/manifest.json")
    storage.delete("backups/1/manifest.json")  # deleting twice is fine
    assert storage.head("backups/1/manifest.json") is None


def test_list_pages_and_delete_many_batches(storage: Storage) -> None:
    # S3 pages (and DeleteObjects batches) at 1000 keys; the folder backend has no pages.
    count = 1100 if storage.config.provider == "s3" else 150
    keys = [f"many/{number:05d}" for number in range(count)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: storage.put_bytes(key, b"."), keys))
    listed = [info.key for info in storage.list("many/")]
    assert listed == keys  # every page (moto pages at 1000), in key order
    storage.delete_many(keys)
    assert list(storage.list()) == []


def test_list_order_prefixes_and_isolation(storage: Storage) -> None:
    keys = ["a/b", "a-b", "a0", "a/c/d", "b", "backups/2/dump", "backups/1/dump", "backups/1/manifest.json"]
    for key in keys:
        storage.put_bytes(key, key.encode())
    sibling(storage, "staging/").put_bytes("backups/9/dump", b"other env")
    assert [info.key for info in storage.list()] == sorted(keys)  # S3 order: "a-b" < "a/b" < "a0"
    assert [info.key for info in storage.list("backups/1")] == ["backups/1/dump", "backups/1/manifest.json"]
    assert all(info.etag == hashlib.md5(info.key.encode()).hexdigest() for info in storage.list())
    assert storage.list_prefixes() == ["a/", "backups/"]
    assert storage.list_prefixes("backups/") == ["backups/1/", "backups/2/"]
    storage.delete("a/c/d")
    assert storage.list_prefixes() == ["a/", "backups/"]  # a/b is still there
    storage.delete("a/b")
    assert storage.list_prefixes() == ["backups/"]


def test_upload_stream_multipart_roundtrip(storage: Storage) -> None:
    data = os.urandom(12 * MIB)
    progress: list[int] = []
    # Short reads still make parts of exactly PART bytes (R2's rule): the ETag proves the boundaries.
    info = storage.upload_stream("backups/3/dump.pgc.zst", ShortReads(data, 700_000), part_size=PART,
                                 metadata={"sha256": hashlib.sha256(data).hexdigest()},
                                 on_progress=progress.append)
    assert info.size == len(data) and info.etag == multipart_etag(data, PART)
    assert progress == [PART, 2 * PART, len(data)]
    digest = hashlib.sha256()
    with storage.open_read("backups/3/dump.pgc.zst") as reader:
        while chunk := reader.read(MIB):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest() == info.metadata["sha256"]
    assert storage.list_incomplete_uploads() == []
    small = storage.upload_stream("small", ChunkedSource(1000, chunk=100), part_size=PART)
    assert small.size == 1000 and "-" not in (small.etag or "")


class WaitsForTheFirstPart:
    """A producer slower than the upload: after one part and a bit it waits (up to 10 s) until the server
    holds the first part, as a dump waits on its encoder; the uploader should not need the second part to
    send the first."""

    def __init__(self, storage: Storage, part: int):
        self.storage, self.source = storage, ChunkedSource(3 * part)
        self.part, self.given, self.data = part, 0, b""
        self.first_stored: bool | None = None

    def read(self, size: int = -1) -> bytes:
        if self.given > self.part and self.first_stored is None:
            self.first_stored = self._wait_for_a_stored_part(deadline=time.monotonic() + 10)
        data = self.source.read(size)
        self.given += len(data)
        self.data += data
        return data

    def _wait_for_a_stored_part(self, deadline: float) -> bool:
        client, bucket = self.storage.client, self.storage.config.bucket
        while time.monotonic() < deadline:
            for upload in self.storage.list_incomplete_uploads():
                listed = client.list_parts(Bucket=bucket, Key=self.storage.full_key(upload.key),
                                           UploadId=upload.upload_id)
                if listed.get("Parts"):
                    return True
            time.sleep(0.05)  # polling the server until the deadline
        return False


def test_the_first_part_is_sent_before_the_second_is_filled(s3_server) -> None:
    storage = open_storage(s3_server.make_bucket(prefix="prod/"))
    source = WaitsForTheFirstPart(storage, PART)
    info = storage.upload_stream("backups/6/dump", source, part_size=PART)
    assert source.first_stored is True
    assert info.size == len(source.data) == 3 * PART and info.etag == multipart_etag(source.data, PART)


@pytest.mark.parametrize("failure", [OSError("pg_dump died"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_upload_leaves_nothing(storage: Storage, failure: BaseException) -> None:
    storage.put_bytes("backups/4/dump", b"previous version")
    source = ChunkedSource(30 * MIB, fail_after=11 * MIB, fail_with=failure)
    with pytest.raises(type(failure)):
        storage.upload_stream("backups/4/dump", source, part_size=PART)
    with pytest.raises(type(failure)):
        storage.upload_stream("backups/5/dump", ChunkedSource(30 * MIB, fail_after=11 * MIB,
                                                               fail_with=failure), part_size=PART)
    assert storage.get_bytes("backups/4/dump") == b"previous version"
    assert storage.head("backups/5/dump") is None
    assert storage.list_incomplete_uploads() == []
    assert [info.key for info in storage.list()] == ["backups/4/dump"]


CHILD_UPLOAD = """
import json, os, sys, tracemalloc
sys.path.insert(0, os.environ["REPO_ROOT"])
from tests.fixtures.streams import ChunkedSource
from ops.storage import StorageConfig, open_storage
settings = json.loads(os.environ["STORAGE_CONFIG"])
storage = open_storage(StorageConfig(**settings))
storage.bucket_exists()  # warm up: imports and the client are not what we measure
size, part = int(os.environ["UPLOAD_SIZE"]), int(os.environ["PART_SIZE"])
def progress(total):
    print(total, flush=True)
tracemalloc.start()
chunk = int(os.environ.get("UPLOAD_CHUNK") or 1024 * 1024)
info = storage.upload_stream("big", ChunkedSource(size, chunk=chunk), part_size=part, on_progress=progress)
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"peak": peak, "size": info.size}), flush=True)
"""


def run_child_upload(storage: Storage, size: int, chunk: int | None = None) -> subprocess.Popen[str]:
    settings = {item.name: reveal(getattr(storage.config, item.name)) for item in fields(storage.config)}
    env = {**os.environ, "REPO_ROOT": str(REPO_ROOT), "STORAGE_CONFIG": json.dumps(settings),
           "UPLOAD_SIZE": str(size), "PART_SIZE": str(PART), "UPLOAD_CHUNK": str(chunk or "")}
    return subprocess.Popen([sys.executable, "-c", CHILD_UPLOAD], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_upload_memory_stays_bounded(storage: Storage) -> None:
    # In a child process: moto keeps objects in memory in this one.
    size = 64 * MIB
    child = run_child_upload(storage, size)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    result = json.loads(stdout.splitlines()[-1])
    assert result["size"] == size == storage.head("big").size
    assert result["peak"] < 5 * PART, f"peak {result['peak'] / MIB:.1f} MiB for a {size // MIB} MiB upload"


def test_a_source_that_returns_whole_parts_adds_no_part_to_memory(s3_server) -> None:
    """An object streamed from another server reads a whole part at a time: two parts travel, one fills."""
    storage = open_storage(s3_server.make_bucket(prefix="prod/"))
    child = run_child_upload(storage, 40 * MIB, chunk=PART)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    peak = json.loads(stdout.splitlines()[-1])["peak"]
    assert peak < 3.5 * PART, f"peak {peak / MIB:.1f} MiB with parts of {PART // MIB} MiB"


def test_killed_upload_is_never_visible_and_can_be_aborted(storage: Storage) -> None:
    child = run_child_upload(storage, 1024 * MIB)
    try:
        assert child.stdout is not None
        first_progress = child.stdout.readline()  # one part stored: the upload is under way
        assert first_progress.strip() == str(PART), child.stderr.read() if child.stderr else ""
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert storage.head("big") is None
    leftovers = storage.list_incomplete_uploads()
    assert [upload.key for upload in leftovers] == ["big"]
    assert leftovers[0].initiated.tzinfo is not None
    storage.abort_incomplete_upload(leftovers[0])
    storage.abort_incomplete_upload(leftovers[0])  # already gone: fine
    assert storage.list_incomplete_uploads() == []
    assert list(storage.list()) == []


def test_copy_object_between_backends(storage: Storage, s3_server, tmp_path: Path) -> None:
    other_s3 = open_storage(s3_server.make_bucket(prefix="assets/"))
    local = open_storage(StorageConfig(provider="local", bucket="cold", path=str(tmp_path / "other")))
    local.create_bucket()
    storage.put_bytes("img/logo.png", b"\x89PNG...", metadata={"owner": "web"}, content_type="image/png")
    for target in (other_s3, local):
        copied = target.copy_object(storage, "img/logo.png", "copied/logo.png")
        head = target.head("copied/logo.png")
        assert head is not None and copied.size == head.size == 7
        assert head.metadata == {"owner": "web"} and head.content_type == "image/png"
        assert target.get_bytes("copied/logo.png") == b"\x89PNG..."
        # and back into the parametrized backend
        storage.copy_object(target, "copied/logo.png", f"back/{target.config.provider}.png")
        assert storage.get_bytes(f"back/{target.config.provider}.png") == b"\x89PNG..."
    with pytest.raises(ObjectNotFound):
        local.copy_object(storage, "img/none.png", "x")


def test_multipart_copy_copies_server_side_part_by_part_and_refuses_a_changed_source(s3_server) -> None:
    """UploadPartCopy, the server-side copy of objects past CopyObject's 5 GiB, here with 5 MiB parts."""
    source = open_storage(s3_server.make_bucket(prefix="prod/"))
    target = open_storage(s3_server.make_bucket(prefix="copy/"))
    data = os.urandom(2 * PART + 123)
    info = source.upload_stream("dump", io.BytesIO(data), part_size=PART)
    assert target.same_account(source)
    assert target.multipart_copy(source, info, "dump", part_size=PART) is True
    assert hashlib.sha256(target.get_bytes("dump")).digest() == hashlib.sha256(data).digest()
    source.put_bytes("dump", b"changed")  # the ETag the copy is pinned to is gone
    assert target.multipart_copy(source, info, "again", part_size=PART) is False
    assert target.head("again") is None and target.list_incomplete_uploads() == []


def test_missing_bucket_is_a_clear_error(storage: Storage) -> None:
    name = f"no-such-{uuid.uuid4().hex[:8]}"
    missing = open_storage(replace(storage.config, bucket=name))
    assert missing.bucket_exists() is False
    for attempt in (lambda: list(missing.list()), lambda: missing.head("x"), lambda: missing.get_bytes("x"),
                    lambda: missing.put_bytes("x", b"1")):
        with pytest.raises(BucketNotFound) as caught:
            attempt()
        assert name in str(caught.value) and "fix storage.bucket" in str(caught.value)
    missing.create_bucket()
    missing.create_bucket()  # idempotent, as provisioning needs
    assert missing.bucket_exists() and list(missing.list()) == []


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/../../b", "a/./b", ""])
def test_dangerous_keys_are_refused(storage: Storage, key: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        storage.put_bytes(key, b"x")
    assert list(storage.list()) == []
    assert not (tmp_path / "escape").exists()


def test_unreachable_endpoint_names_it_without_secrets(s3_server) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    storage = open_storage(s3_server.config("acme-backups", endpoint=endpoint, provider="r2"))
    assert "***" not in storage.describe() and endpoint in storage.describe()
    for attempt in (storage.bucket_exists, lambda: storage.put_bytes("k", b"1")):
        with pytest.raises(ConnectionFailed) as caught:
            attempt()
        message = str(caught.value)
        assert endpoint in message and "acme-backups" in message
        assert s3_server.secret_access_key.reveal() not in message + repr(caught.value)


def test_r2_provider_settings_work_against_s3_api(s3_server) -> None:
    storage = open_storage(s3_server.make_bucket(provider="r2", public_base="https://cdn.example/"))
    assert storage.describe().startswith("r2 bucket ")
    storage.upload_stream("dump", ChunkedSource(11 * MIB), part_size=PART)
    assert storage.head("dump").size == 11 * MIB
    assert storage.public_url("img/a b.png") == "https://cdn.example/img/a%20b.png"


def test_revoked_and_wrong_keys_are_refused_cleanly(s3_server) -> None:
    bucket = s3_server.make_bucket()
    key_id, secret = s3_server.create_access_key()
    spare = s3_server.create_access_key()
    wrong = Secret(f"wrong-{secret.reveal()[6:]}")
    with s3_server.enforce_auth():
        good = open_storage(s3_server.config(bucket.bucket, access_key_id=key_id, secret_access_key=secret))
        good.put_bytes("k", b"ok")
        assert good.get_bytes("k") == b"ok"
        for credentials in ((key_id, wrong), ("AKIAUNKNOWNKEY000000", secret)):
            bad = open_storage(s3_server.config(bucket.bucket, access_key_id=credentials[0],
                                                secret_access_key=credentials[1]))
            with pytest.raises(ConnectionFailed, match="refused our keys") as caught:
                bad.get_bytes("k")
            text = str(caught.value) + repr(caught.value)
            assert wrong.reveal() not in text and secret.reveal() not in text
        s3_server.delete_access_key(key_id, using=spare)
        with pytest.raises(ConnectionFailed, match="InvalidAccessKeyId"):
            good.get_bytes("k")


def test_storages_with_the_same_keys_share_one_client_and_other_keys_get_their_own(s3_server) -> None:
    bucket = s3_server.make_bucket()
    first, second = open_storage(bucket), open_storage(replace(bucket, prefix="other/"))
    assert first.client is second.client  # building one loads botocore's models: once per process
    key_id, secret = s3_server.create_access_key()
    other = open_storage(s3_server.config(bucket.bucket, access_key_id=key_id, secret_access_key=secret))
    assert other.client is not first.client
    first.put_bytes("k", b"one")
    assert other.get_bytes("k") == b"one"


def test_early_read_gives_the_object_or_the_error_and_closes_unread(storage: Storage) -> None:
    from ops.storage import EarlyRead

    data = os.urandom(3 * MIB + 5)
    storage.put_bytes("dump", data)
    with EarlyRead(storage, "dump") as reader:
        assert reader.read() == data
    missing = EarlyRead(storage, "missing")
    with pytest.raises(ObjectNotFound, match="missing"):  # raised in the caller's thread, when entered
        missing.__enter__()
    unread = EarlyRead(storage, "dump")
    unread.close()  # the caller failed before reading: the response it opened is closed
    with unread as reader:
        assert reader.closed
