"""backups.copies: every backup also in other buckets (3-2-1), and the step that puts it there.

A copy holds the same layout as the backup bucket (backups/<id>/dump…, manifest.json). A
backup reaches a copy after its manifest is written on the primary: the dump first, then the
manifest (the primary's bytes), so a copy never has a manifest without its dump; an
interrupted copy removes its partial dump. The dump goes server-side when the copy is on the
same service with the same keys (CopyObject, UploadPartCopy past 5 GiB), streamed otherwise
part by part as the backup's own upload (memory: the parts in flight), its sha256 checked
against the manifest on the way. A copy that fails leaves the primary backup as it is; the next
backup (it fills in what a copy misses) or `inv backup.copy --id ID` completes it.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, BinaryIO

from ops import dump
from ops.backup_manifest import Manifest, list_backups, manifest_key, read_manifest
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import ConnectionFailed, OpsError, StepFailed, UsageError
from ops.lazy_dataclasses import dataclass
from ops.output import human_size
from ops.storage import BucketNotFound, ObjectLock, open_storage
from ops.storage.s3 import MAX_COPY_OBJECT_SIZE

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.storage import ObjectInfo, Storage

UNREACHABLE = (ConnectionFailed, BucketNotFound)  # a bucket out of reach, as opposed to a damaged backup


# --- where the copies are ---------------------------------------------------------------------------


def copy_names(env: Environment) -> list[str]:
    return list(env.backup_copy_configs()) if env.has("backups") else []


def open_copy(env: Environment, name: str) -> Storage:
    configs = env.backup_copy_configs() if env.has("backups") else {}
    if name not in configs:
        known = ", ".join(configs) or "none"
        raise UsageError(f"envs.{env.name}.backups.copies has no copy named {name!r} (copies: {known})",
                         hint="pass --copy with one of the names in backups.copies")
    return open_storage(configs[name])


def backups_storage(ctx: RunContext, copy: str | None = None) -> Storage:
    """The backup bucket, or the copy named `copy`; opened once per run."""
    if copy is None:
        return ctx.storage("backups")
    return ctx.once(f"storage:copy:{copy}", lambda: open_copy(ctx.env, copy))


def use_a_copy(env: Environment, error: OpsError) -> OpsError:
    """An unreachable backup bucket's error, naming the copies to restore from instead (unchanged without)."""
    names = copy_names(env)
    if not names or not isinstance(error, UNREACHABLE):
        return error
    flags = " or ".join(f"--copy {name}" for name in names)
    named = type(error)(f"{error.message}; the backups are also in {', '.join(names)}: restore with {flags}",
                        where=error.where, hint=f"re-run with {flags}")
    return named


# --- copying one backup ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Copied:
    backup_id: str
    copy: str
    how: str  # "server-side" | "server-side, part by part" | "streamed"
    size: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.backup_id, "copy": self.copy, "how": self.how, "size": self.size,
                "seconds": self.seconds}


def how_copied(primary: Storage, copy: Storage, size: int | None) -> str:
    if not copy.same_account(primary):
        return "streamed"
    return "server-side, part by part" if size is not None and size > MAX_COPY_OBJECT_SIZE else "server-side"


def holds(copy: Storage, manifest: Manifest) -> bool:
    """Whether `copy` holds this very backup (its manifest there, naming the same dump)."""
    if copy.head(manifest_key(manifest.id)) is None:
        return False
    held = read_manifest(copy, manifest.id)
    if held.sha256 != manifest.sha256:
        raise StepFailed(f"{copy.describe()}: backups/{manifest.id} there is another backup (sha256 "
                         f"{held.sha256[:12]}…, the primary's is {manifest.sha256[:12]}…)",
                         hint=f"inspect both; remove the copy's folder backups/{manifest.id}/ to copy it again")
    return True


def copy_backup(primary: Storage, copy: Storage, name: str, backup_id: str,
                progress: Callable[..., Callable[[int], None]]) -> Copied | None:
    """Put one backup on one copy: its dumps (one per database), then manifest. None when the copy holds it.

    `progress(verb, total_bytes=…)` starts the transfer's reporter (RunContext.progress: a bar or lines)."""
    manifest_bytes = primary.get_bytes(manifest_key(backup_id))
    manifest = Manifest.from_json(manifest_bytes, backup_id=backup_id)
    if holds(copy, manifest):
        return None
    infos = []
    for part in manifest.parts():
        info = primary.head(part.object.key)
        if info is None or info.size != part.size:
            raise StepFailed(f"{primary.describe()}: the dump {part.object.key} of backup {backup_id} is missing or "
                             "has the wrong size",
                             hint=f"verify it (`inv backup.verify --id {backup_id}`); it cannot be copied as it is")
        infos.append((part, info))
    started = time.monotonic()
    how, lock = how_copied(primary, copy, infos[0][1].size), copy_lock(copy, manifest)
    try:
        for part, info in infos:
            what = "" if part is manifest else f" {part.database.name}"
            _copy_dump(primary, copy, info, part, how_copied(primary, copy, info.size),
                       progress(f"{backup_id}{what} → {name}: copied", total_bytes=info.size), lock)
        _copy_globals(primary, copy, manifest, lock)
        copy.put_bytes(manifest_key(backup_id), manifest_bytes, content_type="application/json", lock=lock)
    except BaseException:
        _remove_partial(copy, manifest)
        raise
    return Copied(backup_id, name, how, manifest.size, round(time.monotonic() - started, 3))


def copy_lock(copy: Storage, manifest: Manifest) -> ObjectLock | None:
    """A locked backup's retention on an S3 copy: the primary's date (and mode), so a leaked key of either
    bucket erases neither. None for an unlocked backup, and on R2, whose bucket lock rules are the
    bucket owner's to set."""
    until = manifest.locked_until
    if until is None or copy.config.provider != "s3":
        return None
    mode = str(manifest.lock.get("mode")) if manifest.lock else ""
    return ObjectLock(mode.upper() if mode in ("governance", "compliance") else "GOVERNANCE", until)


def _copy_dump(primary: Storage, copy: Storage, info: ObjectInfo, manifest: Manifest, how: str,
               progress: Callable[[int], None], lock: ObjectLock | None) -> None:
    key = manifest.object.key
    if how == "streamed":
        with primary.open_read(key) as reader:
            hashing = HashingReader(reader)
            copy.upload_stream(key, hashing, part_size=dump.part_size_for(info.size), on_progress=progress,
                               metadata=info.metadata, content_type=info.content_type, lock=lock)
        if (hashing.size, hashing.sha256) != (manifest.size, manifest.sha256):
            raise StepFailed(f"{primary.describe()}: backup {manifest.id} read back as {hashing.size} bytes with "
                             f"sha256 {hashing.sha256[:12]}…, not as its manifest says: not copied",
                             hint=f"verify it (`inv backup.verify --id {manifest.id}`)")
    else:
        pinned = (copy.server_side_copy(primary, info, key, lock=lock) if how == "server-side"
                  else copy.multipart_copy(primary, info, key, part_size=dump.part_size_for(info.size), lock=lock))
        if not pinned:
            raise StepFailed(f"{primary.describe()}: the dump of backup {manifest.id} changed while it was "
                             "copied", hint="run the copy again")
    stored = copy.head(key)
    if stored is None or stored.size != manifest.size:
        raise StepFailed(f"{copy.describe()}: {key} is missing or has the wrong size after the copy",
                         hint="run the copy again")


def _copy_globals(primary: Storage, copy: Storage, manifest: Manifest, lock: ObjectLock | None) -> None:
    """The cluster's roles beside the dump (a few KiB: read whole), checked against the manifest."""
    stored = manifest.globals
    if not stored:
        return
    data = primary.get_bytes(stored["key"])
    if (len(data), hashlib.sha256(data).hexdigest()) != (stored["size"], stored["sha256"]):
        raise StepFailed(f"{primary.describe()}: the globals of backup {manifest.id} do not match its manifest: "
                         "not copied", hint=f"verify it (`inv backup.verify --id {manifest.id}`)")
    copy.put_bytes(stored["key"], data, content_type="application/octet-stream", lock=lock)


def _remove_partial(copy: Storage, manifest: Manifest) -> None:
    """After a failed or interrupted copy: no dump (or globals) without its manifest is left behind."""
    with suppress(Exception):
        if copy.head(manifest_key(manifest.id)) is None:
            for part in manifest.parts():
                copy.delete(part.object.key)
            if manifest.globals:
                copy.delete(manifest.globals["key"])


class HashingReader(io.RawIOBase):
    """Passes a stream through, counting and hashing it: the streamed copy's check, chunk by chunk."""

    def __init__(self, source: BinaryIO):
        super().__init__()
        self._source = source
        self._digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        self._digest.update(chunk)
        self.size += len(chunk)
        return chunk

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


# --- which copies hold which backups -----------------------------------------------------------------


def held_ids(copy: Storage) -> set[str]:
    complete, _ = list_backups(copy, strict=False)
    return {manifest.id for manifest in complete}


def holdings(env: Environment, warn: Callable[[str], None]) -> dict[str, set[str] | None]:
    """Per copy, the ids of the complete backups it holds; None for a copy that cannot be read now."""
    found: dict[str, set[str] | None] = {}
    for name in copy_names(env):
        try:
            found[name] = held_ids(open_copy(env, name))
        except OpsError as error:
            warn(f"copy {name} cannot be read: {error.message}")
            found[name] = None
    return found


def copies_text(backup_id: str, held: dict[str, set[str] | None]) -> str:
    """The list's column: the copies that hold the backup, then "copy missing: …" for those that do not."""
    present = [name for name, ids in held.items() if ids is not None and backup_id in ids]
    missing = [name for name, ids in held.items() if ids is not None and backup_id not in ids]
    unknown = [name for name, ids in held.items() if ids is None]
    words = [*present, *(["copy missing: " + ",".join(missing)] if missing else []),
             *([f"{','.join(unknown)}: ?"] if unknown else [])]
    return " ".join(words) or "-"


def copies_json(backup_id: str, held: dict[str, set[str] | None]) -> dict[str, Any]:
    return {"copies": {name: (None if ids is None else backup_id in ids) for name, ids in held.items()},
            "copy_missing": [name for name, ids in held.items() if ids is not None and backup_id not in ids]}


# --- the step ---------------------------------------------------------------------------------------


class CopiesStep(Step):
    """Each copy receives what it lacks: after a backup, that backup and any the copy missed before;
    for `backup.copy`, the backup asked for."""

    name = "copies"

    def __init__(self, names: list[str], *, backup_id: str | None = None, only: str | None = None):
        self.names, self.backup_id, self.only = names, backup_id, only
        what = f"backup {only}" if only else f"backup {backup_id} (and any backup a copy misses)"
        self.title = f"copy {what} to {', '.join(names)}: the dump, then its manifest"

    def check(self, ctx: RunContext) -> Change | None:
        primary = backups_storage(ctx)
        ids = [m.id for m in list_backups(primary, strict=False)[0]]
        if self.only is not None and self.only not in ids:
            raise UsageError(f"no complete backup {self.only!r} in {primary.describe()}",
                             hint="`inv backup.list` shows the backups")
        wanted = [self.only] if self.only else _unique([*([self.backup_id] if self.backup_id else []), *ids])
        todo, details = [], []
        for name in self.names:
            missing, note = self._missing(ctx, name, wanted)
            todo += [[name, backup_id] for backup_id in missing]
            how = how_copied(primary, backups_storage(ctx, name), None)
            details += [f"{backup_id} → {name} ({how}){note}" for backup_id in missing]
        if not todo:
            return None
        return Change(f"copy {len(todo)} backup(s) to {', '.join(sorted({n for n, _ in todo}))}", details,
                      {"todo": todo})

    @staticmethod
    def _missing(ctx: RunContext, name: str, wanted: list[str]) -> tuple[list[str], str]:
        try:
            held = held_ids(backups_storage(ctx, name))
        except OpsError as error:  # a copy out of reach must not stop the backup itself: apply tries it
            return wanted, f" — not answering now: {error.message}"
        return [backup_id for backup_id in wanted if backup_id not in held], ""

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        primary = backups_storage(ctx)
        copied, failures = [], []
        for name, backup_id in change.data["todo"]:
            try:
                done = copy_backup(primary, backups_storage(ctx, name), name, backup_id, ctx.progress)
            except OpsError as error:
                failures.append((name, backup_id, error.message))
                ctx.output.warn(f"copy {name}: backup {backup_id} was not copied: {error.message}")
                continue
            if done is not None:
                ctx.log(f"{backup_id} → {name}: {human_size(done.size)} copied {done.how} in {done.seconds:.1f}s")
                copied.append(done.to_json())
        if failures:
            raise _copies_failed(ctx.env.name, failures)
        return {"copied": copied}

    def verify(self, ctx: RunContext) -> None:
        for item in (ctx.state.get(self.name) or {}).get("copied", []):
            if backups_storage(ctx, item["copy"]).head(manifest_key(item["id"])) is None:
                raise StepFailed(f"copy {item['copy']}: backups/{item['id']}/manifest.json is missing after the copy",
                                 hint=f"`inv backup.copy --env {ctx.env.name} --id {item['id']}` copies it again")


def _copies_failed(env: str, failures: list[tuple[str, str, str]]) -> StepFailed:
    ids = _unique([backup_id for _, backup_id, _ in failures])
    names = _unique([name for name, _, _ in failures])
    reasons = "; ".join(f"{name}: {reason}" for name, _, reason in failures[:3])
    return StepFailed(f"{len(failures)} copy(ies) failed ({reasons}); the primary backup is kept, listed as "
                      f"\"copy missing: {','.join(names)}\"",
                      hint=f"fix the copy's settings; the next backup fills it in, or "
                           f"`inv backup.copy --env {env} --id {ids[0]}` now")


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def build(env: Environment, **arguments: Any) -> Runbook:
    """`inv backup.copy --id ID [--copy NAME]`: fill in what a copy misses."""
    names = copy_names(env)
    if not names:
        raise UsageError(f"envs.{env.name}.backups.copies is not set: there is no copy to fill in",
                         hint="add backups.copies (name, bucket, …) to the inventory")
    chosen = arguments.get("copy")
    if chosen:
        open_copy(env, chosen)  # an unknown name is a usage error before anything runs
    backup_id = str(arguments.get("backup_id") or "ID")  # ID: the checklist of `inv runbook.show`
    step = CopiesStep([chosen] if chosen else names, only=backup_id)
    return Runbook("backup.copy", f"Copy backup {backup_id} of {env.name}", [step], arguments=arguments,
                   locks=("environment",), confirm_exempt="adds a copy of an existing backup to another bucket")
