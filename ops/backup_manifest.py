"""The backup manifest (format 1) and the storage layout every backup module shares.

Under the environment's backup bucket and prefix:

    backups/<id>/dump.pgc.zst[.age]   the stored dump (pg_dump -Fc -Z0 → zstd → optional age)
    backups/<id>/manifest.json        written LAST: a backup without one is incomplete
    backups/<id>/verification.json    appended by backup.verify; the manifest stays immutable
    verifications/<id>.json           the same, where a bucket lock rule holds all of backups/ (R2 with
                                      lock_days): outside it, so a new record never overwrites a locked object
    backups/<id>/globals.sql.zst[.age] the cluster's roles (pg_dumpall --globals-only), in `globals`

With several databases (`database.names`), each database's dump has a folder of its own and the one
manifest lists them all in `databases` (its top-level dump fields describe the first of them):

    backups/<id>/databases/<name>/dump.pgc.zst[.age]   <name> percent-encoded (quote(name, safe=""))

A manifest without `databases` is one database, stored as above: backups taken before keep loading.

A manifest is the only proof that a backup exists. Loading one validates it and
names the backup when it is malformed, so no module ever works on half a manifest.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ops.clock import parse_time
from ops.errors import CheckFailed, UsageError
from ops.lazy_dataclasses import dataclass

if TYPE_CHECKING:
    from ops.storage import ObjectLock, Storage

FORMAT = 1
BACKUPS_DIR = "backups/"
MANIFEST_NAME = "manifest.json"
VERIFICATION_NAME = "verification.json"
VERIFICATIONS_DIR = "verifications/"
DUMP_NAME = "dump.pgc.zst"
DATABASES_DIR = "databases/"
ENCRYPTED_SUFFIX = ".age"
MANIFEST_READERS = 8  # manifests are small: fetch several at once when listing many backups


def backup_prefix(backup_id: str) -> str:
    return f"{BACKUPS_DIR}{backup_id}/"


def manifest_key(backup_id: str) -> str:
    return backup_prefix(backup_id) + MANIFEST_NAME


def verification_key(backup_id: str) -> str:
    return backup_prefix(backup_id) + VERIFICATION_NAME


def unlocked_verification_key(backup_id: str) -> str:
    """Outside backups/: where a bucket lock rule on backups/ cannot stop a record from being rewritten."""
    return f"{VERIFICATIONS_DIR}{backup_id}.json"


def verified_ids(storage: Storage) -> set[str]:
    """The backups with a verification record in either place (two listings, no request per backup)."""
    inside = {info.key[len(BACKUPS_DIR):-len("/" + VERIFICATION_NAME)] for info in storage.list(BACKUPS_DIR)
              if info.key.endswith("/" + VERIFICATION_NAME)}
    outside = {info.key[len(VERIFICATIONS_DIR):-len(".json")] for info in storage.list(VERIFICATIONS_DIR)
               if info.key.endswith(".json")}
    return inside | outside


def dump_key(backup_id: str, encrypted: bool, database: str | None = None) -> str:
    """The dump's key: one database's at the backup's top; with `database` (several), in its own folder."""
    folder = "" if database is None else f"{DATABASES_DIR}{quote(database, safe='')}/"
    return backup_prefix(backup_id) + folder + DUMP_NAME + (ENCRYPTED_SUFFIX if encrypted else "")


# --- the manifest ------------------------------------------------------------------------------


@dataclass
class DatabaseInfo:
    """The database a backup was taken from."""

    name: str
    target: str  # user@host:port/db, never a password
    server_version: str
    server_major: int


@dataclass
class ToolInfo:
    """The pg_dump that wrote a backup."""

    version: str
    major: int


@dataclass
class StoredObject:
    """The dump as stored: key, size, checksum, compression and encryption."""

    key: str
    size: int  # bytes stored (compressed, maybe encrypted)
    sha256: str  # of the stored bytes
    dump_size: int  # bytes pg_dump wrote (before compression)
    compression: dict[str, Any] = field(default_factory=lambda: {"algorithm": "zstd", "level": 1})
    encryption: dict[str, Any] | None = None  # {"algorithm": "age", "recipients": [...]}


@dataclass
class DatabaseDump:
    """One database of a backup of several: its dump and what was read in that dump's own snapshot."""

    name: str
    target: str
    snapshot: str
    object: StoredObject
    row_counts: dict[str, int] = field(default_factory=dict)
    migrations: list[str] = field(default_factory=list)
    extensions: list[dict[str, str]] = field(default_factory=list)
    excluded_table_data: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    """Everything known about one backup, stored beside its dump."""

    id: str
    project: str
    env: str
    run_id: str
    database: DatabaseInfo
    pg_dump: ToolInfo
    snapshot: str
    started_at: str
    finished_at: str
    seconds: float
    object: StoredObject
    row_counts: dict[str, int] = field(default_factory=dict)
    migrations: list[str] = field(default_factory=list)
    extensions: list[dict[str, str]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    keep: bool = False
    # "schema.table" whose rows pg_dump left out (backups.exclude_table_data); row_counts keeps their live counts
    excluded_table_data: list[str] = field(default_factory=list)
    # the object lock every stored object of this backup was written with: {"mode", "retain_until"}
    lock: dict[str, str] | None = None
    # the cluster's globals beside the dump: {key, size, sha256, dump_size, role_passwords}; None in older backups
    globals: dict[str, Any] | None = None
    # several databases (database.names): each one's dump, the first one's also in the fields above; None: one
    databases: list[DatabaseDump] | None = None
    format: int = FORMAT

    @property
    def encrypted(self) -> bool:
        return self.object.encryption is not None

    @property
    def recipients(self) -> list[str]:
        return list((self.object.encryption or {}).get("recipients", []))

    @property
    def started(self) -> datetime:
        return parse_time(self.started_at)

    @property
    def finished(self) -> datetime:
        return parse_time(self.finished_at)

    @property
    def size(self) -> int:
        """Bytes stored by every dump of the backup."""
        return sum(part.object.size for part in self.databases) if self.databases else self.object.size

    @property
    def database_names(self) -> list[str]:
        return [part.name for part in self.databases] if self.databases else [self.database.name]

    def parts(self) -> list[Manifest]:
        """One manifest per database, each as a backup of that database alone: what verify, restore and the
        copies work on, dump by dump. A backup of one database is its own only part."""
        if not self.databases:
            return [self]
        return [dataclasses.replace(
            self, database=dataclasses.replace(self.database, name=part.name, target=part.target),
            snapshot=part.snapshot, object=part.object, row_counts=dict(part.row_counts),
            migrations=list(part.migrations), extensions=list(part.extensions),
            excluded_table_data=list(part.excluded_table_data), databases=None) for part in self.databases]

    def part(self, database: str | None) -> Manifest:
        """The part of one database; None picks the only one. UsageError naming those the backup holds."""
        parts = self.parts()
        if database is None and len(parts) == 1:
            return parts[0]
        held = ", ".join(self.database_names)
        if database is None:
            raise UsageError(f"backup {self.id} holds several databases ({held})",
                             hint="pick one with --database NAME")
        for part in parts:
            if part.database.name == database:
                return part
        raise UsageError(f"backup {self.id} holds no database {database!r}: it holds {held}",
                         hint="pass one of those to --database, or leave it out to restore them all")

    @property
    def expected_row_counts(self) -> dict[str, int]:
        """The rows a restore of this backup holds: the snapshot's counts, zero for the tables left out."""
        return {table: 0 if table in self.excluded_table_data else count for table, count in self.row_counts.items()}

    @property
    def locked_until(self) -> datetime | None:
        """Until when the storage refuses to delete this backup's objects, when it was written locked."""
        return parse_time(self.lock["retain_until"]) if self.lock else None

    @property
    def sha256(self) -> str:
        return self.object.sha256

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["databases"] is None:
            del data["databases"]  # a backup of one database is written as it always was
        return {"format": data.pop("format"), **data}

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=2).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | bytes, *, backup_id: str | None = None) -> Manifest:
        """A validated manifest; CheckFailed naming the backup when anything is missing or wrong."""
        name = backup_id or "?"
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except (ValueError, UnicodeDecodeError) as error:
                raise _malformed(name, [f"not JSON ({error})"]) from None
        if not isinstance(data, dict):
            raise _malformed(name, ["not a JSON object"])
        name = backup_id or str(data.get("id", "?"))
        problems = validate(data)
        if backup_id is not None and data.get("id") not in (None, backup_id):
            problems.append(f"id is {data.get('id')!r} but it is stored under {backup_id!r}")
        if problems:
            raise _malformed(name, problems)
        values = dict(data)
        values["database"] = DatabaseInfo(**_known(DatabaseInfo, data["database"]))
        values["pg_dump"] = ToolInfo(**_known(ToolInfo, data["pg_dump"]))
        values["object"] = StoredObject(**_known(StoredObject, data["object"]))
        if data.get("databases") is not None:
            values["databases"] = [DatabaseDump(**{**_known(DatabaseDump, part),
                                                   "object": StoredObject(**_known(StoredObject, part["object"]))})
                                   for part in data["databases"]]
        return cls(**_known(cls, values))


def _known(kind: type, data: dict[str, Any]) -> dict[str, Any]:
    """Only the fields this version knows: a newer writer's extra fields are ignored."""
    names = set(kind.__dataclass_fields__)
    return {key: value for key, value in data.items() if key in names}


def _malformed(backup_id: str, problems: list[str]) -> CheckFailed:
    return CheckFailed(f"backup {backup_id}: manifest.json is malformed: {'; '.join(problems)}",
                       hint="this backup cannot be trusted as it is; inspect the manifest in the backup bucket, "
                            "and take a fresh backup")


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": int, "id": str, "project": str, "env": str, "run_id": str, "database": dict, "pg_dump": dict,
    "snapshot": str, "started_at": str, "finished_at": str, "seconds": (int, float), "object": dict,
    "row_counts": dict, "migrations": list, "extensions": list, "tags": list, "keep": bool,
}
_NESTED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "database": {"name": str, "target": str, "server_version": str, "server_major": int},
    "pg_dump": {"version": str, "major": int},
    "object": {"key": str, "size": int, "sha256": str, "dump_size": int, "compression": dict},
}


def validate(data: dict[str, Any]) -> list[str]:
    """Every problem of a manifest, as `path: problem` lines (empty when valid)."""
    problems = _check_fields(data, _REQUIRED, "")
    if isinstance(data.get("format"), int) and data["format"] != FORMAT:
        problems.append(f"format {data['format']} is not supported (this opsbook reads format {FORMAT})")
    for section, fields in _NESTED.items():
        if isinstance(data.get(section), dict):
            problems += _check_fields(data[section], fields, f"{section}.")
    stored = data.get("object") if isinstance(data.get("object"), dict) else {}
    if isinstance(stored.get("sha256"), str) and not _is_sha256(stored["sha256"]):
        problems.append("object.sha256: not 64 lowercase hex digits")
    encryption = stored.get("encryption")
    if encryption is not None and not (isinstance(encryption, dict) and isinstance(encryption.get("recipients"), list)):
        problems.append("object.encryption: must be null or {algorithm, recipients: [...]}")
    if not isinstance(data.get("excluded_table_data", []), list):
        problems.append("excluded_table_data: must be a list of table names")
    lock = data.get("lock")
    if lock is not None and not (isinstance(lock, dict) and isinstance(lock.get("retain_until"), str)
                                 and _is_time(lock["retain_until"])):
        problems.append("lock: must be null or {mode, retain_until: ISO-8601 time}")
    extra = data.get("globals")
    if extra is not None and not (isinstance(extra, dict) and isinstance(extra.get("key"), str)
                                  and isinstance(extra.get("size"), int) and isinstance(extra.get("sha256"), str)):
        problems.append("globals: must be null or {key, size, sha256, dump_size, role_passwords}")
    problems += _check_databases(data.get("databases"))
    counts = data.get("row_counts")
    if isinstance(counts, dict) and not all(isinstance(v, int) and not isinstance(v, bool) for v in counts.values()):
        problems.append("row_counts: every value must be an integer")
    for key in ("started_at", "finished_at"):
        if isinstance(data.get(key), str) and not _is_time(data[key]):
            problems.append(f"{key}: not an ISO-8601 time")
    return problems


_DATABASE_PART: dict[str, type | tuple[type, ...]] = {
    "name": str, "target": str, "snapshot": str, "object": dict, "row_counts": dict}


def _check_databases(parts: Any) -> list[str]:
    """`databases`: null (one database) or a non-empty list of dumps with distinct names."""
    if parts is None:
        return []
    if not isinstance(parts, list) or not parts or not all(isinstance(part, dict) for part in parts):
        return ["databases: must be null or a non-empty list of {name, target, snapshot, object, row_counts}"]
    problems = []
    for index, part in enumerate(parts):
        problems += _check_fields(part, _DATABASE_PART, f"databases.{index}.")
        if isinstance(part.get("object"), dict):
            problems += _check_fields(part["object"], _NESTED["object"], f"databases.{index}.object.")
            if isinstance(part["object"].get("sha256"), str) and not _is_sha256(part["object"]["sha256"]):
                problems.append(f"databases.{index}.object.sha256: not 64 lowercase hex digits")
    names = [part.get("name") for part in parts]
    if len(set(map(str, names))) != len(names):
        problems.append("databases: a database is listed twice")
    return problems


def _check_fields(data: dict[str, Any], fields: dict[str, type | tuple[type, ...]], path: str) -> list[str]:
    problems = []
    for name, kind in fields.items():
        if name not in data:
            problems.append(f"{path}{name}: missing")
        elif not isinstance(data[name], kind) or (kind is int and isinstance(data[name], bool)):
            problems.append(f"{path}{name}: wrong type ({type(data[name]).__name__})")
    return problems


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(character in "0123456789abcdef" for character in text)


def _is_time(text: str) -> bool:
    try:
        parse_time(text)
    except ValueError:
        return False
    return True


# --- listing -----------------------------------------------------------------------------------


@dataclass
class IncompleteBackup:
    """A backup folder without a (readable) manifest: an upload that died, or a damaged backup."""

    id: str
    keys: list[str]
    newest_modified: datetime
    problem: str | None = None  # set when a manifest exists but cannot be read: do not delete blindly


def list_backups(storage: Storage, *, strict: bool = True) -> tuple[list[Manifest], list[IncompleteBackup]]:
    """(complete backups newest first, incomplete ones newest first) from one listing of backups/.

    A malformed manifest raises CheckFailed naming the backup when `strict`; otherwise
    that backup is returned among the incomplete ones with `problem` set.
    """
    folders: dict[str, list[Any]] = {}
    for info in storage.list(BACKUPS_DIR):
        backup_id, _, rest = info.key[len(BACKUPS_DIR):].partition("/")
        if backup_id and rest:
            folders.setdefault(backup_id, []).append(info)
    with_manifest = [backup_id for backup_id, infos in folders.items()
                     if any(info.key == manifest_key(backup_id) for info in infos)]
    loaded = _load_many(storage, with_manifest)
    complete: list[Manifest] = []
    incomplete: list[IncompleteBackup] = []
    for backup_id, infos in folders.items():
        result = loaded.get(backup_id)
        if isinstance(result, Manifest):
            complete.append(result)
            continue
        if isinstance(result, CheckFailed) and strict:
            raise result
        incomplete.append(IncompleteBackup(backup_id, sorted(info.key for info in infos),
                                           max(info.last_modified for info in infos),
                                           problem=result.message if result else None))
    complete.sort(key=lambda manifest: (manifest.started_at, manifest.id), reverse=True)
    incomplete.sort(key=lambda backup: backup.id, reverse=True)
    return complete, incomplete


def _load_many(storage: Storage, backup_ids: list[str]) -> dict[str, Manifest | CheckFailed]:
    def load(backup_id: str) -> Manifest | CheckFailed:
        try:
            return read_manifest(storage, backup_id)
        except CheckFailed as error:
            return error

    if len(backup_ids) <= 1:
        return {backup_id: load(backup_id) for backup_id in backup_ids}
    with ThreadPoolExecutor(max_workers=MANIFEST_READERS) as pool:
        return dict(zip(backup_ids, pool.map(load, backup_ids), strict=True))


def read_manifest(storage: Storage, backup_id: str) -> Manifest:
    """The manifest of one backup; ObjectNotFound when it has none, CheckFailed when malformed."""
    return Manifest.from_json(storage.get_bytes(manifest_key(backup_id)), backup_id=backup_id)


def write_manifest(storage: Storage, manifest: Manifest, *, lock: ObjectLock | None = None) -> None:
    storage.put_bytes(manifest_key(manifest.id), manifest.dumps(), content_type="application/json", lock=lock)


# --- verifications -----------------------------------------------------------------------------


@dataclass
class Verification:
    """One verification of a backup: when, which kind (checksum or deep), whether it passed."""

    at: str
    kind: str  # "checksum" | "deep"
    ok: bool
    run_id: str
    operator: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_verifications(storage: Storage, backup_id: str) -> list[dict[str, Any]]:
    """The verification records of a backup, oldest first; [] when never verified. The record outside
    backups/, once written, holds the earlier ones too."""
    for key in (unlocked_verification_key(backup_id), verification_key(backup_id)):
        if storage.head(key) is not None:
            return _records(storage, key)
    return []


def _records(storage: Storage, key: str) -> list[dict[str, Any]]:
    try:
        records = json.loads(storage.get_bytes(key))
    except (ValueError, UnicodeDecodeError):
        return []  # a damaged record of past checks is not worth failing over: the next check rewrites it
    return [record for record in records if isinstance(record, dict)] if isinstance(records, list) else []


def append_verification(storage: Storage, backup_id: str, record: Verification | dict[str, Any], *,
                        outside_lock: bool = False) -> None:
    """Add `record` to the backup's verifications; `outside_lock` (a bucket lock rule holds backups/) writes
    them outside backups/, since the record inside could not be rewritten."""
    entry = record.to_json() if isinstance(record, Verification) else dict(record)
    records = [*read_verifications(storage, backup_id), entry]
    outside = unlocked_verification_key(backup_id)
    key = outside if outside_lock or storage.head(outside) is not None else verification_key(backup_id)
    storage.put_bytes(key, json.dumps(records, indent=2).encode(), content_type="application/json")


def last_verification(records: list[dict[str, Any]], *, ok: bool | None = True) -> dict[str, Any] | None:
    """The newest record (the newest successful one by default)."""
    matching = [record for record in records if ok is None or record.get("ok") is ok]
    return matching[-1] if matching else None
