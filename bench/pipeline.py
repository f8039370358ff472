"""The backup pipeline alone (ops.dump.dump_to_storage), against different sinks.

Separates our code's cost from the benchmark's environment (moto on the same cores):

    .venv/bin/python bench/pipeline.py serve --size 200 --state /tmp/pipeline.json   # keeps running
    .venv/bin/python bench/pipeline.py one --state /tmp/pipeline.json --sink null   # one measurement

`serve` starts a throwaway PostgreSQL cluster (filled to --size MB) and moto's S3
server, writes where they are to --state and waits until interrupted. `one` runs the
pipeline once into --sink: `null` (a storage that reads and drops: compression,
hashing and the queue only), `local` (the folder backend), or `s3` (moto). Run it
under `/usr/bin/time -v` for its peak RSS; add --profile for a cProfile of the run.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import servers

BUCKET = "pipeline"


class NullStorage:
    """Reads the stream in parts like the S3 backend and keeps nothing."""

    def describe(self) -> str:
        return "null sink"

    def upload_stream(self, key: str, source: Any, *, part_size: int, on_progress: Any = None,
                      content_type: str | None = None, metadata: Any = None, lock: Any = None) -> Any:
        from ops.storage import ObjectInfo, read_full

        total = 0
        while part := read_full(source, part_size):
            total += len(part)
        return ObjectInfo(key=key, size=total, etag=None, last_modified=None)  # type: ignore[arg-type]


def serve(arguments: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="opsbook-pipeline-") as scratch, servers.postgres() as server, \
            servers.moto_server(Path(scratch) / "moto.log") as endpoint:
        import psycopg

        with psycopg.connect(server.url().reveal(), autocommit=True) as connection:
            connection.execute('CREATE DATABASE "bench"')
        size = servers.fill_database(server.url("bench").reveal(), arguments.size, print)
        servers.s3_client(endpoint).create_bucket(Bucket=BUCKET)
        state = {"url": server.url("bench").reveal(), "endpoint": endpoint, "bin_dir": str(server.bin_dir),
                 "local": str(Path(scratch) / "local"), "size": size}
        Path(arguments.state).write_text(json.dumps(state))
        print(f"ready: {arguments.state}", flush=True)
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # delivered to sigwait, so the servers are cleaned up
        signal.sigwait(stop)
    return 0


def make_storage(sink: str, state: dict[str, Any]) -> Any:
    from ops.storage import StorageConfig

    if sink == "null":
        return NullStorage()
    if sink == "local":
        from ops.storage.local import LocalStorage

        Path(state["local"], BUCKET).mkdir(parents=True, exist_ok=True)
        return LocalStorage(StorageConfig(provider="local", bucket=BUCKET, path=state["local"]))
    from ops.storage.s3 import S3Storage

    return S3Storage(StorageConfig(provider="s3", bucket=BUCKET, endpoint=state["endpoint"], region="us-east-1",
                                   access_key_id="bench", secret_access_key="bench-secret"))


def one(arguments: argparse.Namespace) -> int:
    from ops import dump, pg_url

    state = json.loads(Path(arguments.state).read_text())
    if arguments.parts_in_flight:
        from ops.storage import s3_multipart

        s3_multipart.PARTS_IN_FLIGHT = arguments.parts_in_flight
    if arguments.queue_mb:
        dump.QUEUE_BYTES = arguments.queue_mb * 1024 * 1024
        dump.ChunkQueue.__init__.__defaults__ = (dump.QUEUE_BYTES,)
    storage = make_storage(arguments.sink, state)
    command = [str(Path(state["bin_dir"]) / "pg_dump"), "--no-password", "--compress=0", "--format=custom"]
    recipients = None
    if arguments.encrypt:
        import pyrage

        recipients = [pyrage.x25519.Identity.generate().to_public()]
    part_size = dump.part_size_for(state["size"])
    began = time.monotonic()

    def run() -> Any:
        return dump.dump_to_storage(command, pg_url.child_environment(state["url"]), storage, "dump.pgc.zst",
                                    level=arguments.level, recipients=recipients, part_size=part_size)

    if arguments.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        stored = profiler.runcall(run)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    else:
        stored = run()
    seconds = time.monotonic() - began
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"sink": arguments.sink, "seconds": round(seconds, 2), "stored": stored.size,
                      "dump": stored.dump_size, "cpu_user": round(usage.ru_utime, 2),
                      "cpu_system": round(usage.ru_stime, 2), "max_rss_mb": round(usage.ru_maxrss / 1024)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve")
    serving.add_argument("--size", type=int, default=200)
    serving.add_argument("--state", required=True)
    single = commands.add_parser("one")
    single.add_argument("--state", required=True)
    single.add_argument("--sink", choices=("null", "local", "s3"), default="null")
    single.add_argument("--level", type=int, default=3)
    single.add_argument("--encrypt", action="store_true")
    single.add_argument("--profile", action="store_true")
    single.add_argument("--parts-in-flight", type=int, help="override ops.storage.s3_multipart.PARTS_IN_FLIGHT")
    single.add_argument("--queue-mb", type=int, help="override ops.dump.QUEUE_BYTES")
    arguments = parser.parse_args(argv)
    return serve(arguments) if arguments.command == "serve" else one(arguments)


if __name__ == "__main__":
    sys.exit(main())
