"""The cluster's globals (roles, their attributes and memberships) beside each backup, and their restore.

Backup: `pg_dumpall --globals-only` → zstd → age (as the dump, ops/dump.py) → backups/<id>/globals.sql.zst[.age],
named in the manifest with its size and sha256. Where the role cannot read pg_authid (Neon, RDS, any
non-superuser) it runs with --no-role-passwords: the roles come back without passwords.

Restore (`restore --with-globals`): the roles the target server lacks are created before the dump is
restored, so its objects keep their owners and grants. Only missing roles: an existing role is never
altered or dropped; the restoring role itself, superusers and reserved pg_* roles are skipped;
memberships are granted only where one side is a role created here. Tablespaces are left out (paths
belong to the old server). Password hashes in the file never reach any output.
"""

from __future__ import annotations

import io
import re
import subprocess
import threading
from dataclasses import field
from typing import TYPE_CHECKING, Any

from ops import dump, fetch, neon, pg, pg_tools, pg_url, processes
from ops.backup_manifest import backup_prefix
from ops.errors import StepFailed, UsageError
from ops.lazy_dataclasses import dataclass
from ops.patterns import Pattern
from ops.secrets import Secret, redact

if TYPE_CHECKING:
    import psycopg

    from ops.backup_manifest import Manifest
    from ops.inventory import Environment
    from ops.storage import ObjectLock, Storage

GLOBALS_NAME = "globals.sql.zst"
AHEAD_LIMIT = 16 * 1024 * 1024  # a script larger than this (that many roles) is streamed after the dump instead
_TOKEN = Pattern(r'"(?:[^"]|"")*"|[^\s;]+')
_PASSWORD = Pattern(r"PASSWORD '((?:[^']|'')*)'")
_GRANTED_BY = Pattern(r"\s+GRANTED BY\s+(?:\"(?:[^\"]|\"\")*\"|\S+?)(?=\s*;|\s+WITH\b|\s*$)")


def globals_key(backup_id: str, encrypted: bool) -> str:
    return backup_prefix(backup_id) + GLOBALS_NAME + (".age" if encrypted else "")


# --- backup ----------------------------------------------------------------------------------


def passwords_readable(env: Environment, conn: psycopg.Connection) -> bool:
    """Whether pg_dumpall may read role passwords: not on Neon or RDS, nor without access to pg_authid."""
    host = pg_url.parse_url(env.database_url(direct=True)).host
    if neon.is_neon(env) or host.endswith(".rds.amazonaws.com"):
        return False
    return bool(conn.execute("SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT')").fetchone()[0])


def globals_command(tool: pg_tools.ClientTool, database: str, *, role_passwords: bool) -> list[str]:
    """pg_dumpall argv for the globals only, connecting to the app's database (it may not reach `postgres`)."""
    command = [tool.path, "--no-password", "--globals-only", f"--database={database}"]
    return command if role_passwords else [*command, "--no-role-passwords"]


class GlobalsAhead:
    """pg_dumpall --globals-only run beside the dump (read by a thread: the dump starts without waiting), its
    script held in memory, so that storing the globals after the dump waits for no tool: a shorter tail after
    the dump's last byte. Read at the dump's start, the roles are those of the dump's snapshot or close to it."""

    def __init__(self, command: list[str], role_passwords: bool, environment: dict[str, str]):
        self.role_passwords = role_passwords
        self.process: subprocess.Popen[bytes] | None = None
        self._output: bytes | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(command, environment), name="opsbook-globals",
                                        daemon=True)
        self._thread.start()

    def _run(self, command: list[str], environment: dict[str, str]) -> None:
        with self._lock:  # stop() either sees the process or keeps it from starting
            if self._stopped:
                return
            try:
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL, env=environment)
            except OSError:
                return
        chunks, size = [], 0
        for chunk in iter(lambda: self.process.stdout.read(dump.CHUNK), b""):
            size += len(chunk)
            if size > AHEAD_LIMIT:
                processes.stop(self.process)
                return
            chunks.append(chunk)
        if self.process.wait() == 0:
            self._output = b"".join(chunks)

    def script(self) -> bytes | None:
        """The globals script; None when the tool failed or wrote too much (the step then runs it again)."""
        self._thread.join()
        return self._output

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        if self.process is not None:
            processes.stop(self.process)
        self._thread.join(timeout=10)


def start_globals(env: Environment, conn: psycopg.Connection) -> GlobalsAhead | None:
    """Start reading the globals for store_globals to store later; None when the server cannot say what
    (the step then meets the same problem and reports it)."""
    url = env.database_url(direct=True)
    try:
        tool = pg_tools.find_client_tool("pg_dumpall", pg.server_version(conn)[0])
        readable = passwords_readable(env, conn)
    except Exception:  # psycopg's or ours: the step meets it again and reports it
        return None
    command = globals_command(tool, pg_url.parse_url(url).dbname, role_passwords=readable)
    return GlobalsAhead(command, readable, pg_url.child_environment(url))


def store_globals(env: Environment, conn: psycopg.Connection, storage: Storage, backup_id: str, *,
                  level: int, recipients: list[Any], lock: ObjectLock | None = None,
                  ahead: GlobalsAhead | None = None) -> dict[str, Any]:
    """Dump the globals to storage beside the dump (the script `ahead` read, when it has it); what the
    manifest records about them."""
    key = globals_key(backup_id, encrypted=bool(recipients))
    script = ahead.script() if ahead is not None else None
    if script is not None:
        stored = dump.bytes_to_storage(script, storage, key, level=level, recipients=recipients, lock=lock)
        return {"key": key, "size": stored.size, "sha256": stored.sha256, "dump_size": stored.dump_size,
                "role_passwords": ahead.role_passwords}
    url = env.database_url(direct=True)
    major = pg.server_version(conn)[0]
    tool = pg_tools.find_client_tool("pg_dumpall", major)
    readable = passwords_readable(env, conn)
    stored = dump.dump_to_storage(globals_command(tool, pg_url.parse_url(url).dbname, role_passwords=readable),
                                  pg_url.child_environment(url), storage, key, level=level, recipients=recipients,
                                  what=f"pg_dumpall --globals-only of {pg_url.parse_url(url).describe()}",
                                  lock=lock)
    return {"key": key, "size": stored.size, "sha256": stored.sha256, "dump_size": stored.dump_size,
            "role_passwords": readable}


# --- restore ---------------------------------------------------------------------------------


def require_globals(manifest: Manifest) -> dict[str, Any]:
    """What the manifest says of the backup's globals; UsageError when it has none."""
    if not manifest.globals:
        raise UsageError(f"backup {manifest.id} holds no globals (it was taken before opsbook stored them)",
                         hint="restore without --with-globals, or choose a newer backup (`inv backup.list`)")
    return manifest.globals


def read_globals(storage: Storage, manifest: Manifest, identities: list[Any] | None) -> str:
    """The globals script of a backup, checked against its manifest."""
    stored = require_globals(manifest)
    sink = io.BytesIO()
    fetched = fetch.fetch_and_decode(storage, stored["key"], sink, identities=identities,
                                     encrypted=manifest.encrypted)
    fetch.check_fetched(manifest.id, stored["key"], stored["size"], stored["sha256"], fetched, stored["dump_size"])
    text = sink.getvalue().decode()
    for hashed in _PASSWORD.findall(text):
        Secret(hashed)  # registered for redaction: a role's password hash never reaches an output
    return text


def check_globals(storage: Storage, manifest: Manifest, identities: list[Any] | None) -> str:
    """backup.verify's line about the globals: size and sha256 against the manifest (CheckFailed when they
    differ), decoded too when the identity is at hand or nothing is encrypted."""
    stored = manifest.globals
    if not stored:
        return "no globals stored"
    decode = identities is not None or not manifest.encrypted
    fetched = fetch.fetch_and_decode(storage, stored["key"], io.BytesIO(), identities=identities,
                                     encrypted=manifest.encrypted, decode=decode)
    fetch.check_fetched(manifest.id, stored["key"], stored["size"], stored["sha256"], fetched,
                        stored["dump_size"] if decode else None)
    return "globals match"


@dataclass
class RolePlan:
    """What restoring the globals does on one server."""

    create: list[str] = field(default_factory=list)  # roles created, in the script's order
    skipped: dict[str, str] = field(default_factory=dict)  # role → why it is left alone
    statements: list[str] = field(default_factory=list)  # to run, in order
    left_out: list[str] = field(default_factory=list)  # kinds of statements not restored (tablespaces)


def statements_of(text: str) -> list[str]:
    """The script's SQL statements (pg_dumpall writes one per line), without comments and psql commands."""
    found, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.startswith(("--", "\\"))):
            continue
        pending = f"{pending}\n{line}" if pending else line
        if pending.rstrip().endswith(";"):
            found.append(pending.strip())
            pending = ""
    return found


def unquote(token: str) -> str:
    return token[1:-1].replace('""', '"') if token.startswith('"') else token


def plan_roles(text: str, existing: set[str], restoring: str) -> RolePlan:
    """The statements that create the missing roles (pure: the server's roles are given)."""
    plan = RolePlan()
    statements = statements_of(text)
    for statement in statements:
        words = _TOKEN.findall(statement)
        if words[:2] == ["CREATE", "ROLE"]:
            role = unquote(words[2])
            reason = _skip_reason(role, existing, restoring, statements)
            if reason:
                plan.skipped[role] = reason
            else:
                plan.create.append(role)
    created = set(plan.create)
    for statement in statements:
        words = _TOKEN.findall(statement)
        if words[:2] in (["CREATE", "ROLE"], ["ALTER", "ROLE"]) or words[:3] == ["COMMENT", "ON", "ROLE"]:
            subject = unquote(words[3] if words[0] == "COMMENT" else words[2])
            if subject in created:
                plan.statements.append(statement)
        elif words[:1] == ["GRANT"] and "TO" in words:
            granted, member = unquote(words[1]), unquote(words[words.index("TO") + 1])
            if (granted in created or member in created) and {granted, member} <= created | existing:
                plan.statements.append(_GRANTED_BY.sub("", statement))  # granted by the restoring role
        elif words[:2] == ["CREATE", "TABLESPACE"] and "tablespaces" not in plan.left_out:
            plan.left_out.append("tablespaces")
    return plan


def _skip_reason(role: str, existing: set[str], restoring: str, statements: list[str]) -> str | None:
    if role == restoring:
        return "the restoring role"
    if role in existing:
        return "exists on the target (left as it is)"
    if role.startswith("pg_"):
        return "reserved"
    quoted = f'"{role}"' if not re.fullmatch(r"[a-z_][a-z0-9_$]*", role) else role
    if any(s.startswith(f"ALTER ROLE {quoted} WITH SUPERUSER") for s in statements):
        return "a superuser of the source server"
    return None


def create_missing_roles(conn: psycopg.Connection, text: str) -> RolePlan:
    """Create the roles `text` (pg_dumpall --globals-only) names and this server lacks, in one transaction."""
    existing = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles").fetchall()}
    restoring = conn.execute("SELECT current_user").fetchone()[0]
    plan = plan_roles(text, existing, restoring)
    if not plan.statements:
        return plan
    try:
        with conn.transaction():
            for statement in plan.statements:
                conn.execute(statement)
    except pg.Error as error:
        raise StepFailed(f"creating the roles {', '.join(plan.create)} failed: {redact(str(error).strip())}",
                         hint="the admin role (database.admin_url) must be allowed to create roles (CREATEROLE); "
                              "no role was created (one transaction)") from None
    return plan
