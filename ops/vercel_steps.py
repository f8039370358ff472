"""The app on Vercel (`app.platform: vercel`): push-env, restart and rollback through Vercel's REST API.

- push-env: the rendered env file becomes the project's variables for `app.vercel.target`
  (created, updated, removed; sent as type "encrypted"); the plan shows the masked diff.
- restart: redeploys the current production deployment (new variables take effect only in
  a new build), waits until it is READY, then gates on `app.health_url` / `app.ready_url`.
- rollback: promotes the previous READY production deployment (Vercel's "Promote to
  Production"), waits until it serves, gates on health; warns when the database has
  migrations applied after that deployment was built.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ops import migrations, pg
from ops.engine import Change, RunContext, Step
from ops.envfile import masked_diff, parse_env_file, quote_value, render_env_file
from ops.errors import CheckFailed, OpsError, StepFailed
from ops.hosts import fetch_from_here
from ops.platforms import register
from ops.rollout import describe_answer, gate_urls, health_timeout
from ops.secrets import redact
from ops.vercel import VercelApi, settings

if TYPE_CHECKING:
    from ops.checks import Probe
    from ops.inventory import Environment

POLL_SECONDS = 0.5
BUILD_TIMEOUT_SECONDS = 600.0
FAILED_STATES = {"ERROR", "CANCELED"}


def api(ctx: RunContext) -> VercelApi:
    return ctx.once("vercel:api", lambda: VercelApi(settings(ctx.env)))


# --- push-env --------------------------------------------------------------------------------


def _current_variables(client: VercelApi) -> dict[str, tuple[str, str]]:
    """KEY -> (variable id, decrypted value) of the variables the target sees."""
    target = client.config.target
    return {str(v["key"]): (str(v["id"]), client.env_value(str(v["id"])))
            for v in client.list_env() if target in (v.get("target") or [])}


def _as_text(values: dict[str, str]) -> str:
    return "".join(f"{key}={quote_value(value)}\n" for key, value in values.items())


class VercelPushEnvStep(Step):
    """Make the project's variables for the target equal the rendered env file. No undo, as on hosts."""

    name = "push-env-vercel"

    def __init__(self, target: str):
        self.title = f"set the Vercel project's {target} environment variables"

    def check(self, ctx: RunContext) -> Change | None:
        client = api(ctx)
        current = _current_variables(client)
        wanted = parse_env_file(render_env_file(ctx.env))
        create = [key for key in wanted if key not in current]
        update = [key for key in wanted if key in current and current[key][1] != wanted[key]]
        remove = [key for key in current if key not in wanted]
        if not (create or update or remove):
            return None
        old = _as_text({key: value for key, (_, value) in current.items()}) if current else None
        diff = masked_diff(old, _as_text(wanted))
        summary = (f"set {client.config.where()}'s {client.config.target} variables: {len(create)} to create, "
                   f"{len(update)} to update, {len(remove)} to remove")
        return Change(summary, details=diff, data={"create": create, "update": update, "remove": remove})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        client = api(ctx)
        current = _current_variables(client)
        wanted = parse_env_file(render_env_file(ctx.env))
        for key in change.data["create"]:
            client.create_env(key, wanted[key])
        for key in change.data["update"]:
            client.update_env(current[key][0], wanted[key])
        for key in change.data["remove"]:
            client.delete_env(current[key][0])
        return {name: change.data[name] for name in ("create", "update", "remove")}

    def verify(self, ctx: RunContext) -> None:
        current = _current_variables(api(ctx))
        wanted = parse_env_file(render_env_file(ctx.env))
        differ = sorted(set(current) ^ set(wanted) | {k for k in wanted if k in current and current[k][1] != wanted[k]})
        if differ:
            raise StepFailed(f"the project's variables still differ after the update: {', '.join(differ)}",
                             where=api(ctx).config.where())

    def checklist_line(self) -> str:
        return f"{self.title} (rendered from ops/templates/app.env.j2; sent encrypted; removed keys deleted)"


# --- deployments ---------------------------------------------------------------------------


def production_deployment(client: VercelApi) -> dict[str, Any]:
    """The deployment serving the target now: the project's target pointer, else the newest READY."""
    ready = client.ready_deployments()
    pointer = ((client.project().get("targets") or {}).get(client.config.target) or {}).get("id")
    for deployment in ready:
        if pointer and deployment.get("uid") == pointer:
            return deployment
    if pointer:
        detail = client.deployment(pointer)  # v13's shape: `id`, `createdAt`; the listing's: `uid`, `created`
        return detail | {"uid": pointer, "created": detail.get("createdAt")}
    if not ready:
        raise CheckFailed(f"{client.config.where()} has no READY {client.config.target} deployment",
                          hint="deploy the app once (git push or `vercel --prod`), then run this again")
    return ready[0]


def wait_ready(client: VercelApi, deployment_id: str, timeout: float) -> None:
    """Poll GET /v13/deployments/{id} until READY; StepFailed on ERROR/CANCELED or past `timeout`."""
    deadline = time.monotonic() + timeout
    state = "QUEUED"
    while time.monotonic() < deadline:
        state = str(client.deployment(deployment_id).get("readyState") or "QUEUED")
        if state == "READY":
            return
        if state in FAILED_STATES:
            raise StepFailed(f"deployment {deployment_id} failed to become ready ({state}); production still "
                             "serves the previous deployment", where=client.config.where(),
                             hint="read the deployment's build log in the Vercel dashboard, fix, then run again")
        time.sleep(POLL_SECONDS)
    raise StepFailed(f"deployment {deployment_id} not ready after {timeout:g} s (still {state})",
                     where=client.config.where(), hint="look at the deployment in the Vercel dashboard")


def gate(env: Environment, timeout: float) -> None:
    """health_url and ready_url answer 200 within `timeout` s (fetched from here: they are public)."""
    deadline = time.monotonic() + timeout
    problem = None
    while True:
        problem = probe(env)
        if problem is None or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    if problem:
        raise StepFailed(f"the app is not healthy: {problem}", where=f"envs.{env.name}.app",
                         hint="read the deployment's logs in the Vercel dashboard; `inv deploy.rollback` goes back")


def probe(env: Environment) -> str | None:
    for url in gate_urls(env.app_settings()):
        status, body = fetch_from_here(url)
        if status != 200:
            return redact(describe_answer(url, status, body))
    return None


def build_timeout(env: Environment) -> float:
    return float(env.raw("app.vercel.build_timeout", BUILD_TIMEOUT_SECONDS))


class RedeployStep(Step):
    """Redeploy the current deployment so new variables take effect; wait until ready; gate on health."""

    name = "restart"

    def __init__(self, always: bool):
        self.always = always
        self.title = "redeploy the current deployment, wait until it is ready, check health and ready"

    def check(self, ctx: RunContext) -> Change | None:
        if not self.always and not ctx.pending("push-env-vercel"):
            return None
        current = production_deployment(api(ctx))
        return Change(f"redeploy {current['uid']} ({current.get('url') or 'no url'}) and wait until ready",
                      data={"from": current["uid"], "name": current.get("name") or ""})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        client = api(ctx)
        created = client.redeploy(change.data["from"], change.data["name"])
        deployment_id = str(created.get("id") or created.get("uid"))
        ctx.output.info(f"deployment {deployment_id} building")
        wait_ready(client, deployment_id, build_timeout(ctx.env))
        gate(ctx.env, health_timeout(ctx.env))
        return {"from": change.data["from"], "deployment": deployment_id}

    def verify(self, ctx: RunContext) -> None:
        problem = probe(ctx.env)
        if problem:
            raise StepFailed(f"the app stopped answering after the redeploy: {problem}", where=f"envs.{ctx.env.name}")

    def checklist_line(self) -> str:
        return f"{self.title} (POST /v13/deployments with the current deployment's id)"


class PromoteStep(Step):
    """Promote the previous READY production deployment; undo promotes the one that served before."""

    name = "promote-previous"

    def __init__(self, release: str | None = None):
        self.release = release  # a deployment id (--release); default: the previous ready one
        self.title = (f"promote deployment {release}" if release else
                      "promote the previous ready production deployment") + " (Promote to Production), check health"

    def check(self, ctx: RunContext) -> Change | None:
        client = api(ctx)
        current = production_deployment(client)
        if self.release == current["uid"]:
            return None
        ready = client.ready_deployments()
        older = ([d for d in ready if d.get("uid") == self.release] if self.release else
                 [d for d in ready
                  if d.get("uid") != current["uid"] and (d.get("created") or 0) < (current.get("created") or 0)])
        if self.release and not older:
            raise CheckFailed(f"deployment {self.release} is not a READY {client.config.target} deployment of the "
                              "project", where=client.config.where(), hint="pick one from the Vercel dashboard")
        if not older:
            raise CheckFailed(f"no READY production deployment older than {current['uid']} to roll back to",
                              where=client.config.where(), hint="nothing older is ready on Vercel")
        target = older[0]
        summary = f"promote {target['uid']} ({_when(target)}) to production, replacing {current['uid']}"
        warning = ctx.once(f"rollback:warning:{target['uid']}", lambda: _warn(ctx, target))
        if warning:
            summary += f" (warning: {warning})"
        return Change(summary, details=[f"warning: {warning}"] if warning else [],
                      data={"from": current["uid"], "to": target["uid"]})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        self._promote(ctx, change.data["to"])
        return {"from": change.data["from"], "to": change.data["to"]}

    def _promote(self, ctx: RunContext, deployment_id: str) -> None:
        client = api(ctx)
        client.promote(deployment_id)
        deadline = time.monotonic() + build_timeout(ctx.env)
        while production_deployment(client)["uid"] != deployment_id:
            if time.monotonic() >= deadline:
                raise StepFailed(f"deployment {deployment_id} is not serving production after the promote",
                                 where=client.config.where(), hint="look at the project in the Vercel dashboard")
            time.sleep(POLL_SECONDS)
        gate(ctx.env, health_timeout(ctx.env))

    def verify(self, ctx: RunContext) -> None:
        expected = (ctx.state.get(self.name) or {}).get("to")
        serving = production_deployment(api(ctx))["uid"]
        if serving != expected:
            raise StepFailed(f"production serves {serving}, not {expected}", where=api(ctx).config.where())

    def undo(self, ctx: RunContext, change: Change) -> None:
        api(ctx).promote(change.data["from"])

    def checklist_line(self) -> str:
        return f"{self.title} (POST /v10/projects/{{id}}/promote/{{deployment}})"


def _when(deployment: dict[str, Any]) -> str:
    created = deployment.get("created")
    return datetime.fromtimestamp(created / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC") if created else "unknown"


def _warn(ctx: RunContext, target: dict[str, Any]) -> str | None:
    warning = schema_warning(ctx.env, ctx.label, target)
    if warning:
        ctx.output.warn(warning)
    return warning


def schema_warning(env: Environment, label: str, target: dict[str, Any]) -> str | None:
    """Migrations finished after `target` was built: the older code has not seen them."""
    if not env.has("database.url") or not target.get("created"):
        return None
    built = datetime.fromtimestamp(target["created"] / 1000, UTC)
    try:
        url = env.database_url(direct=True)
        with pg.connect(url, application_name=label[:63], autocommit=True, connect_timeout=5) as connection:
            migrations.use_prisma_schema(connection, url)
            rows = migrations.read_applied(connection)
    except OpsError as error:  # a rollback during an outage must not wait on the database
        return f"could not compare the database schema with deployment {target['uid']}: {redact(error.message)}"
    newer = [row.migration_name for row in rows if row.finished_at is not None and row.rolled_back_at is None
             and _aware(row.finished_at) > built]
    if not newer:
        return None
    return (f"the database has {len(newer)} migration(s) applied after deployment {target['uid']} was built "
            f"({', '.join(newer)}); the older code runs against a newer schema, which only works when those "
            "migrations were backward-compatible")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def serving_problem(env: Environment, key: str, expected: str, shown: str) -> str | None:
    """None when the project's variable `key` is `expected`, the serving deployment was built after it was
    set, and health and ready answer; else what is wrong (`shown`: how to name the value)."""
    client = VercelApi(settings(env))
    variables = {str(v["key"]): v for v in client.list_env() if client.config.target in (v.get("target") or [])}
    variable = variables.get(key)
    if variable is None or client.env_value(str(variable["id"])) != expected:
        return f"the project's {key} is not {shown}"
    serving = production_deployment(client)
    if (serving.get("created") or 0) < (variable.get("updatedAt") or variable.get("createdAt") or 0):
        return f"deployment {serving['uid']} was built before {key} changed: redeploy it"
    return probe(env)


# --- health and preflight ------------------------------------------------------------------


def probes(env: Environment) -> list[tuple[str, Probe]]:
    def deployment() -> str:
        client = VercelApi(settings(env))
        serving = production_deployment(client)
        state = client.deployment(serving["uid"]).get("readyState")
        if state != "READY":
            raise CheckFailed(f"{client.config.target} deployment {serving['uid']} is {state}",
                              where=client.config.where(), hint="look at it in the Vercel dashboard")
        return f"{client.config.where()}: {client.config.target} deployment {serving['uid']} is READY"

    def url(kind: str) -> Probe:
        def check() -> str:
            status, body = fetch_from_here(env.app_settings()[kind])
            if status != 200:
                raise CheckFailed(redact(describe_answer(env.app_settings()[kind], status, body)),
                                  hint=f"`inv deploy.restart --env {env.name}` redeploys")
            return f"{env.app_settings()[kind]} answered 200"
        return check

    app = env.app_settings()
    return [("vercel deployment", deployment),
            *[(f"app {kind.split('_')[0]}", url(kind)) for kind in ("health_url", "ready_url") if app.get(kind)]]


class Vercel:
    name = "vercel"
    describe = ("Vercel: push-env sets the project's environment variables, restart redeploys, rollback "
                "promotes the previous ready production deployment")

    def require(self, env: Environment) -> None:
        settings(env)

    def push_env_steps(self, env: Environment) -> list[Step]:
        return [VercelPushEnvStep(settings(env).target)]

    def restart_step(self, env: Environment, *, batch: int = 1, max_fail: int = 0, always: bool = False) -> Step:
        return RedeployStep(always)

    def rollback_steps(self, env: Environment, *, release: str | None = None, batch: int = 1,
                       max_fail: int = 0) -> list[Step]:
        return [PromoteStep(release)]

    def probes(self, env: Environment) -> list[tuple[str, Probe]]:
        return probes(env)


register(Vercel())
