"""Run a command, measure its wall time and the peak RSS of its process tree; medians and ratios."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field


@dataclass
class Sample:
    seconds: float
    peak_rss_mb: float  # the largest single process of the tree (Linux ru_maxrss semantics)
    exit_code: int
    error: str = ""
    cpu_seconds: float = 0.0  # user + system of the whole tree


@dataclass
class Series:
    """Every sample of one command in one scenario."""

    label: str
    samples: list[Sample] = field(default_factory=list)
    stored_bytes: int | None = None

    @property
    def failed(self) -> bool:
        return any(sample.exit_code != 0 for sample in self.samples) or not self.samples

    @property
    def median_seconds(self) -> float:
        return statistics.median(sample.seconds for sample in self.samples)

    @property
    def median_cpu_seconds(self) -> float:
        return statistics.median(sample.cpu_seconds for sample in self.samples)

    @property
    def peak_rss_mb(self) -> float:
        return max(sample.peak_rss_mb for sample in self.samples)

    def first_error(self) -> str:
        return next((sample.error for sample in self.samples if sample.exit_code != 0), "")

    def to_json(self) -> dict:
        return {"label": self.label, "failed": self.failed, "stored_bytes": self.stored_bytes,
                "median_seconds": None if self.failed else round(self.median_seconds, 3),
                "peak_rss_mb": None if not self.samples else round(self.peak_rss_mb, 1),
                "samples": [{"seconds": round(s.seconds, 3), "cpu_seconds": round(s.cpu_seconds, 3),
                             "peak_rss_mb": round(s.peak_rss_mb, 1), "exit_code": s.exit_code}
                            for s in self.samples]}


def gnu_time() -> str | None:
    """GNU time, when installed: it forks from a tiny process, so the peak RSS it reports is the
    command's own. A child forked from this (large) Python process would report our size too,
    since Linux keeps the pre-exec high-water mark in ru_maxrss."""
    path = shutil.which("time", path="/usr/bin:/bin:/usr/local/bin")
    if path is None:
        return None
    probe = subprocess.run([path, "-f", "%M", "true"], capture_output=True, text=True, check=False)
    return path if probe.returncode == 0 and probe.stderr.strip().isdigit() else None


TIME = gnu_time()


def run_measured(command: list[str] | str, *, env: dict[str, str], cwd: str | None = None) -> Sample:
    """Wall time and peak RSS of `command` (a string runs under bash with pipefail).

    The peak RSS is the largest single process of the tree (ru_maxrss covers the
    waited-for descendants), e.g. aws or pg_dump in a pipeline."""
    if isinstance(command, str):
        command = ["bash", "-o", "pipefail", "-c", command]
    with tempfile.TemporaryFile() as errors, tempfile.NamedTemporaryFile("r") as rss:
        wrapped = [TIME, "-q", "-f", "%M", "-o", rss.name, *command] if TIME else command
        started = time.perf_counter()
        process = subprocess.Popen(wrapped, stdout=subprocess.DEVNULL, stderr=errors, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        errors.seek(0)
        tail = errors.read()[-2000:].decode(errors="replace")
        reported = rss.read().strip().splitlines()
    peak_kb = int(reported[-1]) if TIME and reported and reported[-1].isdigit() else usage.ru_maxrss
    return Sample(seconds, peak_kb / 1024, process.returncode, tail if process.returncode else "",
                  cpu_seconds=usage.ru_utime + usage.ru_stime)


def ratio(numerator: Series, denominator: Series, *, cpu: bool = False) -> float | None:
    """Of the median wall times, or with `cpu` of the median CPU times."""
    if numerator.failed or denominator.failed:
        return None
    top, bottom = ((numerator.median_cpu_seconds, denominator.median_cpu_seconds) if cpu
                   else (numerator.median_seconds, denominator.median_seconds))
    return top / bottom if bottom else None
