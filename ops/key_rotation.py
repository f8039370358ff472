"""The steps of keys.rotate: blue/green rotation of the storage key; provision's switch from the bootstrap key.

Rotation: create a new key → probe it → make it current in the secret store (the old one
kept as STORAGE_PREVIOUS_*) → push the hosts' env files → rolling restart with the health
gate → confirm every app serves with the new key → revoke the old key → record it.
Every step reads where the rotation stands (the secret store, the provider, the hosts)
when it checks, so running the rotation again or `inv runs.resume ID` after an
interruption at any point finishes it, ending with one key that the apps use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ops import keys, vercel_steps
from ops.engine import Change, RunContext, Step, WrappedStep
from ops.envfile import parse_env_file
from ops.errors import CheckFailed, OpsError, StepFailed
from ops.platforms import platform_name
from ops.rollout import health_gate, health_timeout, host_named, probe_once, required_app_setting
from ops.secrets import Secret, mask_identifier

if TYPE_CHECKING:
    from ops.inventory import Environment

SWITCHING_STEPS = ("create-key", "store-key")


def planned_before(ctx: RunContext, *names: str) -> bool:
    """While planning: an earlier step of this run will change what this step sees."""
    return any(ctx.pending(name) and name not in ctx.state for name in names)


def masked_key(key_id: Any) -> str:
    return mask_identifier(str(key_id.reveal() if isinstance(key_id, Secret) else key_id))


class CreateKey(Step):
    name = "create-key"
    title = "create a new storage key with the provider (same permissions as the current one)"

    def __init__(self, rotation: str | None):
        self.rotation = rotation

    def check(self, ctx: RunContext) -> Change | None:
        env = ctx.env
        if keys.stored(env, keys.NEXT_KEY_ID) or keys.stored(env, keys.PREVIOUS_KEY_ID):
            return None  # a rotation is under way: the next steps finish it
        if self.rotation and any(e.get("rotation_id") == self.rotation for e in keys.read_history(env)):
            return None  # this rotation is done and recorded
        provider = keys.provider_for(env)
        details = provider.preflight()
        return Change(f"create a new {provider.name} key to replace {masked_key(keys.current_key_id(env))}",
                      details)

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        provider = keys.provider_for(ctx.env, log=ctx.log, prompt=input)
        new = provider.create_key(keys.new_label(ctx.env))
        store = keys.secret_store(ctx.env)  # kept at once: an interrupted run never loses the key
        store.update({keys.NEXT_SECRET: new.secret_access_key, keys.NEXT_KEY_ID: Secret(new.key_id)})
        return {"key_id": mask_identifier(new.key_id), "provider": provider.name}

    def undo(self, ctx: RunContext, change: Change) -> str | None:
        if delete_pending_key(ctx) is None and rotation_in_progress(ctx.env):
            return new_key_stays(ctx.env)
        return None


def new_key_stays(env: Environment) -> str:
    """Why a key already switched in is not taken away when a later step fails."""
    previous = keys.stored(env, keys.PREVIOUS_KEY_ID)
    old = f"the old key {masked_key(previous)}" if previous else "the old key"
    return (f"the new key {masked_key(keys.current_key_id(env))} is the key in use now and stays; {old} still "
            "works until the rotation revokes it")


def pending_key(env: Environment) -> tuple[str, Secret] | None:
    """The new key created and not yet switched in: both halves stored, not the key in use."""
    key_id, secret = keys.stored(env, keys.NEXT_KEY_ID), keys.stored(env, keys.NEXT_SECRET)
    if key_id and secret and key_id.reveal() != keys.current_key_id(env):
        return key_id.reveal(), secret
    return None


def delete_pending_key(ctx: RunContext) -> str | None:
    """Remove a new key that was never switched in (the old one stays untouched)."""
    env = ctx.env
    pending = keys.stored(env, keys.NEXT_KEY_ID)
    if not pending or pending.reveal() == keys.current_key_id(env):
        return None
    provider = keys.provider_for(env)
    if not provider.manual:
        provider.delete_key(pending.reveal())
    keys.clear(env, keys.NEXT_KEY_ID, keys.NEXT_SECRET)  # both in one atomic write
    return pending.reveal()


class ProbeKey(Step):
    name = "probe-key"
    title = "probe the new key: head the bucket, put, get and delete an object"

    def check(self, ctx: RunContext) -> Change | None:
        pending = pending_key(ctx.env)
        if pending:
            return Change(f"probe the new key {mask_identifier(pending[0])}")
        return Change("probe the new key") if planned_before(ctx, "create-key") else None

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        env = ctx.env
        pending = pending_key(env)
        if not pending:
            return {}
        key_id, secret = pending
        try:
            keys.probe_key(env, key_id, secret)
        except CheckFailed as error:
            deleted = delete_pending_key(ctx)
            raise StepFailed(f"{error.message}; the new key {'was deleted' if deleted else 'is discarded'} and "
                             f"the key in use ({masked_key(keys.current_key_id(env))}) is untouched",
                             where=error.where, hint="the storage refused a key the provider just made: check "
                             "the permissions the new key gets (copied from the current one) and that the "
                             "provider serves this bucket, then rotate again") from None
        return {"key_id": mask_identifier(key_id), "probed": True}

    def verify(self, ctx: RunContext) -> None:
        """apply probed it (and removed a key that failed); nothing more to see."""


class StoreKey(Step):
    name = "store-key"
    title = "make the new key current in the secret store (the old one kept until it is revoked)"

    def check(self, ctx: RunContext) -> Change | None:
        pending = keys.stored(ctx.env, keys.NEXT_KEY_ID)
        if pending:
            return Change(f"switch opsbook and the env files to {masked_key(pending)}; keep "
                          f"{masked_key(keys.current_key_id(ctx.env))} until the apps use the new one")
        return Change("switch to the new key") if planned_before(ctx, "create-key") else None

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        env = ctx.env
        store = keys.secret_store(env)
        new_id, new_secret = keys.stored(env, keys.NEXT_KEY_ID), keys.stored(env, keys.NEXT_SECRET)
        if not new_id:
            return {}
        old_id, old_secret = keys.current_credentials(env)
        # One write (atomic in every store, one new version in a manager's): the old key kept as the previous
        # one, the new one current, the pending one gone; a crash leaves the state before or after it.
        changes: dict[str, Secret | None] = {keys.NEXT_SECRET: None, keys.NEXT_KEY_ID: None}
        if new_secret and old_id != new_id.reveal():
            changes.update({keys.PREVIOUS_SECRET: old_secret or Secret(""), keys.PREVIOUS_KEY_ID: Secret(old_id),
                            keys.SECRET: new_secret, keys.KEY_ID: new_id})
        store.update(changes)
        for cached in ("storage:storage", "storage:backups"):
            ctx.forget(cached)  # the rest of the run (and its journal upload) uses the new key
        return {"key_id": masked_key(new_id), "previous_key_id": mask_identifier(old_id)}


class AfterSwitch(WrappedStep):
    """A deploy step (push-env, restart) shown as planned while the switch to a new value is still ahead."""

    def __init__(self, inner: Step, summary: str, after: tuple[str, ...] = SWITCHING_STEPS):
        super().__init__(inner)
        self.summary = summary
        self.after = after

    def check(self, ctx: RunContext) -> Change | None:
        change = self.inner.check(ctx)
        if change is None and planned_before(ctx, *self.after):
            return Change(self.summary, data={"after_switch": True})
        return change

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any] | None:
        real = self.inner.check(ctx) if change.data.get("after_switch") else change
        return self.inner.apply(ctx, real) if real is not None else {}

    def _undo(self, ctx: RunContext, change: Change) -> None:
        if not change.data.get("after_switch"):  # nothing was applied under the placeholder change
            super()._undo(ctx, change)


def rotation_in_progress(env: Environment) -> bool:
    return bool(keys.stored(env, keys.PREVIOUS_KEY_ID))


class ConfirmServing(Step):
    name = "confirm-apps"
    title = "confirm every app holds the new key and answers its health and ready URLs"

    def __init__(self, after: tuple[str, ...] = SWITCHING_STEPS):
        self.after = after  # the steps that switch to the new key

    def check(self, ctx: RunContext) -> Change | None:
        if planned_before(ctx, *self.after):
            return Change("check that every app serves with the new key")
        if not rotation_in_progress(ctx.env):
            return None
        problems = self.problems(ctx)
        return Change("wait for: " + "; ".join(problems), problems) if problems else None

    def problems(self, ctx: RunContext) -> list[str]:
        key_id = keys.current_key_id(ctx.env)
        problems = []
        if platform_name(ctx.env) == vercel_steps.Vercel.name:
            problem = vercel_steps.serving_problem(ctx.env, "S3_ACCESS_KEY_ID", str(key_id), mask_identifier(key_id))
            return [problem] if problem else []
        for host in ctx.env.host_configs():
            app = ctx.env.app_settings(host.name)
            held = self._key_on(ctx, host.name)
            if held != key_id:
                problems.append(f"{host.name}: its env file holds {mask_identifier(held) if held else 'no key'}, "
                                f"not {mask_identifier(key_id)}")
                continue
            answer = probe_once(ctx.host(host), app)
            if answer:
                problems.append(f"{host.name}: {answer}")
        return problems

    def _key_on(self, ctx: RunContext, host_name: str) -> str | None:
        path = required_app_setting(ctx.env, host_name, "env_file")
        text = ctx.host(host_named(ctx.env, host_name)).read_text(path)
        return parse_env_file(text or "").get("S3_ACCESS_KEY_ID")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        key_id = keys.current_key_id(ctx.env)
        if platform_name(ctx.env) == vercel_steps.Vercel.name:
            problem = vercel_steps.serving_problem(ctx.env, "S3_ACCESS_KEY_ID", str(key_id), mask_identifier(key_id))
            if problem:
                raise StepFailed(problem, where=f"envs.{ctx.env.name}.app.vercel",
                                 hint=f"`inv deploy.push-env --env {ctx.env.name} --restart`, then run the rotation "
                                      "again; the old key stays until then")
            return {"vercel": "serving with the new key"}
        for host in ctx.env.host_configs():
            if self._key_on(ctx, host.name) != key_id:
                raise StepFailed(f"the env file on {host.name} does not hold the new key {mask_identifier(key_id)}",
                                 where=host.name, hint=f"`inv deploy.push-env --env {ctx.env.name} --restart`, "
                                                       "then run the rotation again; the old key stays until then")
            health_gate(ctx.env, host, health_timeout(ctx.env, host.name))
        return {"hosts": [host.name for host in ctx.env.host_configs()]}


class RevokeOld(Step):
    name = "revoke-old-key"
    title = "revoke the old key (only once every app serves with the new one)"

    def __init__(self, after: tuple[str, ...] = SWITCHING_STEPS, *, old: str = "the old key"):
        self.after = after
        self.old = old  # what the key being replaced is, in the plan

    def stale(self, ctx: RunContext) -> list[str]:
        env = ctx.env
        current = keys.current_key_id(env)
        previous, previous_secret = keys.stored(env, keys.PREVIOUS_KEY_ID), keys.stored(env, keys.PREVIOUS_SECRET)
        provider = keys.provider_for(env)
        if provider.manual:
            if previous and previous.reveal() != current and previous_secret and \
                    not keys.key_refused(env, previous.reveal(), previous_secret):
                return [previous.reveal()]
            return []
        pending = keys.stored(env, keys.NEXT_KEY_ID)
        keep = {current, pending.reveal() if pending else None}
        prefix = keys.label_prefix(env)
        return [info.key_id for info in provider.list_keys() if info.key_id not in keep and (
            (previous and info.key_id == previous.reveal()) or provider.owns(info, prefix))]

    def check(self, ctx: RunContext) -> Change | None:
        if planned_before(ctx, *self.after):
            return Change(f"revoke {self.old} {masked_key(keys.current_key_id(ctx.env))}")
        if not rotation_in_progress(ctx.env):
            return None
        stale = self.stale(ctx)
        if not stale:
            return None
        return Change(f"revoke {', '.join(mask_identifier(k) for k in stale)}", data={"keys": stale})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        env = ctx.env
        provider = keys.provider_for(env)
        stale = change.data.get("keys") or self.stale(ctx)
        current = keys.current_key_id(env)
        for key_id in stale:
            if key_id == current:  # never the key in use, whatever the plan said
                continue
            try:
                provider.delete_key(key_id)
            except OpsError as error:
                if provider.manual:
                    raise
                raise StepFailed(f"could not revoke the old key {mask_identifier(key_id)}: {error.message}; every "
                                 f"app serves with the new key {mask_identifier(current)}, which stays; the old key "
                                 "is not revoked yet", where=error.where,
                                 hint=f"run `inv keys.rotate --env {env.name}` again (or `inv runs.resume "
                                      f"{ctx.run_id}`): it revokes the old key and records the rotation"
                                      + (f"; {error.hint}" if error.hint else "")) from None
        return {"revoked": [mask_identifier(k) for k in stale]}


class RecordRotation(Step):
    name = "record-rotation"
    title = "record the rotation (key id masked, date) in the state dir and the backup bucket"

    def __init__(self, rotation: str | None, after: tuple[str, ...] = SWITCHING_STEPS):
        self.rotation = rotation
        self.after = after

    def check(self, ctx: RunContext) -> Change | None:
        if planned_before(ctx, *self.after):
            return Change("record the rotation")
        if not rotation_in_progress(ctx.env):
            return None
        return Change(f"record the rotation to {masked_key(keys.current_key_id(ctx.env))}")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        env = ctx.env
        previous = keys.stored(env, keys.PREVIOUS_KEY_ID)
        entry = keys.rotation_entry(env, keys.current_key_id(env), previous.reveal() if previous else None,
                                    self.rotation or ctx.run_id, ctx.operator)
        keys.record_rotation(env, entry)
        keys.clear(env, keys.PREVIOUS_SECRET, keys.PREVIOUS_KEY_ID)  # both in one atomic write: the rotation closes
        return {"key_id": entry["key_id"], "previous_key_id": entry["previous_key_id"], "at": entry["at"]}


def retire_bootstrap_steps(switched_by: str) -> list[Step]:
    """Provision's end: once every app serves with the key made by step `switched_by`, revoke the inventory's
    key (kept as the previous key meanwhile), then record the switch as a rotation."""
    after = (switched_by,)
    return [ConfirmServing(after),
            WrappedStep(RevokeOld(after, old="the inventory's key"),
                        title="revoke the inventory's storage key (the bootstrap key) once every app serves with "
                              "the new one"),
            WrappedStep(RecordRotation(None, after),
                        title="record the switch to the new key (id masked, date) in the state dir and the backup "
                              "bucket")]
