"""Pings to a dead man's switch (the healthchecks.io protocol) around every task run.

`<url>/start` when a run starts, `<url>` when it succeeds, `<url>/<exit code>` when it fails
(`<url>/fail` when the code is not known), each a POST with a short text body: the job,
the environment, the run id, the outcome. A `rid` query parameter pairs a start with its end.
Any push monitor that accepts these URLs works the same.

The URL comes from the environment's `monitor:` section: `monitor.jobs.<task>` for that task
(`false` turns it off), else `monitor.url` for the jobs a schedule runs (SCHEDULED_JOBS). A ping
URL is a credential: only its scheme and host are ever shown. A ping that cannot be delivered
(after one retry) warns in one line; it never fails the run or changes its exit code. Dry runs
do not ping.
"""

from __future__ import annotations

import socket
import time
import urllib.error
from dataclasses import field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from ops import __version__, ids, inventory, web
from ops.errors import InventoryError, OpsError
from ops.inventory_checks import url_problem
from ops.journal import host_name, new_run_id, operator_name
from ops.lazy_dataclasses import dataclass
from ops.output import Output
from ops.secrets import Secret, redact

if TYPE_CHECKING:
    from ops.inventory import Environment

# what `monitor.url` covers: the jobs a schedule runs unattended (an operator's `inv backup.list` is no proof of life)
SCHEDULED_JOBS = frozenset({"backup", "backup.verify", "backup.assets", "backup.check", "drill.due", "keys.status"})
DEFAULT_TIMEOUT = 5.0  # seconds per attempt: a slow monitor must not hold up a backup
DEFAULT_RETRIES = 1
RETRY_PAUSE = 0.5
DETAIL_LIMIT = 300
OUTCOMES = {0: "succeeded", 1: "failed", 2: "refused (usage, inventory or confirmation)", 3: "check failed",
            75: "not run (lock held)", 130: "interrupted"}


@dataclass(frozen=True)
class Monitor:
    """Where an environment's job pings go, with their timeout and retries."""

    url: Secret
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES


@dataclass
class Ping:
    """One task run being reported: its start was sent, its end will be."""

    job: str
    env: str
    monitor: Monitor
    run_id: str = field(default_factory=new_run_id)
    rid: str = field(default_factory=ids.uuid4)
    started: float = field(default_factory=time.monotonic)
    run_id_claimed: bool = False


_active: list[Ping] = []  # the runs being pinged, innermost last


def monitor_for(env: Environment, job: str) -> Monitor | None:
    """The monitor of `job` in `env`, or None when it has none (InventoryError when its URL cannot be resolved)."""
    section = env.raw("monitor", None)
    if not isinstance(section, dict):
        return None
    jobs = section.get("jobs") or {}
    chosen = jobs[job] if job in jobs else section.get("url") if job in SCHEDULED_JOBS else None
    if chosen is None or chosen is False:
        return None
    url = inventory.as_secret(inventory.resolve(chosen))
    problem = url_problem(url.reveal(), ("https", "http"))
    if problem:
        raise InventoryError(f"envs.{env.name}.monitor ({job}): {problem}", where=env.inventory.location(
            f"envs.{env.name}.monitor"), hint="set the ping URL your monitor shows (https://hc-ping.com/…)")
    return Monitor(url, float(section.get("timeout") or DEFAULT_TIMEOUT),
                   int(section.get("retries", DEFAULT_RETRIES)))


def shown(url: Secret | str) -> str:
    """The URL as it may be printed: scheme and host; the path (the credential) and any user:password left out."""
    parts = urlsplit(url.reveal() if isinstance(url, Secret) else url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}/…"


def ping_url(url: str, suffix: str, rid: str) -> str:
    """`url` + `suffix` (`/start`, `/3`, `/fail`, or nothing) with `rid=` added to its query."""
    parts = urlsplit(url)
    query = "&".join(item for item in (parts.query, urlencode({"rid": rid})) if item)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + suffix, query, ""))


def suffix_for(code: int | None) -> str:
    if code == 0:
        return ""
    return f"/{code}" if code is not None else "/fail"


def prepare(job: str | None, arguments: dict[str, Any]) -> Ping | None:
    """The ping of a task run that has a monitor; None when nothing is pinged (no job, no monitor, a dry run,
    or an inventory the task itself will refuse)."""
    if not job or arguments.get("dry_run"):
        return None
    try:
        env = inventory.load().environment(arguments.get("env"))
    except OpsError:
        return None  # the task reports what is wrong with the inventory
    try:
        monitor = monitor_for(env, job)
    except OpsError as error:
        Output().warn(f"{job} on {env.name} is not pinged: {error.message}")
        return None
    if monitor is None:
        return None
    ping = Ping(job, env.name, monitor)
    _active.append(ping)
    return ping


def start(ping: Ping | None) -> None:
    """Sends `/start`. An interrupt meanwhile propagates: the run stops, and its end is still pinged (130)."""
    if ping is not None:
        by = f"{operator_name()}@{host_name()}"
        deliver(ping, "/start", f"opsbook {ping.job} on {ping.env}: started (run {ping.run_id} by {by})", start=True)


def claim_run_id() -> str | None:
    """The pinged run's id, for the first runbook the task runs (so the journal and the pings name the same run)."""
    ping = _active[-1] if _active else None
    if ping is None or ping.run_id_claimed:
        return None
    ping.run_id_claimed = True
    return ping.run_id


def finish(ping: Ping | None, code: int | None, detail: str = "") -> None:
    """Sends the end of the run: success, or its exit code; never raises."""
    if ping is None:
        return
    if ping in _active:
        _active.remove(ping)
    outcome = OUTCOMES.get(code, "failed") if code is not None else "ended without an exit code"
    seconds = time.monotonic() - ping.started
    body = (f"opsbook {ping.job} on {ping.env}: {outcome} (exit {code if code is not None else '?'}) after "
            f"{seconds:.1f} s (run {ping.run_id} by {operator_name()}@{host_name()})")
    if detail:
        text = redact(" ".join(detail.split()))
        body += "\n" + (text[:DETAIL_LIMIT] + "…" if len(text) > DETAIL_LIMIT else text)
    try:
        deliver(ping, suffix_for(code), body)
    except KeyboardInterrupt:
        Output().warn(f"the end of {ping.job} on {ping.env} was not pinged: interrupted")


def deliver(ping: Ping, suffix: str, body: str, *, start: bool = False) -> bool:
    """POST the ping, retried once; a failure is one warning line. An interrupt propagates (the run stops)."""
    monitor = ping.monitor
    request = web.request(ping_url(monitor.url.reveal(), suffix, ping.rid), data=redact(body).encode(),
                                     method="POST", headers={"Content-Type": "text/plain; charset=utf-8",
                                                             "User-Agent": f"opsbook/{__version__}"})
    reason = "not attempted"
    for attempt in range(monitor.retries + 1):
        try:
            with web.urlopen(request, timeout=monitor.timeout) as response:
                response.read()
            return True
        except urllib.error.HTTPError as error:
            reason = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:  # refused, unknown host, TLS, timeout
            cause = getattr(error, "reason", error)
            reason = "timed out" if isinstance(cause, (TimeoutError, socket.timeout)) else f"no answer ({cause})"
        if attempt < monitor.retries:
            time.sleep(RETRY_PAUSE)  # one short pause before the retry: a blip, not an outage
    what = "start" if start else "end"
    Output().warn(f"could not ping the monitor of {ping.job} on {ping.env} at {shown(monitor.url)} ({what}): "
                  f"{reason} after {monitor.retries + 1} attempt(s); the run goes on")
    return False
