"""The steps of deploy.push-env / deploy.restart / deploy.rollback: app hosts' configuration, restarts, releases.

- push-env renders ops/templates/app.env.j2 per host and writes it atomically (0600, the
  previous file kept as `<env_file>.prev`); an unchanged file is left alone.
- restart restarts the hosts in batches, each gated on its health and ready URLs,
  and stops once more hosts failed than --max-fail allows.
- rollback points every host's `current` at the previous release, then restarts rolling;
  it warns when the database has migrations that release does not know.

Steps read the inventory, the secret store and the hosts when they check, never
when they are built: a step built before a secret changed writes the new value.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import TYPE_CHECKING, Any

from ops import migrations, pg
from ops.engine import Change, RunContext, Step
from ops.envfile import masked_diff, render_env_file
from ops.errors import CheckFailed, OpsError, StepFailed, UsageError
from ops.health_probes import app_url_probes
from ops.platforms import register
from ops.rollout import (
    build_switch_command,
    health_timeout,
    host_named,
    list_dirs,
    newer_migrations,
    probe_once,
    read_host_state,
    release_name,
    required_app_setting,
    restart_host,
    roll,
)
from ops.rollout import health_gate as gate
from ops.rollout import rollback_target as choose
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.checks import Probe
    from ops.hosts import HostConfig, HostConnection
    from ops.inventory import Environment

ENV_FILE_MODE = 0o600
DEFAULT_MIGRATIONS_DIR = "prisma/migrations"
PROGRESS = "restart:progress"  # ctx.state key: host outcomes so far, for the report of a failed run


# --- push-env --------------------------------------------------------------------------------


class PushEnvStep(Step):
    """Write one host's env file when the rendered text differs from the file there.

    No undo: a later failure (say, a host failing its restart) must not take the new file
    away from hosts already running with it. `<env_file>.prev` is there to go back by hand.
    """

    def __init__(self, host_name: str):
        self.host_name = host_name
        self.name = f"push-env-{host_name}"
        self.title = f"write the app env file on {host_name}"

    def _target(self, ctx: RunContext) -> tuple[HostConnection, str]:
        path = required_app_setting(ctx.env, self.host_name, "env_file")
        return ctx.host(host_named(ctx.env, self.host_name)), path

    def check(self, ctx: RunContext) -> Change | None:
        connection, path = self._target(ctx)
        rendered = render_env_file(ctx.env, self.host_name)
        current = connection.read_text(path)
        if current == rendered:
            mode = connection.file_mode(path)
            if mode == ENV_FILE_MODE:
                return None
            return Change(f"set mode 0600 on {path} on {self.host_name} (now {mode:04o})", data={"mode_only": True})
        diff = masked_diff(current, rendered)
        changed = sum(1 for line in diff if line[:2] in {"+ ", "- ", "~ "})
        verb = "create" if current is None else f"update ({changed} variable(s) differ; previous kept as .prev)"
        return Change(f"{verb} {path} on {self.host_name}", details=diff, data={"existed": current is not None})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        connection, path = self._target(ctx)
        if change.data.get("mode_only"):
            connection.chmod(path, ENV_FILE_MODE)
            return {"host": self.host_name, "path": path, "mode": "0600"}
        rendered = render_env_file(ctx.env, self.host_name)
        connection.write_text_atomic(path, rendered, mode=ENV_FILE_MODE, keep_previous=f"{path}.prev")
        return {"host": self.host_name, "path": path, "sha256": hashlib.sha256(rendered.encode()).hexdigest()}

    def checklist_line(self) -> str:
        return f"{self.title} (rendered from ops/templates/app.env.j2; mode 0600; previous kept as .prev)"


def push_env_steps(env: Environment) -> list[Step]:
    """One step per host: write its rendered env file when it differs."""
    return [PushEnvStep(host.name) for host in env.host_configs()]


# --- restart ---------------------------------------------------------------------------------


class RestartStep(Step):
    """Rolling restart: batches of hosts, each gated on health + ready; stops past `max_fail` failures."""

    name = "restart"

    def __init__(self, *, batch: int = 1, max_fail: int = 0, always: bool = False):
        if int(batch) < 1 or int(max_fail) < 0:
            raise UsageError(f"--batch must be 1 or more and --max-fail 0 or more (got {batch} and {max_fail})")
        self.batch = int(batch)
        self.max_fail = int(max_fail)
        self.always = always
        self.title = (f"rolling restart, {self.batch} host(s) at a time, each gated on its health and ready URLs; "
                      f"stop after {self.max_fail} failure(s)")

    def check(self, ctx: RunContext) -> Change | None:
        hosts = ctx.env.host_configs()
        reasons = {host.name: reason for host in hosts if (reason := self._reason(ctx, host))}
        if not reasons:
            return None
        names = list(reasons)
        timeout = health_timeout(ctx.env)
        summary = (f"restart {', '.join(names)} ({len(names)} of {len(hosts)} host(s), {self.batch} at a time, "
                   f"each healthy within {timeout:g} s)")
        return Change(summary, details=[f"{name}: {reason}" for name, reason in reasons.items()],
                      data={"hosts": names})

    def _reason(self, ctx: RunContext, host: HostConfig) -> str | None:
        app = ctx.env.app_settings(host.name)
        if not app.get("restart"):
            raise ctx.env.missing("app.restart")
        if self.always:
            return "restart requested"
        if ctx.pending(f"push-env-{host.name}"):
            return "its env file is about to change"
        if ctx.pending(f"switch-release-{host.name}"):
            return "its current release is about to switch"
        connection = ctx.host(host)
        stale = read_host_state(connection, app).restart_reason()
        if stale:
            return stale
        problem = probe_once(connection, app)
        return f"not healthy: {problem}" if problem else None

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        progress: list[dict[str, Any]] = ctx.state.setdefault(PROGRESS, [])

        def restart_one(name: str):
            return restart_host(host_named(ctx.env, name), ctx.env.app_settings(name),
                                timeout=health_timeout(ctx.env, name), run_id=ctx.run_id)

        def report(outcome) -> None:
            progress.append(outcome.to_json())
            ctx.journal.write("host", **outcome.to_json())
            status = {"restarted": "pass", "failed": "fail"}.get(outcome.status, "skip")
            ctx.output.check(status, f"{outcome.host}: {outcome.status}", outcome.detail)

        outcomes = roll(change.data["hosts"], batch=self.batch, max_fail=self.max_fail,
                        restart_one=restart_one, report=report)
        failed = [o for o in outcomes if o.status == "failed"]
        if len(failed) > self.max_fail:
            raise StepFailed(_stopped_message(outcomes, self.max_fail),
                             hint="fix the failing host(s) (`inv health`, the app's log), then run "
                                  f"`inv deploy.restart --env {ctx.env.name}` again")
        if failed:
            ctx.output.warn(f"{len(failed)} host(s) failed but within --max-fail {self.max_fail}: "
                            + "; ".join(f"{o.host}: {o.detail}" for o in failed))
        return {"hosts": [o.to_json() for o in outcomes]}

    def verify(self, ctx: RunContext) -> None:
        """The hosts restarted in this run still answer health and ready."""
        outcomes = (ctx.state.get(self.name) or {}).get("hosts", [])
        for outcome in (o for o in outcomes if o["status"] == "restarted"):
            host = host_named(ctx.env, outcome["host"])
            problem = probe_once(ctx.host(host), ctx.env.app_settings(host.name))
            if problem:
                raise StepFailed(f"host {host.name} stopped answering after its restart: {problem}", where=host.name)

    def checklist_line(self) -> str:
        if self.always:
            return f"{self.title} (every host)"
        return f"{self.title} (hosts whose env file or release changed since their last restart, or unhealthy)"


def _stopped_message(outcomes: list[Any], max_fail: int) -> str:
    failed = [o for o in outcomes if o.status == "failed"]
    skipped = [o.host for o in outcomes if o.status == "not attempted"]
    lines = [f"the rollout stopped: {len(failed)} host(s) failed, more than --max-fail {max_fail} allows"]
    lines += [f"  {o.host}: {o.detail}" for o in failed]
    restarted = [o.host for o in outcomes if o.status == "restarted"]
    if restarted:
        lines.append(f"  restarted and healthy: {', '.join(restarted)}")
    if skipped:
        lines.append(f"  not attempted: {', '.join(skipped)}")
    return "\n".join(lines)


def restart_step(env: Environment, *, batch: int = 1, max_fail: int = 0, always: bool = False) -> Step:
    """Rolling restart of the hosts that need it (all with always=True), gated on health + ready."""
    return RestartStep(batch=batch, max_fail=max_fail, always=always)


def health_gate(env: Environment, host: HostConfig, timeout: float) -> None:
    """CheckFailed naming the host and URL unless health and ready answer 200 within `timeout` s."""
    gate(env, host, timeout)


# --- rollback --------------------------------------------------------------------------------


class SwitchReleaseStep(Step):
    """Point one host's `current` at the rollback target, atomically (new link renamed over)."""

    def __init__(self, host_name: str, release: str | None = None):
        self.host_name = host_name
        self.release = release
        self.name = f"switch-release-{host_name}"
        self.title = f"point current on {host_name} at the {release or 'previous'} release"

    def _app_dir(self, ctx: RunContext) -> str:
        return required_app_setting(ctx.env, self.host_name, "dir")

    def _connection(self, ctx: RunContext) -> HostConnection:
        return ctx.host(host_named(ctx.env, self.host_name))

    def _current(self, ctx: RunContext) -> str | None:
        return release_name(self._connection(ctx).readlink(posixpath.join(self._app_dir(ctx), "current")))

    def check(self, ctx: RunContext) -> Change | None:
        target = self.release or rollback_target(ctx)
        current = self._current(ctx)
        if current == target:
            return None
        warning = schema_warning(ctx, target)
        summary = f"switch current on {self.host_name} from {current or 'nothing'} to {target}"
        if warning:
            summary += f" (warning: {warning})"
        return Change(summary, details=[f"warning: {warning}"] if warning else [],
                      data={"from": current, "to": target})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        self._connection(ctx).run(build_switch_command(self._app_dir(ctx), change.data["to"]), timeout=30)
        return {"host": self.host_name, "from": change.data["from"], "to": change.data["to"]}

    def verify(self, ctx: RunContext) -> None:
        expected = (ctx.state.get(self.name) or {}).get("to")
        current = self._current(ctx)
        if expected is None or current != expected:
            raise StepFailed(f"current on {self.host_name} points to {current or 'nothing'}, "
                             f"not {expected or 'the target release'}", where=self.host_name)

    def undo(self, ctx: RunContext, change: Change) -> None:
        if change.data.get("from"):
            self._connection(ctx).run(build_switch_command(self._app_dir(ctx), change.data["from"]), timeout=30)


def rollback_target(ctx: RunContext) -> str:
    """The release every host goes back to, decided once per run from all hosts' `current`."""
    return ctx.once("rollback:target", lambda: _choose_rollback_target(ctx))


def _choose_rollback_target(ctx: RunContext) -> str:
    currents: dict[str, str | None] = {}
    releases: dict[str, list[str]] = {}
    for host in ctx.env.host_configs():
        app_dir = required_app_setting(ctx.env, host.name, "dir")
        connection = ctx.host(host)
        listed = list_dirs(connection, posixpath.join(app_dir, "releases"))
        if listed is None:
            raise CheckFailed(f"host {host.name} has no {app_dir}/releases directory: deploy.rollback needs the "
                              "releases layout (releases/<id> and a `current` symlink)", where=host.name,
                              hint="deploy releases into <app.dir>/releases/<id> and point <app.dir>/current at one")
        releases[host.name] = listed
        currents[host.name] = release_name(connection.readlink(posixpath.join(app_dir, "current")))
    target = choose(currents, releases)
    if target is None:
        on = ", ".join(f"{name}: {current or 'no current link'}" for name, current in currents.items())
        raise CheckFailed(f"no previous release to roll back to ({on})",
                          hint="nothing older is deployed under releases/; to go to a given release, pass --release")
    return target


def schema_warning(ctx: RunContext, release: str) -> str | None:
    """A warning when the database has applied migrations that `release` does not contain; once per run."""
    def warn_once() -> str | None:
        warning = _schema_warning(ctx, release)
        if warning:
            ctx.output.warn(warning)
        return warning

    return ctx.once(f"rollback:warning:{release}", warn_once)


def _schema_warning(ctx: RunContext, release: str) -> str | None:
    env = ctx.env
    if not env.has("database.url") or not env.host_configs():
        return None
    host = env.host_configs()[0]
    app = env.app_settings(host.name)
    folder = posixpath.join(str(app["dir"]), "releases", release,
                            str((app.get("migrations") or {}).get("dir") or DEFAULT_MIGRATIONS_DIR))
    try:
        known = list_dirs(ctx.host(host), folder) or []
        applied = _applied_migrations(ctx)
    except OpsError as error:  # a rollback during an outage must not wait on the database
        return f"could not compare the database schema with release {release}: {redact(error.message)}"
    newer = newer_migrations(applied, known)
    if not newer:
        return None
    return (f"the database has {len(newer)} migration(s) release {release} does not know "
            f"({', '.join(newer)}); the older code runs against a newer schema, which only works when those "
            "migrations were backward-compatible")


def _applied_migrations(ctx: RunContext) -> list[str]:
    url = ctx.env.database_url(direct=True)
    with pg.connect(url, application_name=ctx.label[:63], autocommit=True, connect_timeout=5) as connection:
        migrations.use_prisma_schema(connection, url)
        rows = migrations.read_applied(connection)
    return [row.migration_name for row in rows if row.finished_at is not None and row.rolled_back_at is None]


def rollback_steps(env: Environment, *, release: str | None = None, batch: int = 1, max_fail: int = 0) -> list[Step]:
    """Switch every host's `current` to the previous release (or `release`), then a rolling restart."""
    steps: list[Step] = [SwitchReleaseStep(host.name, release) for host in env.host_configs()]
    return [*steps, restart_step(env, batch=batch, max_fail=max_fail)]


# --- the platform ----------------------------------------------------------------------------


class Ssh:
    """App hosts over SSH: env files, restarts and the releases layout (the default platform)."""

    name = "ssh"
    describe = "hosts over SSH: push-env writes each host's env file, restart restarts them rolling, " \
               "rollback switches `current` to the previous release"

    def require(self, env: Environment) -> None:
        if not env.host_configs():
            raise env.missing("hosts")

    def push_env_steps(self, env: Environment) -> list[Step]:
        return push_env_steps(env)

    def restart_step(self, env: Environment, *, batch: int = 1, max_fail: int = 0, always: bool = False) -> Step:
        return restart_step(env, batch=batch, max_fail=max_fail, always=always)

    def rollback_steps(self, env: Environment, *, release: str | None = None, batch: int = 1,
                       max_fail: int = 0) -> list[Step]:
        return rollback_steps(env, release=release, batch=batch, max_fail=max_fail)

    def probes(self, env: Environment) -> list[tuple[str, Probe]]:
        return [probe for host in env.host_configs() for probe in app_url_probes(env, host)]


register(Ssh())
