"""backup.list and backup.verify: what backups exist, and whether they are still what their manifest says.

Verification re-reads the stored object (size, sha256; decrypted and decompressed
when the age identity is at hand); --deep also restores it into a scratch database
`<db>__verify_<stamp>`, compares row counts with the manifest and drops it. Each
outcome is appended to the backup's verification.json (the manifest stays immutable), or where an R2
bucket lock rule holds backups/ (which it could not be rewritten under) to verifications/<id>.json.
A backup of several databases is verified dump by dump (each into its own scratch database with --deep).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops import backup_lock, cluster_globals, dump, fetch, pg, pg_tools, pg_url, restore_db
from ops.backup_copies import UNREACHABLE, backups_storage, copies_json, copies_text, copy_names, holdings, open_copy
from ops.backup_manifest import BACKUPS_DIR, Verification, append_verification, list_backups, read_verifications
from ops.clock import iso_z, utc_now
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import CheckFailed, StepFailed, UsageError
from ops.inventory import plain
from ops.output import human_size
from ops.storage import open_storage

if TYPE_CHECKING:
    from ops.backup_manifest import IncompleteBackup, Manifest
    from ops.inventory import Environment
    from ops.output import Output
    from ops.storage import Storage

READERS = 8
UNREAD_STATE = "verify-unread"  # ctx.state: the copies a verification could not read


# --- selection --------------------------------------------------------------------------------


def select(storage: Storage, backup: str) -> list[Manifest]:
    """"latest", "all" or one backup id → manifests (newest first); errors say what exists."""
    complete, incomplete = list_backups(storage)
    if not complete and backup in ("latest", "all"):
        raise CheckFailed(f"there is no complete backup in {storage.describe()}",
                          hint="take one with `inv backup`" + (f" ({len(incomplete)} incomplete uploads are "
                                                              "there: see `inv backup.list`)" if incomplete else ""))
    if backup == "latest":
        return complete[:1]
    if backup == "all":
        return complete
    found = [manifest for manifest in complete if manifest.id == backup]
    if found:
        return found
    if any(item.id == backup for item in incomplete):
        raise CheckFailed(f"backup {backup} is incomplete (it has no manifest): it cannot be used",
                          hint="choose a complete backup from `inv backup.list`")
    newest = ", ".join(manifest.id for manifest in complete[:3])
    raise UsageError(f"no backup {backup!r} in {storage.describe()}",
                     hint=f"`inv backup.list` shows them; newest: {newest}" if newest else "take one with `inv backup`")


def identities_for(env: Environment, identity: str | None, manifests: list[Manifest], *,
                   required: bool) -> list[Any] | None:
    """The age identities to decrypt with; None when none is configured (UsageError when `required`)."""
    if not any(manifest.encrypted for manifest in manifests):
        return None
    path = identity or plain(env.value("backups.identity_file", None))
    if not path:
        if required:
            recipients = ", ".join(sorted({r for m in manifests for r in m.recipients}))
            raise UsageError(f"backup {manifests[0].id} is encrypted (to {recipients}) and no age identity was given",
                             hint="pass --identity FILE or set backups.identity_file to the matching age key")
        return None
    file = Path(str(path)).expanduser()
    if not file.is_absolute() and not identity:
        file = env.inventory.file.parent / file
    return dump.load_identities(file)


# --- verification -----------------------------------------------------------------------------


class VerifyStep(Step):
    """Verification of the backup bucket's backups, or (`copy`) of those a copy holds, recorded there."""

    def __init__(self, backup: str, deep: bool, identity: str | None, copy: str | None = None, last: bool = True):
        self.backup, self.deep, self.identity, self.copy = backup, deep, identity, copy
        self.last = last  # the last step fails for every copy that could not be read, once the rest are verified
        self.name = "verify" if copy is None else f"verify-copy-{copy}"
        kind = "restore into a scratch database and compare row counts" if deep else "check size and sha256"
        where = "" if copy is None else f" on copy {copy}"
        self.title = f"re-read {'every backup' if backup == 'all' else 'backup ' + backup}{where} and {kind}"

    def check(self, ctx: RunContext) -> Change | None:
        try:
            manifests = select(backups_storage(ctx, self.copy), self.backup)
        except UNREACHABLE as error:  # a copy out of reach fails its own step, after the others are verified
            if self.copy is None:
                raise
            return Change(f"verify the backups on {self.copy}", [f"not answering now: {error.message}"])
        identities_for(ctx.env, self.identity, manifests, required=self.deep)
        kind = "deep (restore + row counts)" if self.deep else "checksum"
        return Change(f"verify {len(manifests)} backup(s){'' if self.copy is None else ' on ' + self.copy}, {kind}",
                      [f"{m.id}: {part.object.key}, {part.size} bytes" for m in manifests for part in m.parts()])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        storage = backups_storage(ctx, self.copy)
        try:
            manifests = select(storage, self.backup)
        except UNREACHABLE as error:
            if self.copy is None:
                raise
            ctx.output.warn(f"copy {self.copy} could not be verified: {error.message}")
            ctx.state.setdefault(UNREAD_STATE, []).append(f"{self.copy}: {error.message}")
            self._fail_for_unread(ctx)
            return {"unreachable": error.message}
        identities = identities_for(ctx.env, self.identity, manifests, required=self.deep)
        results, failures = [], []
        for manifest in manifests:
            try:
                detail, ok = verify_one(ctx, manifest, self.deep, identities, storage), True
            except CheckFailed as error:  # a damaged backup; an unreachable bucket is not recorded against it
                detail, ok = error.message, False
                failures.append(error.message)
            record = Verification(at=iso_z(utc_now()), kind="deep" if self.deep else "checksum", ok=ok,
                                  run_id=ctx.run_id, operator=ctx.operator, detail=detail)
            append_verification(storage, manifest.id, record,
                                outside_lock=self.copy is None and backup_lock.held_by_a_bucket_rule(ctx.env))
            where = "" if self.copy is None else f" (copy {self.copy})"
            ctx.log(f"{manifest.id}{where}: {'ok' if ok else 'FAILED'} — {detail}")
            results.append({"id": manifest.id, "copy": self.copy, **record.to_json()})
        verified = ctx.state.setdefault("verify", {"results": []})
        verified["results"] = [*verified.get("results", []), *results]
        if failures:
            where = "" if self.copy is None else f" on copy {self.copy}"
            raise CheckFailed(f"{len(failures)} of {len(manifests)} backup(s){where} failed verification: "
                              + "; ".join(failures),
                              hint="do not rely on these backups: take a fresh one and restore from another")
        self._fail_for_unread(ctx)
        return {"results": results}

    def _fail_for_unread(self, ctx: RunContext) -> None:
        unread = ctx.state.get(UNREAD_STATE) or []
        if self.last and unread:
            raise StepFailed(f"{len(unread)} copy(ies) could not be read to verify: {'; '.join(unread)}",
                             hint="fix the copy's settings or reach, then verify again (--copy NAME for that one)")

    def verify(self, ctx: RunContext) -> None:
        """apply raised on any mismatch; the outcome is recorded in verification.json."""


def verify_one(ctx: RunContext, manifest: Manifest, deep: bool, identities: list[Any] | None,
               storage: Storage | None = None) -> str:
    """Every dump of the backup (one per database), then its globals; CheckFailed at the first damaged one."""
    storage = storage or ctx.storage("backups")
    parts = manifest.parts()
    checked = [_verify_part(ctx, part, deep, identities, storage, len(parts) > 1) for part in parts]
    return f"{'; '.join(checked)}; {cluster_globals.check_globals(storage, manifest, identities)}"


def _verify_part(ctx: RunContext, part: Manifest, deep: bool, identities: list[Any] | None, storage: Storage,
                 named: bool) -> str:
    which = f" {part.database.name}" if named else ""
    progress = ctx.progress(f"{part.id}{which}: read", total_bytes=part.size)
    which = f"{part.database.name}: " if named else ""
    if not deep:
        fetched = fetch.fetch_verified(storage, part, identities=identities, on_progress=progress)
        decoded = "decrypted and decompressed" if fetched.decoded_size is not None else "not decrypted (no identity)"
        return f"{which}size {fetched.size} and sha256 match the manifest; {decoded}"
    counts = restore_into_scratch(ctx, part, storage, identities, progress)
    return (f"{which}sha256 matches; restored into a scratch database: {len(counts)} tables, "
            f"{sum(counts.values())} rows, as in the manifest")


def restore_into_scratch(ctx: RunContext, manifest: Manifest, storage: Storage, identities: list[Any] | None,
                         progress: Any) -> dict[str, int]:
    """Stream the backup into `<db>__verify_<stamp>` on the environment's server, count rows, drop it."""
    url = ctx.env.admin_url()
    with restore_db.maintenance_connection(url, ctx.label) as connection:
        where = pg_url.parse_url(url).describe()
        readable = restore_db.readable_by(manifest, pg.server_version(connection)[0], where)
        tool = pg_tools.find_client_tool("pg_restore", readable)
        for leftover in restore_db.leftovers(connection, manifest.database.name, "verify"):
            pg.drop_database(connection, leftover)  # left by a verification that was killed
        scratch = restore_db.side_name(manifest.database.name, "verify", utc_now())
        pg.create_database(connection, scratch)
        try:
            restore_db.restore_streamed(tool, url, scratch, storage, manifest, identities=identities,
                                        cross_environment=True, on_progress=progress)
            return restore_db.check_row_counts(manifest, url, scratch, ctx.label)
        finally:
            pg.drop_database(connection, scratch)


def build(env: Environment, **arguments: Any) -> Runbook:
    """The backup bucket and every copy (`copy`: that copy alone)."""
    backup, deep = str(arguments.get("backup") or "latest"), bool(arguments.get("deep"))
    identity = arguments.get("identity")
    chosen = arguments.get("copy")
    if chosen:
        open_copy(env, chosen)  # an unknown name: a usage error before anything runs
    wheres = [chosen] if chosen else [None, *copy_names(env)]
    steps: list[Step] = [VerifyStep(backup, deep, identity, where, last=where == wheres[-1]) for where in wheres]
    return Runbook("backup.verify", f"Verify backups of {env.name}", steps, arguments=arguments,
                   locks=("backup-verify",),
                   confirm_exempt="reads backups; --deep restores into a scratch database it drops again")


# --- listing ----------------------------------------------------------------------------------


def age_of(moment: datetime, now: datetime) -> str:
    seconds = max(int((now - moment).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def verified_text(records: list[dict[str, Any]]) -> str:
    if not records:
        return "never"
    last = records[-1]
    when = str(last.get("at", "?"))[:16].replace("T", " ")
    return f"{when} {last.get('kind', '?')}" + ("" if last.get("ok") else " FAILED")


def show_backups(env: Environment, output: Output) -> None:
    storage = open_storage(env.storage_config("backups"))
    complete, incomplete = list_backups(storage, strict=False)
    uploads = storage.list_incomplete_uploads(BACKUPS_DIR)
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        records = list(pool.map(lambda m: read_verifications(storage, m.id), complete))
    now = utc_now()
    held = holdings(env, output.warn)
    output.info(f"backups of {env.name} in {storage.describe()}:")
    output.table(["id", "time", "age", "size", "databases", "tags", "keep", "verified",
                  *(["copies"] if held else [])], [
        [m.id, m.started_at, age_of(m.started, now), human_size(m.size), ",".join(m.database_names),
         ",".join(m.tags) or "-", "keep" if m.keep else "-", verified_text(r),
         *([copies_text(m.id, held)] if held else [])]
        for m, r in zip(complete, records, strict=True)])
    if not complete:
        output.info("  (no complete backup)")
    _show_incomplete(output, incomplete, uploads, now)
    listed = [{**_backup_json(m, r, now), **(copies_json(m.id, held) if held else {})}
              for m, r in zip(complete, records, strict=True)]
    output.result({"env": env.name, "backups": listed,
                   "incomplete": [{"id": i.id, "keys": i.keys, "newest_modified": i.newest_modified.isoformat(),
                                   "problem": i.problem} for i in incomplete],
                   "uploads": [{"key": u.key, "initiated": u.initiated.isoformat()} for u in uploads]})


def _show_incomplete(output: Output, incomplete: list[IncompleteBackup], uploads: list[Any], now: datetime) -> None:
    if incomplete:
        output.info("incomplete (no usable manifest: not backups; backup.prune removes them after a day):")
        for item in incomplete:
            output.info(f"  {item.id}  {age_of(item.newest_modified, now)} old, {len(item.keys)} object(s)"
                        + (f" — {item.problem}" if item.problem else ""))
    if uploads:
        output.info("unfinished multipart uploads (a backup that died mid-upload):")
        for upload in uploads:
            output.info(f"  {upload.key}  started {age_of(upload.initiated, now)} ago")


def _backup_json(manifest: Manifest, records: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    return {"id": manifest.id, "started_at": manifest.started_at, "finished_at": manifest.finished_at,
            "age_seconds": int((now - manifest.started).total_seconds()), "size": manifest.size,
            "sha256": manifest.sha256, "databases": [
                {"name": part.database.name, "key": part.object.key, "size": part.size, "sha256": part.sha256}
                for part in manifest.parts()],
            "tags": manifest.tags, "keep": manifest.keep, "encrypted": manifest.encrypted,
            "verified": records[-1] if records else None, "verifications": len(records)}
