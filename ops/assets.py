"""Cold-storage copies of the app bucket: incremental, parallel, every run a restorable point in time.

Layout under the environment's backup bucket and prefix (DESIGN §6):

    assets/<run-id>/<key>            the objects that run copied: only new or changed ones
    assets/manifests/<run-id>.json   written last: every key of the app bucket at that run,
                                     with its size, source ETag and where its copy is stored

Copies are never overwritten, so each manifest keeps describing what the bucket
held at its run; an object deleted at the source stays in cold storage and is
marked `deleted_at_source` (cold storage must survive an accidental delete).

Skipping unchanged objects compares key, size and the SOURCE ETag recorded in
the newest manifest (a copy's own ETag differs from a multipart original's).
A streamed copy (another provider or other keys) also carries the source ETag in
its metadata, so the copies of a run that died before its manifest are adopted by
the next run instead of streamed again; a server-side copy (same account: one
CopyObject pinned to the listed ETag, metadata kept as is) is cheap to redo.
"""

from __future__ import annotations

import json
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ops.clock import iso_z, utc_now
from ops.errors import CheckFailed, OpsError, StepFailed, UsageError
from ops.lazy_dataclasses import dataclass
from ops.output import Progress, human_size  # called with (objects done, to do, size=bytes done)
from ops.secrets import redact
from ops.storage import ObjectNotFound
from ops.storage.s3 import MAX_COPY_OBJECT_SIZE

if TYPE_CHECKING:
    from ops.storage import ObjectInfo, Storage

ASSETS = "assets/"
MANIFESTS = "assets/manifests/"
SOURCE_ETAG = "opsbook-source-etag"  # S3 lowercases metadata names: keep it lower case
FORMAT = 1
DEFAULT_WORKERS = 10  # botocore keeps 10 connections per client: more threads would wait or reconnect


def timestamp(moment: datetime | None = None) -> str:
    return iso_z(moment or utc_now())


def stored_key(run_id: str, key: str) -> str:
    return f"{ASSETS}{run_id}/{key}"


def manifest_key(run_id: str) -> str:
    return f"{MANIFESTS}{run_id}.json"


# ------------------------------------------------------------------ the manifest

@dataclass(frozen=True)
class AssetEntry:
    """One object of the app bucket as the copy last saw it, and where it stands."""

    key: str  # in the app bucket, relative to its prefix
    size: int
    etag: str | None  # the source object's ETag when it was copied
    stored: str  # where the copy is, relative to the backup prefix
    copied_at: str
    deleted_at_source: str | None = None


@dataclass
class AssetManifest:
    """What one asset copy found and copied, per key."""

    run_id: str
    env: str
    source: str  # the app bucket, described without secrets
    started_at: str
    finished_at: str
    entries: dict[str, AssetEntry] = field(default_factory=dict)

    def to_json(self) -> str:
        present = [e for e in self.entries.values() if e.deleted_at_source is None]
        body = {"format": FORMAT, "run_id": self.run_id, "env": self.env, "source": self.source,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "totals": {"objects": len(present), "bytes": sum(e.size for e in present),
                           "deleted_at_source": len(self.entries) - len(present)},
                "objects": [asdict(entry) for _, entry in sorted(self.entries.items())]}
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> AssetManifest:
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT:
                raise ValueError(f"format {body.get('format')!r}, expected {FORMAT}")
            entries = {item["key"]: AssetEntry(**item) for item in body["objects"]}
            return cls(body["run_id"], body["env"], body["source"], body["started_at"], body["finished_at"],
                       entries)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckFailed(f"asset manifest {where} is malformed: {redact(error)}",
                              hint="move it aside; the next run then re-copies what it cannot vouch for") from None


def latest_manifest(backups: Storage) -> AssetManifest | None:
    """The newest run's manifest (run ids sort by time), or None before the first run."""
    keys = sorted(info.key for info in backups.list(MANIFESTS) if info.key.endswith(".json"))
    if not keys:
        return None
    return AssetManifest.from_json(backups.get_bytes(keys[-1]), f"{backups.describe()} {keys[-1]}")


# ------------------------------------------------------------------ planning

@dataclass
class CopyPlan:
    """What an asset copy will do: the keys to copy, keep, adopt and mark deleted."""

    source: list[ObjectInfo]  # everything in the app bucket now
    to_copy: list[ObjectInfo]
    kept: dict[str, AssetEntry]  # unchanged, or adopted from an interrupted run: no data to move
    adopted: list[str]  # the keys of `kept` whose copy a run without manifest left behind
    newly_deleted: list[str]  # in the last manifest, gone from the source since
    previous: AssetManifest | None

    @property
    def bytes_to_copy(self) -> int:
        return sum(info.size for info in self.to_copy)

    @property
    def bytes_kept(self) -> int:
        return sum(entry.size for entry in self.kept.values())

    def is_empty(self) -> bool:
        return not (self.to_copy or self.adopted or self.newly_deleted)


def plan_copy(source: Storage, backups: Storage) -> CopyPlan:
    """Read-only: what must be copied so cold storage matches the app bucket."""
    previous = latest_manifest(backups)
    stored = {info.key: info for info in backups.list(ASSETS) if not info.key.startswith(MANIFESTS)}
    orphans = _orphan_copies(stored, previous)
    own = _backup_area(source, backups)
    listing = [info for info in source.list() if own is None or not info.key.startswith(own)]
    to_copy: list[ObjectInfo] = []
    kept: dict[str, AssetEntry] = {}
    adopted: list[str] = []
    for info in listing:
        entry = _still_valid(info, previous, stored)
        if entry is None and info.key in orphans:
            entry = _adoptable(info, backups, orphans[info.key])
            if entry is not None:
                adopted.append(info.key)
        if entry is None:
            to_copy.append(info)
        else:
            kept[info.key] = entry
    present = {info.key for info in listing}
    old_entries = previous.entries if previous else {}
    newly_deleted = sorted(key for key, entry in old_entries.items()
                           if key not in present and entry.deleted_at_source is None)
    return CopyPlan(listing, to_copy, kept, adopted, newly_deleted, previous)


def _backup_area(source: Storage, backups: Storage) -> str | None:
    """Where the backups live inside the app bucket's listing, when they share a bucket:
    never copy the copies."""
    mine, theirs = source.config, backups.config
    same_bucket = (mine.provider, mine.endpoint, mine.path, mine.bucket) == (
        theirs.provider, theirs.endpoint, theirs.path, theirs.bucket)
    if not same_bucket or not theirs.prefix.startswith(mine.prefix):
        return None
    area = theirs.prefix[len(mine.prefix):]
    if not area:
        raise UsageError(f"{source.describe()} is both the app bucket and the backup area",
                         hint="give backups its own bucket, or at least its own prefix (backups.prefix)")
    return area


def _still_valid(info: ObjectInfo, previous: AssetManifest | None,
                 stored: dict[str, ObjectInfo]) -> AssetEntry | None:
    """The last manifest's entry when the source is unchanged and its copy is still there."""
    entry = previous.entries.get(info.key) if previous else None
    if entry is None or entry.size != info.size or entry.etag != info.etag:
        return None
    copy = stored.get(entry.stored)
    if copy is None or copy.size != entry.size:
        return None  # the copy went missing: copy it again
    if entry.deleted_at_source is not None:  # deleted, then put back unchanged
        return AssetEntry(entry.key, entry.size, entry.etag, entry.stored, entry.copied_at)
    return entry


def _orphan_copies(stored: dict[str, ObjectInfo], previous: AssetManifest | None) -> dict[str, list[ObjectInfo]]:
    """Copies made by runs newer than the last manifest (they died before writing theirs), by source key."""
    newest_complete = previous.run_id if previous else ""
    orphans: dict[str, list[ObjectInfo]] = {}
    for key, info in stored.items():
        run_id, _, source_key = key[len(ASSETS):].partition("/")
        if source_key and run_id > newest_complete:
            orphans.setdefault(source_key, []).append(info)
    return orphans


def _adoptable(info: ObjectInfo, backups: Storage, candidates: list[ObjectInfo]) -> AssetEntry | None:
    for candidate in sorted(candidates, key=lambda c: c.key, reverse=True):
        if candidate.size != info.size:
            continue
        head = backups.head(candidate.key)  # only a listing's size is free; the source ETag is in metadata
        if head is not None and info.etag and head.metadata.get(SOURCE_ETAG) == info.etag:
            return AssetEntry(info.key, info.size, info.etag, candidate.key, timestamp(head.last_modified))
    return None


def describe_plan(plan: CopyPlan, *, sample: int = 10) -> list[str]:
    lines = [f"copy {len(plan.to_copy)} objects ({human_size(plan.bytes_to_copy)}); skip "
             f"{len(plan.kept)} unchanged ({human_size(plan.bytes_kept)})"]
    if plan.adopted:
        lines.append(f"{len(plan.adopted)} copies left by an interrupted run are adopted, not copied again")
    if plan.newly_deleted:
        lines.append(f"{len(plan.newly_deleted)} deleted at the source since the last run: kept in cold storage, "
                     f"marked deleted ({', '.join(plan.newly_deleted[:sample])}"
                     f"{', …' if len(plan.newly_deleted) > sample else ''})")
    lines += [f"copy {info.key} ({human_size(info.size)})" for info in plan.to_copy[:sample]]
    if len(plan.to_copy) > sample:
        lines.append(f"… and {len(plan.to_copy) - sample} more")
    return lines


# ------------------------------------------------------------------ copying

def run_copy(source: Storage, backups: Storage, plan: CopyPlan, *, run_id: str, env: str, started_at: str,
             workers: int = DEFAULT_WORKERS, on_progress: Progress | None = None) -> AssetManifest:
    """Copy what the plan says in parallel, then write the run's manifest (last)."""
    copied = copy_objects(source, backups, plan.to_copy, run_id=run_id, workers=workers, on_progress=on_progress)
    now = timestamp()
    entries = dict(plan.kept)
    entries.update(copied)  # a planned key missing from `copied` was deleted before its copy
    old_entries = plan.previous.entries if plan.previous else {}
    for key, entry in old_entries.items():
        if key not in entries:  # gone from the source: the copy stays, marked
            entries[key] = entry if entry.deleted_at_source else AssetEntry(
                entry.key, entry.size, entry.etag, entry.stored, entry.copied_at, deleted_at_source=now)
    manifest = AssetManifest(run_id, env, source.describe(), started_at, timestamp(), entries)
    backups.put_bytes(manifest_key(run_id), manifest.to_json().encode(), content_type="application/json")
    return manifest


def copy_objects(source: Storage, backups: Storage, objects: list[ObjectInfo], *, run_id: str,
                 workers: int = DEFAULT_WORKERS, on_progress: Progress | None = None) -> dict[str, AssetEntry]:
    """Copy `objects` under assets/<run_id>/; the first failure stops the rest and is raised."""
    copied: dict[str, AssetEntry] = {}
    size = 0
    if not objects:
        return copied
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="asset-copy") as pool:
        futures = {pool.submit(copy_one, source, backups, info, stored_key(run_id, info.key)): info
                   for info in objects}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise _copy_failed(futures[future], future.exception(), len(copied), len(objects))
                entry = future.result()
                if entry is not None:
                    copied[entry.key] = entry
                size += futures[future].size
            if on_progress:
                on_progress(len(objects) - len(pending), len(objects), size=size)
    return copied


def _copy_failed(info: ObjectInfo, error: BaseException, done: int, total: int) -> OpsError:
    if isinstance(error, KeyboardInterrupt):
        raise error
    reason = f"{error.message}" if isinstance(error, OpsError) else f"{type(error).__name__}: {error}"
    failure = StepFailed(redact(f"copying {info.key} failed after {done} of {total} objects: {reason}"),
                         hint="re-run: the objects already copied are kept and adopted, not copied again")
    if isinstance(error, OpsError):
        failure.exit_code = error.exit_code
    return failure


def copy_one(source: Storage, backups: Storage, info: ObjectInfo, dest_key: str) -> AssetEntry | None:
    """Copy one object; None if it vanished meanwhile.

    Same account: one server-side CopyObject that keeps the source's metadata and
    content type, pinned to the listed ETag (x-amz-copy-source-if-match). Otherwise,
    or when the object changed since the listing: read its info (HEAD) first, then
    copy it with the source ETag in the copy's metadata. The info is read before the
    data, so a recorded ETag is never newer than the data: at worst the next run
    copies it once more."""
    pinned = bool(info.etag) and _server_side_possible(source, backups, info.size)
    if pinned and backups.server_side_copy(source, info, dest_key):
        return AssetEntry(info.key, info.size, info.etag, dest_key, timestamp())
    current = source.head(info.key)
    if current is None:
        return None
    metadata = {**current.metadata, SOURCE_ETAG: current.etag or ""}
    if _server_side_possible(source, backups, current.size):
        backups.server_side_copy(source, current, dest_key, metadata=metadata)
    else:
        try:
            with source.open_read(info.key) as reader:
                backups.upload_stream(dest_key, reader, metadata=metadata, content_type=current.content_type)
        except ObjectNotFound:
            return None
    return AssetEntry(info.key, current.size, current.etag, dest_key, timestamp())


def _server_side_possible(source: Storage, backups: Storage, size: int) -> bool:
    return backups.same_account(source) and size <= MAX_COPY_OBJECT_SIZE


def restore_pairs(manifest: AssetManifest, *, include_deleted: bool = False) -> list[tuple[str, str]]:
    """(stored copy, key in the app bucket) for every object of that point in time."""
    return [(entry.stored, entry.key) for _, entry in sorted(manifest.entries.items())
            if include_deleted or entry.deleted_at_source is None]


# ------------------------------------------------------------------ lifecycle rules

ABORT_RULE = "opsbook-abort-incomplete-uploads"
ARCHIVE_RULE = "opsbook-archive-assets"
# Colder classes that still read instantly: a 3 a.m. restore cannot wait hours for a thaw.
ARCHIVE_CLASS = {"s3": "GLACIER_IR", "r2": "STANDARD_IA"}  # R2: Infrequent Access


def lifecycle_unsupported(storage: Storage) -> str | None:
    """Why lifecycle rules cannot be set on this bucket, or None when they can."""
    if storage.config.provider == "local":
        return (f"{storage.describe()}: the local provider (a folder) has no lifecycle rules; nothing is set "
                "there: remove stale .incomplete/ uploads and archive by hand if needed")
    return None


def desired_rules(storage: Storage, *, abort_days: int, archive_days: int | None) -> list[dict[str, Any]]:
    """Our rules for this bucket, scoped to its prefix (several environments may share a bucket)."""
    prefix = storage.config.prefix
    scope = prefix or "*"
    rules: list[dict[str, Any]] = [{
        "ID": f"{ABORT_RULE} {scope}", "Status": "Enabled", "Filter": {"Prefix": prefix},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": abort_days}}]
    if archive_days is not None:
        rules.append({
            "ID": f"{ARCHIVE_RULE} {scope}", "Status": "Enabled", "Filter": {"Prefix": prefix + ASSETS},
            "Transitions": [{"Days": archive_days, "StorageClass": ARCHIVE_CLASS[storage.config.provider]}]})
    return rules


def _normal(rule: dict[str, Any]) -> tuple[Any, ...]:
    """What matters in a rule, whatever defaults and ordering the server adds when reading it back."""
    prefix = (rule.get("Filter") or {}).get("Prefix", rule.get("Prefix", ""))
    abort = (rule.get("AbortIncompleteMultipartUpload") or {}).get("DaysAfterInitiation")
    transitions = tuple(sorted((t.get("Days"), t.get("StorageClass")) for t in rule.get("Transitions") or []))
    return rule.get("ID"), rule.get("Status"), prefix, abort, transitions


def rules_to_set(existing: list[dict[str, Any]], desired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The desired rules that are missing or differ from what the bucket has."""
    have = {_normal(rule) for rule in existing}
    return [rule for rule in desired if _normal(rule) not in have]


def merged_rules(existing: list[dict[str, Any]], desired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The bucket's whole configuration: its other rules untouched, ours replaced by ID."""
    ours = {rule["ID"] for rule in desired}
    return [rule for rule in existing if rule.get("ID") not in ours] + desired


def describe_rule(rule: dict[str, Any]) -> str:
    prefix = rule["Filter"]["Prefix"] or "the whole bucket"
    if "AbortIncompleteMultipartUpload" in rule:
        days = rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]
        return f"abort incomplete multipart uploads after {days} days under {prefix}"
    transition = rule["Transitions"][0]
    return f"move objects under {prefix} to {transition['StorageClass']} after {transition['Days']} days"
