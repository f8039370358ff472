"""inv decommission --env E --confirm E: retire an environment, keeping what is needed to understand it later.

1. final backup    tagged `final`, kept forever (retention never deletes it);
2. deep verify     restored into a scratch database, row counts compared with the manifest;
3. archive         one tarball (ops/archive.py: git bundle, runbooks, masked inventory, drill reports,
                   journals) with its sha256 and listing, uploaded to the backups storage under archive/;
4. drop database   only with --drop-database and a second confirmation, only once step 2 passed;
5. mark            <state>/decommissioned/E.json and decommissioned.json in the backups storage: every
                   later task refuses E (ops.cli.environment);
6. revoke keys     every storage key E has, the secret store's and the inventory's, through its key provider
                   (static: the steps to do by hand, then checked), then checked refused. Last: until here
                   opsbook still needs them to write to the bucket.

Each step checks first, so running it again after a failure finishes the job. Once the keys are revoked
the run is finished (the local marker says so): the bucket may refuse every key left, and a later run
has nothing to do.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

from invoke import task

import runbooks
from ops import archive, backup_steps, keys, lease, pg, restore_db
from ops.archive import ARCHIVE_DIR, MARKER_KEY, decommission_marker, write_marker
from ops.backup_manifest import list_backups, read_verifications
from ops.backup_verify import VerifyStep
from ops.cli import OpsTask, TaskCall, execute
from ops.clock import iso_z_micro, utc_now
from ops.engine import Change, Runbook, RunContext, Step, check_confirm_name
from ops.errors import CheckFailed, ConfirmationRequired, ConnectionFailed, StepFailed
from ops.journal import new_run_id
from ops.secrets import mask_identifier, redact, reveal

if TYPE_CHECKING:
    from ops.backup_manifest import Manifest
    from ops.inventory import Environment

FINAL_TAG = "final"


def final_backup(ctx: RunContext) -> Manifest | None:
    """The newest backup tagged final and kept, or None."""
    complete, _incomplete = list_backups(ctx.storage("backups"), strict=False)
    return next((m for m in complete if FINAL_TAG in m.tags and m.keep), None)


def deep_verified(ctx: RunContext, backup_id: str) -> bool:
    records = read_verifications(ctx.storage("backups"), backup_id)
    return bool(records) and records[-1].get("kind") == "deep" and bool(records[-1].get("ok"))


class FinalBackupStep(Step):
    name = "final-backup"
    title = "take a final backup tagged `final`, kept forever"

    def __init__(self, backup_id: str):
        self.backup_id = backup_id

    def check(self, ctx: RunContext) -> Change | None:
        existing = final_backup(ctx)
        if existing is not None:
            return None
        return Change(f"back up the database as backups/{self.backup_id}/ (tag final, keep)")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        steps = backup_steps.build(ctx.env, backup_id=self.backup_id, tags=[FINAL_TAG], keep=True, no_prune=True).steps
        ctx.run_steps(steps)
        return {"backup_id": self.backup_id}

    def verify(self, ctx: RunContext) -> None:
        if final_backup(ctx) is None:
            raise StepFailed("no backup tagged final after the backup", hint="run the decommission again")


class VerifyFinalStep(Step):
    name = "verify-final"
    title = "deep-verify the final backup: restore it into a scratch database and compare row counts"

    def __init__(self, identity: str | None):
        self.identity = identity

    def check(self, ctx: RunContext) -> Change | None:
        manifest = final_backup(ctx)
        if manifest is not None and deep_verified(ctx, manifest.id):
            return None
        return Change(f"deep-verify {manifest.id if manifest else 'the final backup'}")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        manifest = final_backup(ctx)
        if manifest is None:
            raise StepFailed("there is no final backup to verify", hint="run the decommission again")
        ctx.run_steps([VerifyStep(manifest.id, True, self.identity)])
        return {"backup_id": manifest.id}


class ArchiveStep(Step):
    name = "archive"

    def __init__(self, env: Environment):
        self.title = (f"archive {env.name}: git bundle of app.repository, runbooks, masked inventory, drill reports "
                      "and journals, as one tarball with its sha256 and listing, uploaded under archive/")

    def check(self, ctx: RunContext) -> Change | None:
        if any(info.key.endswith(".tar.gz") for info in ctx.storage("backups").list(ARCHIVE_DIR)):
            return None
        repository = ctx.env.value("app.repository", None)
        return Change("build and upload the archive", [
            f"repository: {repository}" if repository else "no app.repository: no git bundle",
            f"{ctx.storage('backups').describe()}: {ARCHIVE_DIR}{ctx.run_id}/"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        members = self.members(ctx)
        path = ctx.env.inventory.state_dir / "archive" / f"{ctx.env.name}-{ctx.run_id}.tar.gz"
        sha256, size = archive.write_tarball(members, path)
        prefix = f"{archive.ARCHIVE_DIR}{ctx.run_id}/"
        storage = ctx.storage("backups")
        with path.open("rb") as source:
            storage.upload_stream(prefix + path.name, source, content_type="application/gzip")
        storage.put_bytes(prefix + archive.LISTING_NAME, archive.listing_text(members).encode(),
                          content_type="text/plain")
        storage.put_bytes(prefix + path.name + ".sha256", f"{sha256}  {path.name}\n".encode(),
                          content_type="text/plain")
        for member in members:
            ctx.log(f"{member.sha256[:12]}  {len(member.data):>10}  {member.name}")
        ctx.log(f"{path.name}: {size} bytes, sha256 {sha256}")
        return {"key": prefix + path.name, "file": str(path), "sha256": sha256, "size": size,
                "members": [member.name for member in members]}

    def members(self, ctx: RunContext) -> list[Any]:
        env, storage = ctx.env, ctx.storage("backups")
        found = [*archive.runbook_members(runbooks.checklists(env)), archive.inventory_member(env)]
        repository = env.value("app.repository", None)
        if repository:
            scratch = env.inventory.state_dir / "archive"
            scratch.mkdir(parents=True, exist_ok=True)
            bundle = archive.repository_member(env._relative_to_inventory(str(repository)), scratch)
            if bundle is not None:
                found.append(bundle)
        state = env.inventory.state_dir
        drills = {**archive.local_members(state / "drills", "drills", "*/report.*",
                                          keep=lambda path: _drill_of(path, env.name)),
                  **archive.stored_members(storage, "drills/", "drills")}
        journals = {**archive.local_members(state / "runs", "audit", "*.jsonl", keep=archive.journal_of(env.name)),
                    **archive.stored_members(storage, "audit/", "audit")}
        return found + [drills[name] for name in sorted(drills)] + [journals[name] for name in sorted(journals)]

    def verify(self, ctx: RunContext) -> None:
        outputs = ctx.state.get(self.name) or {}
        info = ctx.storage("backups").head(outputs.get("key", "archive/missing"))
        if info is None or info.size != outputs.get("size"):
            raise StepFailed("the uploaded archive is missing or has the wrong size", hint="run the decommission again")


def _drill_of(path: Any, env_name: str) -> bool:
    report = path.parent / "report.json"
    try:
        return json.loads(report.read_text()).get("source_env") == env_name
    except (OSError, ValueError):
        return False


class DropDatabaseStep(Step):
    name = "drop-database"

    def __init__(self, database: str):
        self.database = database
        self.title = f"drop the database {database} (only once the final backup is deep-verified)"

    def check(self, ctx: RunContext) -> Change | None:
        with restore_db.maintenance_connection(ctx.env.admin_url(), ctx.label) as connection:
            if not pg.database_exists(connection, self.database):
                return None
        return Change(f"DROP DATABASE {self.database}", ["its final backup stays, kept forever"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        manifest = final_backup(ctx)
        if manifest is None or not deep_verified(ctx, manifest.id):
            raise CheckFailed(f"{self.database} is not dropped: its final backup is not deep-verified",
                              hint="run the decommission again: it verifies the final backup first")
        with restore_db.maintenance_connection(ctx.env.admin_url(), ctx.label) as connection:
            pg.drop_database(connection, self.database)
        return {"database": self.database, "final_backup": manifest.id}


class MarkStep(Step):
    name = "mark"

    def __init__(self, env: Environment):
        self.title = (f"mark {env.name} decommissioned: .ops/decommissioned/{env.name}.json and {MARKER_KEY} in its "
                      "backups storage (later runs refuse it)")

    def check(self, ctx: RunContext) -> Change | None:
        local = decommission_marker(ctx.env.inventory.state_dir, ctx.env.name)
        if local is not None and ctx.storage("backups").head(MARKER_KEY) is not None:
            return None
        return Change(f"record that {ctx.env.name} is decommissioned")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        manifest = final_backup(ctx)
        archived = (ctx.state.get("archive") or {}).get("key") or _stored_archive(ctx)
        record = {"env": ctx.env.name, "at": iso_z_micro(utc_now()), "operator": ctx.operator, "run_id": ctx.run_id,
                  "final_backup": manifest.id if manifest else None, "archive": archived}
        ctx.storage("backups").put_bytes(MARKER_KEY, json.dumps(record, indent=2).encode(),
                                         content_type="application/json")
        path = write_marker(ctx.env.inventory.state_dir, ctx.env.name, record)
        ctx.log(f"marked in {path}; also set `decommissioned: true` on envs.{ctx.env.name} in the inventory")
        return record


def _stored_archive(ctx: RunContext) -> str | None:
    archives = [info.key for info in ctx.storage("backups").list(ARCHIVE_DIR) if info.key.endswith(".tar.gz")]
    return archives[-1] if archives else None


class RevokeKeysStep(Step):
    """Every key the environment has (keys.known_keys: the secret store's and the inventory's) that still opens
    its bucket and, for an API provider, is one of the provider's. The provider's calls are signed with such a
    key, the signing one revoked last; what is left is checked with keys that still work, or proven dead by
    the storage refusing them: never by asking with a key just revoked."""

    name = "revoke-keys"
    title = ("revoke every storage key the environment has, the secret store's and the inventory's (its key "
             "provider; static: by hand, then checked)")

    def check(self, ctx: RunContext) -> Change | None:
        _signer, revocable = self.plan(ctx)
        if not revocable:
            return None
        return Change(f"revoke {len(revocable)} key(s) through the {keys.provider_for(ctx.env).name} provider",
                      [f"{mask_identifier(key.key_id)} ({key.kept})" for key in revocable])

    def plan(self, ctx: RunContext) -> tuple[keys.KnownKey | None, list[keys.KnownKey]]:
        """(a key that still works, to sign the provider's calls with; the keys to revoke)."""
        env = ctx.env
        live = [key for key in keys.known_keys(env) if not keys.key_refused(env, key.key_id, key.secret, key.section)]
        if not live:
            return None, []  # every key is refused: revoked already
        if keys.provider_for(env).manual:
            return None, live
        refused: ConnectionFailed | None = None
        for signer in live:
            try:
                listed = {info.key_id for info in self.provider(ctx, signer).list_keys()}
            except ConnectionFailed as error:  # revoked a moment ago, still accepted by the storage: ask with another
                refused = error
                continue
            return signer, [key for key in live if key.key_id in listed]
        raise refused or ConnectionFailed(f"no key of {env.name} to ask its key provider with")

    def provider(self, ctx: RunContext, signer: keys.KnownKey) -> Any:
        return keys.provider_for(ctx.env, log=ctx.log, credentials=lambda: (signer.key_id, signer.secret))

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        signer, revocable = self.plan(ctx)
        if not revocable:
            return {"revoked": []}
        if signer is None:  # keys made by hand: revoked by hand
            self._by_hand(ctx, revocable)
        provider = self.provider(ctx, signer)
        self._copy_journal(ctx, revocable)
        for key in sorted(revocable, key=lambda key: key.key_id == signer.key_id):  # the signing key last
            provider.delete_key(key.key_id)
            ctx.log(f"revoked {mask_identifier(key.key_id)} ({key.kept})")
        self._wait_refused(ctx, revocable)
        revoked = [mask_identifier(key.key_id) for key in revocable]
        record_revoked(ctx, revoked)
        return {"revoked": revoked}

    @staticmethod
    def _copy_journal(ctx: RunContext, revocable: list[keys.KnownKey]) -> None:
        """The backup bucket refuses the run once its key is revoked: the journal's copy goes now, up to here."""
        if not ctx.env.has("backups") or str(reveal(ctx.env.storage_config("backups").access_key_id)) not in {
                key.key_id for key in revocable}:
            return
        lease.release_now(ctx, "the keys it is written with are revoked next")
        ctx.storage("backups").put_bytes(f"audit/{ctx.run_id}.jsonl", ctx.journal.path.read_bytes(),
                                         content_type="application/x-ndjson")
        ctx.copy_journal = False
        ctx.log(f"journal copied to audit/{ctx.run_id}.jsonl up to this step: the backup bucket refuses the revoked "
                f"keys; the whole journal stays in {ctx.journal.path}")

    def _by_hand(self, ctx: RunContext, live: list[keys.KnownKey]) -> None:
        for line in [f"revoke these keys of {ctx.env.name} by hand, where they were made:",
                     *[f"  - {mask_identifier(key.key_id)} ({key.kept})" for key in live],
                     f"then run `inv decommission --env {ctx.env.name} --confirm {ctx.env.name}` again"]:
            ctx.output.info(line)
        raise CheckFailed(f"{len(live)} key(s) of {ctx.env.name} still work: revoke them by hand",
                          hint="the steps are printed above; the next run checks they are dead")

    def _wait_refused(self, ctx: RunContext, revoked: list[keys.KnownKey]) -> None:
        """A revoked key can take a few seconds to be refused everywhere (keys.probe_timeout)."""
        env = ctx.env
        deadline = time.monotonic() + float(env.raw("keys.probe_timeout", keys.DEFAULT_PROBE_TIMEOUT_SECONDS))
        while True:
            try:
                left = [key for key in self.plan(ctx)[1] if key in revoked]
            except ConnectionFailed:  # the provider refuses a key the storage still accepts: not refused yet
                left = revoked
            if not left:
                return
            if time.monotonic() > deadline:
                raise StepFailed(f"{len(left)} key(s) still work after revoking: "
                                 f"{', '.join(mask_identifier(key.key_id) for key in left)}",
                                 hint="run the decommission again; check the keys at the provider")
            time.sleep(keys.PROBE_RETRY_SECONDS)  # poll interval, bounded by the deadline above

    def verify(self, ctx: RunContext) -> None:
        left = self.plan(ctx)[1]
        if left:
            raise StepFailed(f"{len(left)} key(s) still active after revoking: "
                             f"{', '.join(mask_identifier(key.key_id) for key in left)}",
                             hint="run the decommission again")


def record_revoked(ctx: RunContext, revoked: list[str]) -> None:
    """The local marker notes that the keys are revoked: the decommission is finished (and its bucket may now
    refuse every key this machine has, so a later run has nothing it could check)."""
    state_dir = ctx.env.inventory.state_dir
    marker = decommission_marker(state_dir, ctx.env.name) or {"env": ctx.env.name}
    write_marker(state_dir, ctx.env.name, {**marker, "keys_revoked": revoked, "finished_by": ctx.run_id})


def finished(env: Environment) -> dict[str, Any] | None:
    """The local marker of a decommission that ran to its end (keys revoked), else None."""
    marker = decommission_marker(env.inventory.state_dir, env.name)
    return marker if marker and "keys_revoked" in marker else None


def build(env: Environment, **arguments: Any) -> Runbook:
    backup_id = arguments.setdefault("backup_id", new_run_id())
    steps: list[Step] = [FinalBackupStep(backup_id), VerifyFinalStep(arguments.get("identity")), ArchiveStep(env)]
    if arguments.get("drop_database"):
        steps.append(DropDatabaseStep(env.database_name()))
    steps += [MarkStep(env), RevokeKeysStep()]
    return Runbook("decommission", f"Decommission {env.name}", steps, arguments=arguments,
                   locks=("environment",))


def _second_confirmation(env_name: str, confirm_drop: str | None) -> None:
    """Dropping the database is asked for twice: --confirm for the decommission, this for the drop."""
    if confirm_drop == env_name:
        return
    if confirm_drop is None and sys.stdin.isatty():
        answer = input(f"Type `drop {env_name}` to drop its database after the final backup verifies: ")
        if answer.strip() == f"drop {env_name}":
            return
    raise ConfirmationRequired(f"--drop-database on {env_name} needs a second confirmation",
                               hint=f"add --confirm-drop {env_name} (or answer the prompt from a terminal)")


@task(klass=OpsTask, allow_decommissioned=True,  # a second run finishes the job
      help=dict(env="the environment to decommission",
                confirm="type the environment's name: decommissioning always asks, protected or not",
                drop_database="drop the database once the final backup is deep-verified",
                confirm_drop="type the environment's name again to allow --drop-database",
                identity="age identity file to verify an encrypted final backup with"))
def decommission(call: TaskCall, env=None, confirm=None, drop_database=False, confirm_drop=None, identity=None,
                 dry_run=False, json=False):
    """Final backup (kept, deep-verified), archive, optional drop, mark decommissioned, revoke keys."""
    name = call.environment.name
    check_confirm_name(name, confirm_drop, flag="--confirm-drop")
    if not dry_run and confirm != name:
        raise ConfirmationRequired(f"decommissioning {name} needs --confirm {name}",
                                   hint=f"re-run with --confirm {name}, or --dry-run to see everything it would do")
    done = finished(call.environment)
    if done and not drop_database:  # its keys are revoked: there is nothing left to check with them
        call.output.info(f"nothing to do: {name} was decommissioned on {done.get('at', '?')} (run "
                         f"{done.get('finished_by', '?')}); its keys are revoked")
        call.output.result({"status": "nothing to do", "decommissioned": done})
        return
    if drop_database and not dry_run:
        _second_confirmation(name, confirm_drop)
    runbook = build(call.environment, drop_database=drop_database, identity=identity)
    execute(runbook, call.environment, call.output, dry_run=dry_run, confirm=confirm,
            result=lambda ctx: {"decommissioned": ctx.state.get("mark"), "archive": ctx.state.get("archive"),
                                "revoked": (ctx.state.get("revoke-keys") or {}).get("revoked")})
    if not dry_run:
        call.output.info(redact(f"{name} is decommissioned; set `decommissioned: true` on envs.{name} in "
                                f"{call.environment.inventory.file.name} so every machine refuses it"))
