"""opsbook against what users do today, on the same data, in one run: a table of median ratios.

    .venv/bin/python bench/run.py                    # 750 MB database (the reference size), 5 rounds
    .venv/bin/python bench/run.py --sizes 200,750    # two sizes: peak RSS must not grow
    .venv/bin/python bench/run.py --json             # every sample, as JSON on stdout

Scenarios (each round runs every command once, the order alternating between rounds):
    backup    inv backup            vs  pg_dump -Fc | aws s3 cp - s3://…,  the upload alone (aws s3 cp of
                                        the finished object from a file)  and  pg_dump -Fc -Z0 > /dev/null
              (and inv backup with backups.copies on a second S3 server: streamed, its peak RSS beside)
    restore   inv restore           vs  pg_restore -j 2 from a local file
    assets    inv backup.assets     vs  aws s3 sync   (a full copy, then a run with nothing new)
    pitr      inv restore --to-time vs  pg_restore -j 2 from a local file; the archive lag after a burst of writes
    startup   inv --list            vs  python -c "import invoke"
See bench/README.md for how to read the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from bench import servers
from bench.measure import Sample, Series, ratio, run_measured

APP_BUCKET, BACKUP_BUCKET, USERS_BUCKET = "bench-app", "bench-backups", "bench-users"
BACKUP_PREFIX = "bench/"
COPY_BUCKET, COPY_PREFIX = "bench-copies", "copied/"  # backups.copies of env `copies`, on the second S3 server
# The finished object (zstd at the bench's level) sent from a file by the aws CLI: the S3 server's share.
UPLOAD_ONLY = "aws s3 cp of the compressed dump from a file (upload alone)"
FLOOR = "pg_dump -Fc -Z0 > /dev/null (floor)"
TARGETS = {  # the decided targets, as maximum ratios
    ("backup", "pg_dump -Fc | aws s3 cp -"): 0.30,
    ("backup", UPLOAD_ONLY): 1.5,  # dumping, compressing, hashing, row counts and manifest hide behind the upload
    ("restore", "pg_restore -j 2 (local file)"): 1.25,
    ("pitr restore", "pg_restore -j 2 (local file)"): 2.0,
    ("asset copy, full", "aws s3 sync"): 1 / 1.5,  # at least 1.5 × faster
    ("start-up (CPU time)", 'python -c "import invoke"'): 2.0,
}
INFORMATION = {("backup", FLOOR)}  # printed, marked "information, no target": reading the database at all
RSS_TARGET_MB = 150  # the backup's peak RSS, at every size
ARCHIVE_TIMEOUT = 60  # pitr.archive_timeout's default: the bound of the archive lag without a WAL switch
BURST_ROWS = 20_000  # ~15 MB of rows: one WAL segment or two


@dataclass
class Scenario:
    name: str
    opsbook: Series
    baselines: list[Series]
    notes: list[str] = field(default_factory=list)
    cpu: bool = False  # compare CPU time (user + system), not wall time: start-up on a shared machine
    measured: bool = False  # samples are measured durations (the archive lag), not commands: no RSS

    def target(self, baseline: str) -> float | None:
        """The decided target: by the scenario's first words ("backup") or first two ("asset copy, full")."""
        words = self.name.split(", ")
        return TARGETS.get((", ".join(words[:2]), baseline), TARGETS.get((words[0], baseline)))

    def information(self, baseline: str) -> bool:
        return (self.name.split(", ")[0], baseline) in INFORMATION

    @property
    def rss_target_mb(self) -> float | None:
        return RSS_TARGET_MB if self.name.startswith("backup") else None


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, arguments: argparse.Namespace, work: Path, server: Any, endpoint: str, copy_endpoint: str):
        self.arguments = arguments
        self.work = work
        self.server = server
        self.endpoint, self.copy_endpoint = endpoint, copy_endpoint
        self.s3 = servers.s3_client(endpoint)
        self.copy_s3 = servers.s3_client(copy_endpoint)
        self.aws = servers.find_aws(log)
        self.bin_dir = Path(server.bin_dir)
        self.tasks_root = Path(arguments.tasks_root).resolve()
        servers.compile_tree(self.tasks_root)
        self.environ = self._environment()
        self.available = self._available_tasks()
        self.backed_up: str | None = None  # the size label of the newest backup in the bucket (the one restored)

    # -- setup ------------------------------------------------------------
    def _environment(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("OPS_", "PG", "AWS_"))}
        return {**base, "OPS_INVENTORY": str(self.work / "inventory.yaml"), "OPS_HOME": str(self.work / ".ops"),
                "OPS_OPERATOR": "bench", "BENCH_S3_KEY": "bench", "BENCH_S3_SECRET": "bench-secret",
                "BENCH_DATABASE_URL": self.server.url("bench").reveal(),
                "BENCH_RESTORE_URL": self.server.url("bench_restore").reveal(),
                "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                "AWS_DEFAULT_REGION": "us-east-1", "PGPASSWORD": self.server.password.reveal(),
                "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}"}

    def write_inventory(self, pitr: bool = False) -> None:
        storage = {"provider": "s3", "endpoint": self.endpoint, "region": "us-east-1", "bucket": APP_BUCKET,
                   "access_key_id": "${env:BENCH_S3_KEY}", "secret_access_key": "${env:BENCH_S3_SECRET}"}
        backups = {"bucket": BACKUP_BUCKET, "prefix": BACKUP_PREFIX,
                   "compression_level": self.arguments.compression_level}
        # another server (endpoint) than the backup bucket's: the copy is streamed through opsbook, not server-side
        copies = {**backups, "prefix": COPY_PREFIX, "copies": [
            {"name": "offsite", "provider": "s3", "endpoint": self.copy_endpoint, "region": "us-east-1",
             "bucket": COPY_BUCKET, "prefix": COPY_PREFIX, "access_key_id": "${env:BENCH_S3_KEY}",
             "secret_access_key": "${env:BENCH_S3_SECRET}"}]}
        inventory = {"project": "bench", "default_env": "bench", "envs": {
            "bench": {"database": {"url": "${env:BENCH_DATABASE_URL}"}, "storage": storage, "backups": backups,
                      **({"pitr": {"data_dir": str(self.server.data_dir)}} if pitr else {})},
            "restore": {"database": {"url": "${env:BENCH_RESTORE_URL}"}, "storage": storage, "backups": backups},
            "copies": {"database": {"url": "${env:BENCH_DATABASE_URL}"}, "storage": storage, "backups": copies},
        }}
        (self.work / "inventory.yaml").write_text(yaml.safe_dump(inventory, sort_keys=False))

    def inv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "invoke", "--search-root", str(self.tasks_root), *args]

    def _available_tasks(self) -> set[str]:
        import subprocess

        listed = subprocess.run(self.inv("--list"), capture_output=True, text=True, env=self.environ,
                                cwd=self.work)
        names: set[str] = set()
        for line in listed.stdout.splitlines():
            if line.startswith("  ") and line[2] != " ":  # deeper indents continue a docstring
                words = line.split()
                names.add(words[0])
                if len(words) > 1 and words[1].startswith("("):  # "backup.run (backup)": the default task
                    names.add(words[1].strip("()"))
        return names

    def task_help(self, name: str) -> str:
        import subprocess

        return subprocess.run(self.inv("-h", name), capture_output=True, text=True, env=self.environ,
                              cwd=self.work).stdout

    def pg_url(self, database: str) -> str:
        # The password travels in PGPASSWORD, never on a command line.
        return f"postgresql://{self.server.superuser}@{self.server.host}:{self.server.port}/{database}"

    def psql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.server.url().reveal(), autocommit=True) as connection:
            connection.execute(statement)

    def fresh(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.psql(f'CREATE DATABASE "{name}"')

    def run_step(self, *args: str) -> None:
        """An opsbook command the scenario needs done before it measures (setup, a first backup)."""
        import subprocess

        done = subprocess.run(self.inv(*args), capture_output=True, text=True, env=self.environ, cwd=self.work)
        if done.returncode:
            raise RuntimeError(f"inv {' '.join(args)} failed (exit {done.returncode}): {done.stderr[-1500:]}")

    # -- running ----------------------------------------------------------
    def rounds(self, commands: list[tuple[Series, Any, Any]]) -> None:
        """Each round runs every (series, command, before) once; odd rounds in reverse order."""
        for index in range(self.arguments.rounds):
            ordered = commands if index % 2 == 0 else list(reversed(commands))
            for series, command, before in ordered:
                if before:
                    before()
                sample = run_measured(command() if callable(command) else command, env=self.environ,
                                      cwd=str(self.work))
                series.samples.append(sample)
                self._report(series, sample)

    @staticmethod
    def _report(series: Series, sample: Sample) -> None:
        state = "ok" if sample.exit_code == 0 else f"FAILED (exit {sample.exit_code})"
        log(f"    {series.label}: {sample.seconds:.2f}s ({sample.cpu_seconds:.2f}s CPU), "
            f"{sample.peak_rss_mb:.0f} MB peak RSS, {state}")
        if sample.exit_code:
            log("      " + sample.error.strip().replace("\n", "\n      ")[-1500:])


def backup_scenario(bench: Bench, size_label: str) -> tuple[Scenario, ...]:
    log(f"backup ({size_label})")
    ours = Series("inv backup")
    users = Series("pg_dump -Fc | aws s3 cp -")
    floor = Series(FLOOR)
    upload = Series(UPLOAD_ONLY)
    scenario = Scenario(f"backup, {size_label}", ours, [users, floor, upload])
    dump = f"{bench.bin_dir / 'pg_dump'} -Fc"
    url = bench.pg_url("bench")
    users_command = (f"{dump} -d '{url}' | {bench.aws} --endpoint-url {bench.endpoint} --only-show-errors "
                     f"s3 cp - s3://{USERS_BUCKET}/dump.pgc")
    compressed = servers.compressed_dump(bench.bin_dir / "pg_dump", url, bench.environ, bench.work / "dump.pgc.zst",
                                         bench.arguments.compression_level)
    commands: list[tuple[Series, Any, Any]] = [
        (users, users_command, lambda: servers.empty_prefix(bench.s3, USERS_BUCKET)),
        (floor, f"{dump} -Z0 -d '{url}' > /dev/null", None),
        (upload, [bench.aws, "--endpoint-url", bench.endpoint, "--only-show-errors", "s3", "cp", str(compressed),
                  f"s3://{USERS_BUCKET}/upload-only.zst"], None),
    ]
    extra = ["--no-prune"] if "backup" in bench.available and "--no-prune" in bench.task_help("backup") else []
    if "backup" in bench.available:
        commands.insert(0, (ours, bench.inv("backup", "--env", "bench", *extra),
                            lambda: servers.empty_prefix(bench.s3, BACKUP_BUCKET, BACKUP_PREFIX + "backups/")))
    else:
        scenario.notes.append("`inv backup` is not in this tree yet: its row is empty")
    copied = Scenario(f"backup + streamed copy, {size_label}", Series("inv backup, backups.copies on another server"),
                      [users], ["backup + streamed copy: the same backup, then its copy read back and streamed "
                                "to a second S3 server; no target, its peak RSS must stay as the backup's"])
    if "backup" in bench.available and "backup.copy" in bench.available:
        commands.insert(1, (copied.opsbook, bench.inv("backup", "--env", "copies", *extra), lambda: (
            servers.empty_prefix(bench.s3, BACKUP_BUCKET, COPY_PREFIX + "backups/"),
            servers.empty_prefix(bench.copy_s3, COPY_BUCKET, COPY_PREFIX + "backups/"))))
    bench.rounds(commands)
    bench.backed_up = size_label if ours.samples else bench.backed_up
    compressed.unlink()
    users.stored_bytes = servers.prefix_size(bench.s3, USERS_BUCKET, "dump.pgc")
    if ours.samples:
        ours.stored_bytes = servers.prefix_size(bench.s3, BACKUP_BUCKET, BACKUP_PREFIX + "backups/") or None
    return scenario, *([copied] if copied.opsbook.samples else [])


def restore_scenario(bench: Bench, size_label: str) -> Scenario:
    log(f"restore ({size_label})")
    ours = Series("inv restore")
    local = Series("pg_restore -j 2 (local file)")
    scenario = Scenario(f"restore, {size_label}", ours, [local])
    dump_file = bench.work / "bench.pgc"
    import subprocess

    subprocess.run([str(bench.bin_dir / "pg_dump"), "-Fc", "-f", str(dump_file), "-d", bench.pg_url("bench")],
                   check=True, env=bench.environ)

    commands: list[tuple[Series, Any, Any]] = [
        (local, [str(bench.bin_dir / "pg_restore"), "-j", "2", "-d", bench.pg_url("bench_local"), str(dump_file)],
         lambda: bench.fresh("bench_local"))]
    if "restore" in bench.available and "backup" in bench.available:
        if bench.backed_up != size_label:  # a backup of this size: the latest may be of the previous --sizes value
            subprocess.run(bench.inv("backup", "--env", "bench"), check=True, env=bench.environ, cwd=bench.work,
                           capture_output=True)
            bench.backed_up = size_label
        commands.insert(0, (ours, bench.inv("restore", "--env", "restore", "--from", "bench", "--backup", "latest"),
                            lambda: bench.fresh("bench_restore")))
    else:
        scenario.notes.append("`inv restore` is not in this tree yet: its row is empty")
    bench.rounds(commands)
    dump_file.unlink()
    for name in ("bench_local", "bench_restore"):
        bench.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return scenario


def pitr_scenarios(bench: Bench, size_label: str) -> list[Scenario]:
    """Archiving on the bench's cluster (`inv pitr.setup`, moto as the bucket), a base backup, the archive lag
    after a burst of writes (archive_timeout at its default, then with pg_switch_wal()), then `inv restore
    --to-time T` of that database against `pg_restore -j 2` from a local dump of it. Run last: the cluster
    archives from then on."""
    log(f"pitr ({size_label})")
    local = Series("pg_restore -j 2 (local file)")
    restore = Scenario(f"pitr restore, {size_label}", Series("inv restore --to-time T"), [local])
    lags = [Scenario(f"pitr archive lag, {label}", Series("commit → archived (pg_stat_archiver)"),
                     [Series(f"archive_timeout ({ARCHIVE_TIMEOUT} s, the bound)")], measured=True)
            for label in (f"archive_timeout {ARCHIVE_TIMEOUT} s (default)", "after pg_switch_wal()")]
    dump_file = bench.work / "bench.pgc"
    local_command = [str(bench.bin_dir / "pg_restore"), "-j", "2", "-d", bench.pg_url("bench_local"), str(dump_file)]
    if not {"pitr.setup", "pitr.base"} <= bench.available or "--to-time" not in bench.task_help("restore"):
        restore.notes.append("`inv pitr.setup`/`restore --to-time` are not in this tree yet: the PITR rows are empty")
        return [restore]
    bench.write_inventory(pitr=True)
    log("  inv pitr.setup (restarts the cluster with archiving on), inv pitr.base")
    bench.run_step("pitr.setup", "--env", "bench")
    bench.run_step("pitr.base", "--env", "bench", "--no-prune")
    url = bench.server.url("bench").reveal()
    for index in range(bench.arguments.rounds):
        for scenario, switch in zip(lags, (False, True), strict=True):
            lag = servers.archive_lag(url, BURST_ROWS, switch=switch)
            scenario.opsbook.samples.append(Sample(lag, 0.0, 0))
            scenario.baselines[0].samples.append(Sample(float(ARCHIVE_TIMEOUT), 0.0, 0))
            log(f"    archive lag, {'pg_switch_wal()' if switch else 'archive_timeout'}, round {index + 1}: "
                f"{lag:.2f}s")
    moment = servers.recovery_target(url)
    log(f"  restoring to {moment}")
    import subprocess

    subprocess.run([str(bench.bin_dir / "pg_dump"), "-Fc", "-f", str(dump_file), "-d", bench.pg_url("bench")],
                   check=True, env=bench.environ)
    def before(database: str) -> None:  # untimed: a fresh target, and the archive caught up with earlier rounds
        bench.fresh(database)
        servers.archive_caught_up(url)

    bench.rounds([
        (restore.opsbook, bench.inv("restore", "--env", "restore", "--from", "bench", "--to-time", moment),
         lambda: before("bench_restore")),
        (local, local_command, lambda: before("bench_local"))])
    dump_file.unlink()
    for name in ("bench_local", "bench_restore"):
        bench.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if split := phase_medians(restore_phases(bench.work / ".ops")):
        restore.notes.append(f"restore --to-time, {size_label}, median seconds per phase (its journal's "
                             f"phase_seconds): {', '.join(f'{name} {seconds:.1f}' for name, seconds in split.items())}")
    return [restore, *lags]


def restore_phases(state_dir: Path) -> list[dict[str, float]]:
    """The `phase_seconds` of each point-in-time restore, from the run journals (JSON lines) in `state_dir`."""
    found = []
    for path in sorted(state_dir.rglob("runs/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            phases = (entry.get("outputs") or {}).get("phase_seconds") if entry.get("event") == "step" else None
            if entry.get("state") == "applied" and isinstance(phases, dict):
                found.append(phases)
    return found


def phase_medians(samples: list[dict[str, float]]) -> dict[str, float]:
    names = list(dict.fromkeys(name for sample in samples for name in sample))
    return {name: statistics.median(sample[name] for sample in samples if name in sample) for name in names}


def assets_scenarios(bench: Bench) -> list[Scenario]:
    count, mean_kb = bench.arguments.assets, bench.arguments.asset_kb
    log(f"assets ({count} objects of ~{mean_kb} KB)")
    total = servers.fill_bucket(bench.s3, APP_BUCKET, count, mean_kb)
    label = f"{count} objects, {total / 1024 / 1024:.0f} MB"
    full = Scenario(f"asset copy, full, {label}", Series("inv backup.assets"), [Series("aws s3 sync")])
    again = Scenario(f"asset copy, nothing new, {label}", Series("inv backup.assets"), [Series("aws s3 sync")])
    sync = [bench.aws, "--endpoint-url", bench.endpoint, "--only-show-errors", "s3", "sync",
            f"s3://{APP_BUCKET}", f"s3://{BACKUP_BUCKET}/sync/"]
    ours = bench.inv("backup.assets", "--env", "bench")
    if "backup.assets" not in bench.available:
        full.notes.append("`inv backup.assets` is not registered in this tree yet: its row is empty")
        for scenario in (full, again):
            bench.rounds([(scenario.baselines[0], sync, None)])
        return [full, again]
    for index in range(bench.arguments.rounds):
        pairs = [(full.opsbook, again.opsbook, ours, BACKUP_PREFIX + "assets/"),
                 (full.baselines[0], again.baselines[0], sync, "sync/")]
        for first, second, command, prefix in pairs if index % 2 == 0 else reversed(pairs):
            servers.empty_prefix(bench.s3, BACKUP_BUCKET, prefix)
            for series in (first, second):
                series.samples.append(run_measured(command, env=bench.environ, cwd=str(bench.work)))
                bench._report(series, series.samples[-1])
    return [full, again]


def startup_scenario(bench: Bench) -> Scenario:
    log("startup")
    scenario = Scenario("start-up (CPU time)", Series("inv --list"), [Series('python -c "import invoke"')], cpu=True)
    bench.rounds([(scenario.opsbook, bench.inv("--list"), None),
                  (scenario.baselines[0], [sys.executable, "-c", "import invoke"], None)])
    return scenario


# -- report ---------------------------------------------------------------------

def rows(scenarios: list[Scenario]) -> list[dict[str, Any]]:
    table = []
    for scenario in scenarios:
        for baseline in scenario.baselines:
            value = ratio(scenario.opsbook, baseline, cpu=scenario.cpu)
            target = scenario.target(baseline.label)
            stored = (scenario.opsbook.stored_bytes / baseline.stored_bytes
                      if scenario.opsbook.stored_bytes and baseline.stored_bytes else None)
            rss = scenario.opsbook.peak_rss_mb if scenario.opsbook.samples and not scenario.measured else None
            table.append({
                "scenario": scenario.name, "baseline": baseline.label,
                "opsbook_seconds": None if scenario.opsbook.failed else seconds(scenario.opsbook, scenario.cpu),
                "opsbook_range": spread(scenario.opsbook, scenario.cpu),
                "baseline_seconds": None if baseline.failed else seconds(baseline, scenario.cpu),
                "baseline_range": spread(baseline, scenario.cpu),
                "ratio": value, "target": target, "information": scenario.information(baseline.label),
                "meets_target": None if value is None or target is None else value <= target,
                "opsbook_rss_mb": rss, "rss_target_mb": scenario.rss_target_mb,
                "meets_rss_target": None if rss is None or scenario.rss_target_mb is None
                else rss <= scenario.rss_target_mb,
                "baseline_rss_mb": baseline.peak_rss_mb if baseline.samples and not scenario.measured else None,
                "stored_ratio": stored, "notes": scenario.notes})
    return table


def seconds(series: Series, cpu: bool) -> float:
    return series.median_cpu_seconds if cpu else series.median_seconds


def spread(series: Series, cpu: bool) -> list[float] | None:
    """[min, max] over the rounds, so a reader sees the noise around the median."""
    if series.failed:
        return None
    values = [sample.cpu_seconds if cpu else sample.seconds for sample in series.samples]
    return [min(values), max(values)]


def markdown(table: list[dict[str, Any]]) -> str:
    def number(value: float | None, pattern: str) -> str:
        return "—" if value is None else pattern.format(value)

    def timed(median: float | None, extremes: list[float] | None) -> str:
        if median is None or extremes is None:
            return "—"
        return f"{median:.2f} s ({extremes[0]:.2f}–{extremes[1]:.2f})"

    verdict = {True: "ok", False: "MISSED", None: "?"}
    lines = ["| scenario | baseline | opsbook median (min–max) | baseline median (min–max) | ratio | target "
             "| opsbook peak RSS | baseline peak RSS | stored size ratio |", "|" + " --- |" * 9]
    for row in table:
        target = "information, no target" if row["information"] else (
            "" if row["target"] is None else f"≤ {row['target']:.2f} {verdict[row['meets_target']]}")
        rss = number(row["opsbook_rss_mb"], "{:.0f} MB")
        if row["rss_target_mb"] is not None and row["opsbook_rss_mb"] is not None:
            rss += f" (≤ {row['rss_target_mb']} {verdict[row['meets_rss_target']]})"
        baseline = row["baseline"].replace("|", "\\|")  # a shell pipe inside a Markdown cell
        lines.append(
            f"| {row['scenario']} | {baseline} | {timed(row['opsbook_seconds'], row['opsbook_range'])} | "
            f"{timed(row['baseline_seconds'], row['baseline_range'])} | {number(row['ratio'], '{:.2f}')} | "
            f"{target} | {rss} | {number(row['baseline_rss_mb'], '{:.0f} MB')} | "
            f"{number(row['stored_ratio'], '{:.2f}')} |")
    notes = sorted({note for row in table for note in row["notes"]})
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="750", help="database sizes in MB, comma separated (default 750)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="runs of each command (default 5); medians with min and max are reported")
    parser.add_argument("--assets", type=int, default=1000, help="objects in the app bucket (default 1000)")
    parser.add_argument("--asset-kb", type=int, default=100, help="their mean size in KB (default 100)")
    parser.add_argument("--compression-level", type=int, default=1, help="backups.compression_level")
    parser.add_argument("--only", default="backup,restore,assets,startup,pitr", help="scenarios to run")
    parser.add_argument("--tasks-root", default=str(servers.REPOSITORY), help="where tasks.py is")
    parser.add_argument("--json", action="store_true", help="print every sample as JSON on stdout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    sizes = sorted(int(size) for size in arguments.sizes.split(","))
    only = set(arguments.only.split(","))
    scenarios: list[Scenario] = []
    with tempfile.TemporaryDirectory(prefix="opsbook-bench-") as scratch, servers.postgres() as server, \
            servers.moto_server(Path(scratch) / "moto.log") as endpoint, \
            servers.moto_server(Path(scratch) / "moto-copy.log") as copy_endpoint:
        work = Path(scratch)
        bench = Bench(arguments, work, server, endpoint, copy_endpoint)
        bench.write_inventory()
        for bucket in (APP_BUCKET, BACKUP_BUCKET, USERS_BUCKET):
            bench.s3.create_bucket(Bucket=bucket)
        bench.copy_s3.create_bucket(Bucket=COPY_BUCKET)
        bench.psql('CREATE DATABASE "bench"')
        label = ""
        for size in sizes if only & {"backup", "restore", "pitr"} else []:
            log(f"filling the database to {size} MB")
            actual = servers.fill_database(server.url("bench").reveal(), size, log)
            label = f"{actual / 1024 / 1024:.0f} MB database"
            if "backup" in only:
                scenarios += backup_scenario(bench, label)
            if "restore" in only:
                scenarios.append(restore_scenario(bench, label))
        if "assets" in only:
            scenarios += assets_scenarios(bench)
        if "startup" in only:
            scenarios.append(startup_scenario(bench))
        if "pitr" in only:  # last: the cluster archives from then on; at the largest size
            scenarios += pitr_scenarios(bench, label)
    table = rows(scenarios)
    print(markdown(table), file=sys.stderr if arguments.json else sys.stdout)
    if arguments.json:
        print(json.dumps({"rows": table, "rss_target_mb": RSS_TARGET_MB, "series": [
            {"scenario": s.name, "opsbook": s.opsbook.to_json(), "baselines": [b.to_json() for b in s.baselines]}
            for s in scenarios]}, indent=2))
    return 1 if any(s.opsbook.failed and s.opsbook.samples for s in scenarios) else 0


if __name__ == "__main__":
    sys.exit(main())
