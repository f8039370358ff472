"""The restore alone, against a held-open PostgreSQL and moto: A/B rounds without the bench's set-up.

    .venv/bin/python bench/restore_alone.py serve --size 200 --state /tmp/restore.json   # keeps running
    .venv/bin/python bench/restore_alone.py rounds --state /tmp/restore.json --rounds 5 \
        --tree . --tree /tmp/old-tree                                                 # interleaved A/B

`serve` starts a throwaway cluster filled to --size MB and moto's S3 server, takes one
backup with the given tree's `inv backup`, writes a local `pg_dump -Fc` file for the
baseline (`pg_restore -j 2`) and the environment to --state, and waits until interrupted.
`rounds` runs, per round, `inv restore --env restore --from bench --backup latest` of each
--tree and the baseline, alternating the order, each into a freshly created database, and
prints the medians (wall and CPU) with min and max.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import servers
from bench.measure import run_measured
from bench.run import BACKUP_BUCKET, Bench

RESTORE = ("restore", "--env", "restore", "--from", "bench", "--backup", "latest")


def serve(arguments: argparse.Namespace) -> int:
    import subprocess

    import psycopg

    with tempfile.TemporaryDirectory(prefix="opsbook-restore-") as scratch, servers.postgres() as server, \
            servers.moto_server(Path(scratch) / "moto.log") as endpoint, \
            servers.moto_server(Path(scratch) / "moto-copy.log") as copy_endpoint:  # the inventory's copies env
        work = Path(scratch)
        options = argparse.Namespace(compression_level=1, tasks_root=arguments.tree, rounds=1)
        bench = Bench(options, work, server, endpoint, copy_endpoint)
        bench.write_inventory()
        bench.s3.create_bucket(Bucket=BACKUP_BUCKET)
        with psycopg.connect(server.url().reveal(), autocommit=True) as connection:
            connection.execute('CREATE DATABASE "bench"')
        size = servers.fill_database(server.url("bench").reveal(), arguments.size, print)
        subprocess.run(bench.inv("backup", "--env", "bench"), check=True, env=bench.environ, cwd=work,
                       capture_output=True)
        dump_file = work / "bench.pgc"
        subprocess.run([str(bench.bin_dir / "pg_dump"), "-Fc", "-f", str(dump_file), "-d", bench.pg_url("bench")],
                       check=True, env=bench.environ)
        state = {"environ": bench.environ, "work": str(work), "admin": server.url().reveal(),
                 "pg_restore": str(bench.bin_dir / "pg_restore"), "local_url": bench.pg_url("bench_local"),
                 "dump_file": str(dump_file), "size": size}
        Path(arguments.state).write_text(json.dumps(state))
        print(f"ready: {arguments.state} ({size / 1024 / 1024:.0f} MB)", flush=True)
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
    return 0


def fresh(admin: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def rounds(arguments: argparse.Namespace) -> int:
    state = json.loads(Path(arguments.state).read_text())
    environ, work = state["environ"], state["work"]
    commands: list[tuple[str, list[str], str, dict[str, str]]] = []
    for variant in arguments.tree:  # a checkout, optionally followed by "::" and more arguments to inv restore
        tree, _, extra = variant.partition("::")
        root = str(Path(tree).resolve())
        servers.compile_tree(Path(root))
        commands.append((f"inv restore [{variant}]", [sys.executable, "-m", "invoke", "--search-root", root, *RESTORE,
                                                      *extra.split()], "bench_restore",
                         {**environ, "PYTHONPATH": root}))
    if not arguments.no_baseline:
        commands.append(("pg_restore -j 2 (local file)", [state["pg_restore"], "-j", "2", "-d", state["local_url"],
                                                          state["dump_file"]], "bench_local", environ))
    samples: dict[str, list[Any]] = {label: [] for label, _, _, _ in commands}
    for index in range(arguments.rounds):
        ordered = commands if index % 2 == 0 else list(reversed(commands))
        for label, command, database, env in ordered:
            fresh(state["admin"], database)
            sample = run_measured(command, env=env, cwd=work)
            samples[label].append(sample)
            state_text = "ok" if sample.exit_code == 0 else f"FAILED {sample.exit_code}: {sample.error[-800:]}"
            print(f"  {label}: {sample.seconds:.2f}s ({sample.cpu_seconds:.2f}s CPU) {state_text}", flush=True)
    baseline = statistics.median(s.seconds for s in samples[commands[-1][0]])
    for label, series in samples.items():
        wall = [s.seconds for s in series]
        cpu = [s.cpu_seconds for s in series]
        print(f"{label}: wall {statistics.median(wall):.2f} s [{min(wall):.2f}–{max(wall):.2f}], "
              f"CPU {statistics.median(cpu):.2f} s [{min(cpu):.2f}–{max(cpu):.2f}], "
              f"÷ last {statistics.median(wall) / baseline:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve")
    serving.add_argument("--size", type=int, default=200)
    serving.add_argument("--state", required=True)
    serving.add_argument("--tree", default=str(servers.REPOSITORY), help="the tree whose inv backup to take")
    several = commands.add_parser("rounds")
    several.add_argument("--state", required=True)
    several.add_argument("--rounds", type=int, default=5)
    several.add_argument("--tree", action="append", required=True,
                         help="a checkout whose inv restore to run, optionally with '::--jobs 2' (arguments to add)")
    several.add_argument("--no-baseline", action="store_true")
    arguments = parser.parse_args(argv)
    return serve(arguments) if arguments.command == "serve" else rounds(arguments)


if __name__ == "__main__":
    sys.exit(main())
