"""The bench's throwaway servers and data: a PostgreSQL cluster, moto's S3 server, the aws CLI."""

from __future__ import annotations

import compileall
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPOSITORY = BENCH_DIR.parent
ROWS_PER_BATCH = 40_000
ORDERS_PER_BATCH = 8_000

# ~1 KB rows of base64 of random bytes (what zstd cannot shrink much, like user content
# already compressed), beside a small, very compressible table of typical columns.
TEXT_BATCH = """
INSERT INTO post (author_id, title, body)
SELECT (random() * 5000)::int,
       'post ' || g,
       encode(decode((SELECT string_agg(md5(random()::text || g::text || s::text), '')
                      FROM generate_series(1, 24) s), 'hex'), 'base64')
FROM generate_series(1, %(rows)s) g
"""
ORDERS_BATCH = """
INSERT INTO orders (customer_id, status, amount_cents, created_at)
SELECT (random() * 5000)::int, (ARRAY['paid', 'shipped', 'refunded'])[1 + (random() * 2)::int],
       (random() * 100000)::int, now() - random() * interval '365 days'
FROM generate_series(1, %(rows)s)
"""
SCHEMA = """
CREATE TABLE IF NOT EXISTS post (id bigserial PRIMARY KEY, author_id int NOT NULL, title text NOT NULL,
                                 body text NOT NULL);
CREATE TABLE IF NOT EXISTS orders (id bigserial PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL,
                                   amount_cents int NOT NULL, created_at timestamptz NOT NULL);
CREATE INDEX IF NOT EXISTS orders_customer ON orders (customer_id);
"""


def compile_tree(root: Path) -> None:
    """Byte-compile the measured checkout first, as pip does on install: with PYTHONDONTWRITEBYTECODE set
    (as here and on CI machines) every `inv` would otherwise compile each opsbook module it imports from
    source, about 0.5 s of CPU for a restore, which imports 151 of them."""
    for package in ("ops", "runbooks"):
        if (root / package).is_dir():
            compileall.compile_dir(root / package, quiet=1, rx=re.compile(r"/demo/prisma/"))
    if (root / "tasks.py").exists():
        compileall.compile_file(root / "tasks.py", quiet=1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres() -> Iterator[Any]:
    """A throwaway cluster of the newest installed PostgreSQL (the test suite's recipe)."""
    sys.path.insert(0, str(REPOSITORY))
    from tests.fixtures.postgres import running_cluster, system_bin_dir

    with running_cluster(system_bin_dir()) as server:
        yield server


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """moto's S3 server in its own process, so its CPU use is not charged to the bench driver."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "ab") as output:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=output, stderr=output)
    try:
        _wait_for_http(endpoint, process)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_for_http(endpoint: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer: it is up
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server at {endpoint} did not start") from None
            time.sleep(0.05)  # readiness poll, bounded by the deadline


def s3_client(endpoint: str) -> Any:
    import boto3.session
    from botocore.config import Config

    session = boto3.session.Session(aws_access_key_id="bench", aws_secret_access_key="bench-secret",
                                    region_name="us-east-1")
    config = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                    response_checksum_validation="when_required", max_pool_connections=16)
    return session.client("s3", endpoint_url=endpoint, config=config)


def empty_prefix(client: Any, bucket: str, prefix: str = "") -> None:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def prefix_size(client: Any, bucket: str, prefix: str) -> int:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(item["Size"] for page in pages for item in page.get("Contents", []))


def fill_database(url: str, size_mb: int, log: Any) -> int:
    """Grow the bench database until it holds `size_mb` MB; its size in bytes."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(SCHEMA)
        size = _database_size(connection)
        while size < size_mb * 1024 * 1024:
            connection.execute(TEXT_BATCH, {"rows": ROWS_PER_BATCH})
            connection.execute(ORDERS_BATCH, {"rows": ORDERS_PER_BATCH})
            size = _database_size(connection)
            log(f"  database: {size / 1024 / 1024:.0f} MB of {size_mb} MB")
        connection.execute("VACUUM ANALYZE")
        return size


def _database_size(connection: Any) -> int:
    return connection.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def compressed_dump(pg_dump: Path, url: str, environ: dict[str, str], path: Path, level: int) -> Path:
    """`pg_dump -Fc -Z0 | zstd -<level> -T2 > path`, with the zstandard module (no zstd CLI needed)."""
    import zstandard

    with subprocess.Popen([str(pg_dump), "-Fc", "-Z0", "-d", url], stdout=subprocess.PIPE, env=environ) as dump, \
            open(path, "wb") as output:
        zstandard.ZstdCompressor(level=level, threads=2).copy_stream(dump.stdout, output)
    if dump.returncode:
        raise RuntimeError(f"pg_dump exited {dump.returncode}")
    return path


def fill_bucket(client: Any, bucket: str, count: int, mean_kb: int) -> int:
    """`count` objects of random bytes (like images: incompressible), 0.2×–1.8× `mean_kb`; total bytes."""
    import random

    generator = random.Random(7)
    sizes = [int(mean_kb * 1024 * generator.uniform(0.2, 1.8)) for _ in range(count)]

    def put(index: int) -> None:
        client.put_object(Bucket=bucket, Key=f"images/{index // 100:03d}/{index:06d}.jpg",
                          Body=os.urandom(sizes[index]), ContentType="image/jpeg")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, range(count)))
    return sum(sizes)


def find_aws(log: Any) -> str:
    """The aws CLI on PATH, else one installed into bench/.venv (its own botocore pin
    would fight the project's, hence a separate venv)."""
    found = shutil.which("aws")
    if found:
        return found
    venv = BENCH_DIR / ".venv"
    aws = venv / "bin" / "aws"
    if not aws.exists():
        log("  no aws CLI on PATH: installing awscli into bench/.venv (once)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "awscli"], check=True)
    return str(aws)


def archive_lag(url: str, rows: int, *, switch: bool, timeout: float = 300) -> float:
    """A burst of `rows` ~1 KB rows committed, then the seconds (server clock) until pg_stat_archiver shows the
    segment holding that commit archived: by archive_timeout, or at once after pg_switch_wal() with `switch`."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SET synchronous_commit = on")  # the commit is written when it returns: its segment
        connection.execute(SCHEMA)
        connection.execute(TEXT_BATCH, {"rows": rows})
        committed, segment = connection.execute(
            "SELECT clock_timestamp(), pg_walfile_name(pg_current_wal_lsn())").fetchone()
        if switch:
            connection.execute("SELECT pg_switch_wal()")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, archived_at = connection.execute(
                "SELECT last_archived_wal >= %s, last_archived_time FROM pg_stat_archiver", (segment,)).fetchone()
            if done:
                return (archived_at - committed).total_seconds()
            time.sleep(0.1)  # the archiver's progress, bounded by the deadline
    raise RuntimeError(f"WAL segment {segment} was not archived within {timeout:.0f} s")


def archive_caught_up(url: str, timeout: float = 600) -> None:
    """Until the archiver has sent every finished WAL segment. The restores write into the archived cluster
    itself (the bench has one server), so their own WAL would queue ahead of the next restore's segment, which a
    source with its target elsewhere never sees."""
    import psycopg

    from ops import pitr_seal

    with psycopg.connect(url, autocommit=True) as connection:
        segment = connection.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        pitr_seal.wait_archived(connection, segment, timeout)  # StepFailed when the archiver fails


def recovery_target(url: str) -> str:
    """A moment between two commits, both archived: what `restore --to-time` recovers to. PostgreSQL stops at T
    only on a commit after it, and the archive's times are whole seconds (S3's Last-Modified), so the segment
    after T goes out in a later second."""
    import psycopg

    from ops import pitr_seal

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SET synchronous_commit = on")
        connection.execute("CREATE TABLE IF NOT EXISTS bench_marker (at timestamptz DEFAULT clock_timestamp())")
        connection.execute("INSERT INTO bench_marker DEFAULT VALUES")
        moment = connection.execute("SELECT clock_timestamp()").fetchone()[0]
        connection.execute("INSERT INTO bench_marker DEFAULT VALUES")
        time.sleep(1.05 - moment.microsecond / 1_000_000)  # into the next whole second
        segment = connection.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        pitr_seal.wait_archived(connection, segment, 120)
    return moment.isoformat()
