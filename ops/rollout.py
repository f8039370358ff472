"""Rolling restarts gated on the app's health and ready URLs, and the releases layout.

Releases layout on a host: `<app.dir>/releases/<id>/` and `<app.dir>/current`, a
symlink to one of them. Release ids sort in deploy order (timestamps), so the
previous release is the one before the current one in sorted order.

Whether a host needs a restart: opsbook writes `<app.dir>/.opsbook-restart.json`
after each gated restart, recording the sha256 of the env file and the release
the app was started with. A host whose env file or `current` link differs from
that record (or that has none) runs an app older than its configuration.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import secrets
import shlex
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ops.clock import iso_z_micro, utc_now
from ops.errors import CheckFailed, InventoryError, OpsError
from ops.hosts import connect, fetch_from_here, is_on_host
from ops.lazy_dataclasses import dataclass
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.hosts import HostConfig, HostConnection
    from ops.inventory import Environment

RESTART_MARKER = ".opsbook-restart.json"
DEFAULT_HEALTH_TIMEOUT = 30.0
POLL_SECONDS = 0.25  # interval between two probes of a readiness gate
SINGLE_PROBE_TIMEOUT = 5.0
NO_RELEASES = 3  # exit code of the listing command when the directory is missing


# --- inventory helpers ---------------------------------------------------------------------


def host_named(env: Environment, name: str) -> HostConfig:
    for host in env.host_configs():
        if host.name == name:
            return host
    raise InventoryError(f"envs.{env.name}.hosts: no host named {name!r}",
                         hint=f"hosts of {env.name}: {', '.join(h.name for h in env.host_configs()) or 'none'}")


def health_timeout(env: Environment, host_name: str | None = None) -> float:
    return float(env.app_settings(host_name).get("health_timeout") or DEFAULT_HEALTH_TIMEOUT)


def required_app_setting(env: Environment, host_name: str, key: str) -> str:
    value = env.app_settings(host_name).get(key)
    if not value:
        raise env.missing(f"app.{key}")
    return str(value)


# --- health gate ---------------------------------------------------------------------------


def fetch(connection: HostConnection, url: str, timeout: float) -> tuple[int, str]:
    """URLs on the host's loopback are fetched on the host itself, others from here."""
    return connection.fetch_url(url, timeout=timeout) if is_on_host(url) else fetch_from_here(url, timeout)


def gate_urls(app: dict[str, Any]) -> list[str]:
    return [str(app[kind]) for kind in ("health_url", "ready_url") if app.get(kind)]


def probe_once(connection: HostConnection, app: dict[str, Any],
               timeout: float = SINGLE_PROBE_TIMEOUT) -> str | None:
    """None when every gate URL answers 200, else why not (`URL: HTTP 503 …`)."""
    for url in gate_urls(app):
        status, body = fetch(connection, url, timeout)
        if status != 200:
            return describe_answer(url, status, body)
    return None


def describe_answer(url: str, status: int, body: str) -> str:
    answer = f"HTTP {status}" if status else "no answer"
    detail = " ".join(body.split())[:200]
    return redact(f"{url}: {answer}" + (f" {detail}" if detail else ""))


def gate_on(connection: HostConnection, app: dict[str, Any], timeout: float) -> float:
    """Wait until health and ready both answer 200; seconds waited. CheckFailed naming host + URL."""
    began = time.monotonic()
    deadline = began + timeout
    while True:
        remaining = max(deadline - time.monotonic(), 0.5)
        reason = probe_once(connection, app, timeout=min(SINGLE_PROBE_TIMEOUT, remaining))
        if reason is None:
            return time.monotonic() - began
        if time.monotonic() >= deadline:
            host = connection.host
            raise CheckFailed(f"host {host.name}: not healthy within {timeout:g} s: {reason}",
                              where=host.name,
                              hint=f"look at the app's log on {host.name} (app.log_command); "
                                   "`inv health` shows every host")
        time.sleep(POLL_SECONDS)


def health_gate(env: Environment, host: HostConfig, timeout: float) -> None:
    """Raise CheckFailed unless host's health_url and ready_url answer 200 within `timeout` seconds."""
    with connect(host) as connection:
        gate_on(connection, env.app_settings(host.name), timeout)


# --- what the running app was started with -------------------------------------------------


@dataclass(frozen=True)
class HostState:
    """What the app on one host was started with: its env file's digest, its release."""

    env_sha256: str | None  # of the env file now on the host
    release: str | None  # where `current` points now
    marker: dict[str, Any] | None  # what the app was last started with by opsbook

    def restart_reason(self) -> str | None:
        return restart_reason(self.marker, self.env_sha256, self.release)


def restart_reason(marker: dict[str, Any] | None, env_sha256: str | None, release: str | None) -> str | None:
    """Why the running app is older than its configuration, or None when it is not."""
    if marker is None:
        return "no restart by opsbook on record" if (env_sha256 or release) else None
    if marker.get("env_sha256") != env_sha256:
        return "the env file changed since the app was started"
    if marker.get("release") != release:
        return f"current points to {release or 'nothing'} but the app was started on {marker.get('release')}"
    return None


def marker_path(app: dict[str, Any]) -> str | None:
    directory = app.get("dir") or (posixpath.dirname(str(app["env_file"])) if app.get("env_file") else None)
    return posixpath.join(str(directory), RESTART_MARKER) if directory else None


def release_name(link: str | None) -> str | None:
    return posixpath.basename(link.rstrip("/")) if link else None


def read_host_state(connection: HostConnection, app: dict[str, Any]) -> HostState:
    env_text = connection.read_text(str(app["env_file"])) if app.get("env_file") else None
    env_sha256 = hashlib.sha256(env_text.encode()).hexdigest() if env_text is not None else None
    release = release_name(connection.readlink(posixpath.join(app["dir"], "current"))) if app.get("dir") else None
    marker = None
    path = marker_path(app)
    if path:
        text = connection.read_text(path)
        try:
            marker = json.loads(text) if text else None
        except ValueError:
            marker = None  # unreadable: treat as no record, which restarts once and rewrites it
    return HostState(env_sha256, release, marker if isinstance(marker, dict) else None)


def write_marker(connection: HostConnection, app: dict[str, Any], state: HostState, run_id: str) -> None:
    path = marker_path(app)
    if not path:
        return
    record = {"env_sha256": state.env_sha256, "release": state.release, "restarted_at": iso_z_micro(utc_now()),
              "run_id": run_id}
    connection.write_text_atomic(path, json.dumps(record) + "\n", mode=0o644)


# --- rolling restart -----------------------------------------------------------------------


@dataclass
class HostOutcome:
    """How the rolling restart went on one host."""

    host: str
    status: str  # restarted | failed | not attempted
    seconds: float = 0.0
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "status": self.status, "seconds": round(self.seconds, 2), "detail": self.detail}


def batches(items: list[Any], size: int) -> list[list[Any]]:
    size = max(int(size), 1)
    return [items[start:start + size] for start in range(0, len(items), size)]


def roll(names: list[str], *, batch: int, max_fail: int, restart_one: Callable[[str], HostOutcome],
         report: Callable[[HostOutcome], None]) -> list[HostOutcome]:
    """Restart `names` batch by batch (a batch in parallel); stop once failures pass `max_fail`."""
    outcomes: list[HostOutcome] = []
    groups = batches(names, batch)
    for number, group in enumerate(groups):
        with ThreadPoolExecutor(max_workers=len(group)) as pool:
            results = list(pool.map(restart_one, group))
        for outcome in results:
            outcomes.append(outcome)
            report(outcome)
        if sum(o.status == "failed" for o in outcomes) > max_fail:
            for name in (n for rest in groups[number + 1:] for n in rest):
                skipped = HostOutcome(name, "not attempted", detail="the rollout stopped before this host")
                outcomes.append(skipped)
                report(skipped)
            break
    return outcomes


def restart_host(host: HostConfig, app: dict[str, Any], *, timeout: float, run_id: str) -> HostOutcome:
    """Restart one host with `app.restart`, gate it on health + ready, record what it now runs."""
    began = time.monotonic()
    try:
        with connect(host) as connection:
            state = read_host_state(connection, app)  # what the new process will read
            connection.run(str(app["restart"]), timeout=max(60.0, timeout * 2))
            waited = gate_on(connection, app, timeout)
            write_marker(connection, app, state, run_id)
    except OpsError as error:
        detail = redact(error.message).removeprefix(f"host {host.name}: ")
        return HostOutcome(host.name, "failed", time.monotonic() - began, detail)
    gated = "healthy and ready" if gate_urls(app) else "no health_url/ready_url configured: not gated"
    return HostOutcome(host.name, "restarted", time.monotonic() - began, f"{gated} after {waited:.1f}s")


# --- releases ------------------------------------------------------------------------------


def build_list_dirs_command(path: str) -> str:
    """Names of the sub-directories of `path`, one a line; exit 3 when `path` is not a directory."""
    quoted = shlex.quote(path)
    return (f"cd {quoted} 2>/dev/null || exit {NO_RELEASES}; "
            'for entry in */; do [ -d "$entry" ] && printf "%s\\n" "${entry%/}"; done; exit 0')


def build_switch_command(app_dir: str, release: str) -> str:
    """Point `current` at releases/<release> atomically: a new link under a temporary name, renamed over."""
    temporary = f".current.tmp-{secrets.token_hex(4)}"
    target = shlex.quote(f"releases/{release}")
    return (f"cd {shlex.quote(app_dir)} && test -d {target} && ln -s {target} {temporary} && "
            f"{{ mv -T {temporary} current || {{ rm -f {temporary}; exit 1; }}; }}")


def list_dirs(connection: HostConnection, path: str) -> list[str] | None:
    """Sorted sub-directory names, or None when `path` does not exist on the host."""
    result = connection.run(build_list_dirs_command(path), check=False, timeout=30)
    if result.exit_code == NO_RELEASES:
        return None
    if not result.ok:
        connection.run(build_list_dirs_command(path), timeout=30)  # raises StepFailed with the output
    return sorted(line for line in result.stdout.splitlines() if line)


def previous_release(releases: list[str], current: str | None) -> str | None:
    """The release before `current` in sorted order; None when there is none."""
    ordered = sorted(releases)
    if current not in ordered:
        return None
    index = ordered.index(current)
    return ordered[index - 1] if index > 0 else None


def rollback_target(currents: dict[str, str | None], releases: dict[str, list[str]]) -> str | None:
    """One release for every host: the previous one when all agree; when they differ (a rollback or a
    deploy stopped half-way), the oldest current one, so every host ends on the same release."""
    known = {release for release in currents.values() if release}
    if not known:
        return None
    if len(known) > 1:
        return min(known)
    (current,) = known
    every = sorted({name for names in releases.values() for name in names})
    return previous_release(every, current)


def newer_migrations(applied: list[str], in_release: list[str]) -> list[str]:
    """Migrations the database has applied that the release does not contain."""
    return sorted(set(applied) - set(in_release))
