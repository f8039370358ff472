"""Lint migrations for statements that lock a busy table: the outages schema changes cause.

Each rule names the statement's line, why it is dangerous and the safe form:

  create-index            CREATE INDEX without CONCURRENTLY blocks writes while it builds
  constraint-validates    ADD CONSTRAINT … FOREIGN KEY / CHECK without NOT VALID scans every row under the lock
  constraint-builds-index ADD CONSTRAINT … UNIQUE / PRIMARY KEY builds its index under the lock (no USING INDEX)
  alter-type-rewrites     ALTER COLUMN … TYPE rewrites the table (unless binary-coercible: widening a varchar…)
  set-not-null-scans      SET NOT NULL scans every row, unless a validated CHECK (col IS NOT NULL) exists
  volatile-default        ADD COLUMN … DEFAULT volatile() (or SERIAL) rewrites the table to fill each row
  vacuum-full, cluster    rewrite the table under an ACCESS EXCLUSIVE lock
  lock-table              holds an explicit lock until the migration's transaction ends

A table created earlier in the same migration is never busy: nothing there is flagged. Each
hazard is then judged (`judge`) by what the target database says (ops/migrations/live.py):
a table at or above the thresholds (app.migrations.lock_rows / lock_bytes, default 100 000
rows or 100 MiB) is a refusal, a smaller one a warning; with no database to ask (`migrate.lint
--path`, an app's CI) every hazard is a refusal. The database also clears a type change
that does not rewrite (varchar(50) to varchar(100) or text) and a SET NOT NULL that a
validated check makes cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import field
from typing import TYPE_CHECKING, Any

from ops.lazy_dataclasses import dataclass
from ops.migrations.script import Script, Table, strings, type_name, walk
from ops.output import human_size
from ops.patterns import Pattern
from ops.sql_parse import Statement

if TYPE_CHECKING:
    from ops.migrations.state import LocalMigration

DEFAULT_LOCK_ROWS = 100_000
DEFAULT_LOCK_BYTES = 100 * 1024 * 1024
REFUSE, WARN = "refuse", "warn"

RULES: dict[str, tuple[str, str]] = {  # rule: (why it is dangerous, the safe form)
    "create-index": ("blocks writes to the table until the index is built",
                     "CREATE INDEX CONCURRENTLY (it cannot run in a transaction: the native engine runs such a "
                     "migration statement by statement; for `prisma migrate deploy` keep it alone in its migration)"),
    "constraint-validates": ("checks every row while holding a lock that blocks writes",
                             "ADD CONSTRAINT … NOT VALID, then ALTER TABLE … VALIDATE CONSTRAINT … in a later "
                             "migration (it checks rows without blocking writes)"),
    "constraint-builds-index": ("builds its index under an ACCESS EXCLUSIVE lock (reads and writes wait)",
                                "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT … UNIQUE (or PRIMARY KEY) "
                                "USING INDEX …"),
    "alter-type-rewrites": ("rewrites the table and its indexes under an ACCESS EXCLUSIVE lock (reads and writes "
                            "wait)", "add a new column, backfill it in batches, switch the app to it, drop the old "
                                     "one later (widening a varchar or numeric, or varchar to text, needs no rewrite)"),
    "set-not-null-scans": ("checks every row under an ACCESS EXCLUSIVE lock (reads and writes wait)",
                           "ADD CONSTRAINT … CHECK (col IS NOT NULL) NOT VALID; in a later migration VALIDATE "
                           "CONSTRAINT, then SET NOT NULL (PostgreSQL trusts the check and skips the scan)"),
    "volatile-default": ("fills every existing row, rewriting the table under an ACCESS EXCLUSIVE lock",
                         "add the column with no default or a constant one, set the default with ALTER COLUMN … "
                         "SET DEFAULT (new rows only), backfill existing rows in batches"),
    "vacuum-full": ("rewrites the table under an ACCESS EXCLUSIVE lock (reads and writes wait)",
                    "plain VACUUM (no lock against reads and writes), or pg_repack, outside the migrations"),
    "cluster": ("rewrites the table under an ACCESS EXCLUSIVE lock (reads and writes wait)",
                "pg_repack, outside the migrations"),
    "lock-table": ("holds the lock until the migration's transaction ends; every query on the table queues "
                   "behind it", "no explicit lock: rely on the statements' own locks, kept short"),
}
# Functions a DEFAULT may call without filling each row with a different value (stable or immutable).
STABLE_FUNCTIONS = {"now", "current_timestamp", "transaction_timestamp", "statement_timestamp", "current_date",
                    "lower", "upper", "coalesce", "to_timestamp", "make_interval", "jsonb_build_object",
                    "json_build_object", "array", "current_setting"}
SERIAL_TYPES = {"smallserial", "serial", "bigserial", "serial2", "serial4", "serial8"}
LOCK_MODES = {1: "ACCESS SHARE", 2: "ROW SHARE", 3: "ROW EXCLUSIVE", 4: "SHARE UPDATE EXCLUSIVE", 5: "SHARE",
              6: "SHARE ROW EXCLUSIVE", 7: "EXCLUSIVE", 8: "ACCESS EXCLUSIVE"}


@dataclass(frozen=True)
class Hazard:
    """A statement that takes a heavy lock on a table that already exists; judged by `judge`."""

    migration: str
    line: int
    rule: str
    table: Table | None  # None: every table (VACUUM FULL, CLUSTER with no name)
    what: str
    column: str | None = None
    new_type: tuple[str, tuple[int, ...]] | None = None  # alter-type-rewrites: the target (name, modifiers)


@dataclass(frozen=True)
class TableSize:
    rows: int | None  # pg_class.reltuples; None when the table was never analysed
    bytes: int

    def large(self, thresholds: Thresholds) -> bool:
        return (self.rows or 0) >= thresholds.rows or self.bytes >= thresholds.bytes

    def __str__(self) -> str:
        rows = "rows unknown (never analysed)" if self.rows is None else f"{_count(self.rows)} rows"
        return f"{rows}, {human_size(self.bytes)}"


@dataclass(frozen=True)
class Thresholds:
    rows: int = DEFAULT_LOCK_ROWS
    bytes: int = DEFAULT_LOCK_BYTES


@dataclass
class LiveFacts:
    """What the target database says about the tables the hazards name (ops/migrations/live.py reads it)."""

    sizes: dict[Table, TableSize | None] = field(default_factory=dict)  # None: not in the database (yet)
    column_types: dict[tuple[Table, str], str] = field(default_factory=dict)  # format_type(), as psql shows
    not_null_checks: set[tuple[Table, str]] = field(default_factory=set)  # validated CHECK (col IS NOT NULL)


@dataclass(frozen=True)
class LockFinding:
    hazard: Hazard
    severity: str  # refuse or warn
    size: str  # what the size was judged by

    def __str__(self) -> str:
        hazard = self.hazard
        why, safe = RULES[hazard.rule]
        return f"{hazard.migration}/migration.sql:{hazard.line}: {hazard.rule}: {hazard.what} ({self.size}) " \
               f"{why}; safe: {safe}"

    def to_json(self) -> dict[str, Any]:
        hazard = self.hazard
        why, safe = RULES[hazard.rule]
        return {"migration": hazard.migration, "line": hazard.line, "rule": hazard.rule, "what": hazard.what,
                "table": str(hazard.table) if hazard.table else None, "size": self.size,
                "severity": self.severity, "why": why, "safe": safe}


# ---------------------------------------------------------------- finding hazards


@dataclass
class _Seen:
    """Carried from statement to statement and from migration to migration."""

    created: list[Table] = field(default_factory=list)  # in the current migration
    pending_checks: dict[tuple[str, str], str] = field(default_factory=dict)  # (table, constraint): column
    not_null_checks: set[tuple[str, str]] = field(default_factory=set)  # (table, column), validated


def lock_hazards(migrations: Iterable[LocalMigration]) -> list[Hazard]:
    """Every heavy lock on an existing table in the migrations, in order (earlier ones inform later ones)."""
    seen = _Seen()
    found: list[Hazard] = []
    for migration in migrations:
        found += hazards_in(migration.name, Script(migration.sql), seen)
    return found


def hazards_in(migration: str, script: Script, seen: _Seen | None = None) -> list[Hazard]:
    seen = seen or _Seen()
    seen.created = []
    found = []
    for statement in script.statements:
        if statement.error is None:
            found += [Hazard(migration, script.line(offset), *rest) for offset, *rest in
                      _statement_hazards(script, statement, seen)]
    return found


def _statement_hazards(script: Script, statement: Statement, seen: _Seen) -> Iterator[tuple[Any, ...]]:
    kind, fields, start = statement.kind, statement.fields, statement.start
    if kind == "CreateStmt":
        seen.created.append(Table.of(fields.get("relation", {})))
    elif kind == "CreateTableAsStmt":
        seen.created.append(Table.of(fields.get("into", {}).get("IntoClause", {}).get("rel", {})))
    elif kind == "IndexStmt" and not fields.get("concurrent"):
        table = Table.of(fields.get("relation", {}))
        if not _is_new(table, seen):
            unique = "UNIQUE " if fields.get("unique") else ""
            name = f'"{fields["idxname"]}" ' if fields.get("idxname") else ""
            yield start, "create-index", table, f"CREATE {unique}INDEX {name}on {table.quoted()}"
    elif kind == "AlterTableStmt" and fields.get("objtype") == "OBJECT_TABLE":
        table = Table.of(fields.get("relation", {}))
        for offset, command in script.actions(statement):
            for hazard in _action_hazards(table, command, seen):
                yield offset, *hazard
    elif kind in ("VacuumStmt", "ClusterStmt", "LockStmt"):
        yield from _maintenance_hazards(statement, seen)


def _is_new(table: Table, seen: _Seen) -> bool:
    return any(table.same(created) for created in seen.created)


def _action_hazards(table: Table, command: dict[str, Any], seen: _Seen) -> Iterator[tuple[Any, ...]]:
    subtype, column = command.get("subtype"), command.get("name")
    definition = command.get("def") or {}
    if subtype == "AT_AddConstraint":
        yield from _constraint_hazards(table, definition.get("Constraint", {}), seen)
    elif subtype == "AT_ValidateConstraint":
        checked = seen.pending_checks.pop((table.name, column or ""), None)
        if checked:
            seen.not_null_checks.add((table.name, checked))
    if _is_new(table, seen):
        return
    if subtype == "AT_AlterColumnType":
        target = definition.get("ColumnDef", {})
        yield "alter-type-rewrites", table, f"ALTER COLUMN {column} TYPE {_type_text(target)} on {table.quoted()}", \
            column, _target_type(target)
    elif subtype == "AT_SetNotNull" and (table.name, column) not in seen.not_null_checks:
        yield "set-not-null-scans", table, f"ALTER COLUMN {column} SET NOT NULL on {table.quoted()}", column
    elif subtype == "AT_AddColumn":
        column_def = definition.get("ColumnDef", {})
        filler = _row_filler(column_def)
        if filler:
            yield "volatile-default", table, f"ADD COLUMN {column_def.get('colname')} {filler} on {table.quoted()}"


def _constraint_hazards(table: Table, constraint: dict[str, Any], seen: _Seen) -> Iterator[tuple[Any, ...]]:
    kind, name = constraint.get("contype"), constraint.get("conname") or ""
    label = f'"{name}" ' if name else ""
    checked = _not_null_column(constraint) if kind == "CONSTR_CHECK" else None
    if checked and constraint.get("skip_validation"):
        seen.pending_checks[(table.name, name)] = checked
    elif checked:
        seen.not_null_checks.add((table.name, checked))
    if _is_new(table, seen):
        return
    if kind in ("CONSTR_UNIQUE", "CONSTR_PRIMARY", "CONSTR_EXCLUSION") and not constraint.get("indexname"):
        what = {"CONSTR_UNIQUE": "UNIQUE", "CONSTR_PRIMARY": "PRIMARY KEY", "CONSTR_EXCLUSION": "EXCLUDE"}[kind]
        yield "constraint-builds-index", table, f"ADD CONSTRAINT {label}{what} on {table.quoted()}"
    if kind not in ("CONSTR_FOREIGN", "CONSTR_CHECK") or constraint.get("skip_validation"):
        return
    if kind == "CONSTR_FOREIGN":
        referenced = Table.of(constraint.get("pktable", {}))
        what = f"ADD CONSTRAINT {label}FOREIGN KEY on {table.quoted()} (referencing {referenced.quoted()})"
    else:
        what = f"ADD CONSTRAINT {label}CHECK on {table.quoted()}"
    yield "constraint-validates", table, what


def _not_null_column(constraint: dict[str, Any]) -> str | None:
    """The column of a `CHECK (col IS NOT NULL)`, else None."""
    test = (constraint.get("raw_expr") or {}).get("NullTest", {})
    fields = test.get("arg", {}).get("ColumnRef", {}).get("fields", [])
    if test.get("nulltesttype") == "IS_NOT_NULL" and len(fields) == 1:
        return strings(fields)[0]
    return None


def _row_filler(column_def: dict[str, Any]) -> str | None:
    """How an added column fills existing rows one by one (a SERIAL, a volatile DEFAULT), else None."""
    if type_name(column_def.get("typeName", {})) in SERIAL_TYPES:
        return type_name(column_def["typeName"]).upper()
    for constraint in column_def.get("constraints", []):
        details = constraint.get("Constraint", {})
        if details.get("contype") == "CONSTR_IDENTITY":
            return "GENERATED … AS IDENTITY"
        if details.get("contype") == "CONSTR_GENERATED":
            return "GENERATED ALWAYS AS (…) STORED"
        if details.get("contype") == "CONSTR_DEFAULT":
            volatile = [name for name in _called(details.get("raw_expr")) if name not in STABLE_FUNCTIONS]
            if volatile:
                return f"DEFAULT {volatile[0]}()"
    return None


def _called(expression: Any) -> list[str]:
    return [strings(node["FuncCall"]["funcname"])[-1].lower() for node in walk(expression) if "FuncCall" in node]


def _target_type(column_def: dict[str, Any]) -> tuple[str, tuple[int, ...]] | None:
    if column_def.get("raw_default"):  # USING (expression): always a rewrite
        return None
    type_node = column_def.get("typeName", {})
    modifiers = tuple(node.get("A_Const", {}).get("ival", {}).get("ival", 0) for node in type_node.get("typmods", []))
    return type_name(type_node).lower(), modifiers


def _type_text(column_def: dict[str, Any]) -> str:
    target = _target_type(column_def) or (type_name(column_def.get("typeName", {})), ())
    name, modifiers = target
    return name + (f"({', '.join(map(str, modifiers))})" if modifiers else "")


def _maintenance_hazards(statement: Statement, seen: _Seen) -> Iterator[tuple[Any, ...]]:
    kind, fields, start = statement.kind, statement.fields, statement.start
    if kind == "VacuumStmt":
        options = {option.get("DefElem", {}).get("defname") for option in fields.get("options", [])}
        if fields.get("is_vacuumcmd") and "full" in options:
            tables = [Table.of(item["VacuumRelation"]["relation"]) for item in fields.get("rels", [])] or [None]
            for table in tables:
                if table is None or not _is_new(table, seen):
                    yield start, "vacuum-full", table, f"VACUUM FULL {table.quoted() if table else '(every table)'}"
    elif kind == "ClusterStmt":
        table = Table.of(fields["relation"]) if fields.get("relation") else None
        if table is None or not _is_new(table, seen):
            yield start, "cluster", table, f"CLUSTER {table.quoted() if table else '(every clustered table)'}"
    elif kind == "LockStmt":
        mode = LOCK_MODES.get(fields.get("mode", 8), "ACCESS EXCLUSIVE")
        for item in fields.get("relations", []):
            table = Table.of(item.get("RangeVar", {}))
            if not _is_new(table, seen):
                yield start, "lock-table", table, f"LOCK TABLE {table.quoted()} IN {mode} MODE"


# ---------------------------------------------------------------- judging


def judge(hazards: Iterable[Hazard], facts: LiveFacts | None, thresholds: Thresholds) -> list[LockFinding]:
    """Refusal or warning for each hazard the facts do not clear; with no facts (no database), refusals."""
    found = []
    for hazard in hazards:
        if facts is None:
            found.append(LockFinding(hazard, REFUSE, "size unknown: no database to ask"))
        elif not _cleared(hazard, facts):
            found.append(_by_size(hazard, facts, thresholds))
    return found


def _cleared(hazard: Hazard, facts: LiveFacts) -> bool:
    if hazard.table is None or hazard.column is None:
        return False
    if hazard.rule == "set-not-null-scans":
        return (hazard.table, hazard.column) in facts.not_null_checks
    if hazard.rule == "alter-type-rewrites":
        current = facts.column_types.get((hazard.table, hazard.column))
        return bool(current and hazard.new_type and binary_coercible(current, hazard.new_type))
    return False


def _by_size(hazard: Hazard, facts: LiveFacts, thresholds: Thresholds) -> LockFinding:
    if hazard.table is None:
        return LockFinding(hazard, REFUSE, "every table")
    size = facts.sizes.get(hazard.table)
    if size is None:
        return LockFinding(hazard, WARN, "not in the database yet: created by an earlier pending migration")
    return LockFinding(hazard, REFUSE if size.large(thresholds) else WARN, str(size))


CURRENT_TYPE = Pattern(r"^(character varying|varchar|text|numeric|bit varying)(?:\((\d+)(?:,(\d+))?\))?$")
TYPE_NAMES = {"character varying": "varchar", "bit varying": "varbit", "decimal": "numeric"}


def binary_coercible(current: str, target: tuple[str, tuple[int, ...]]) -> bool:
    """Whether changing a column from `current` (format_type) to `target` keeps every row as is (no rewrite)."""
    match = CURRENT_TYPE.match(current.strip().lower())
    if not match:
        return False
    old = TYPE_NAMES.get(match[1], match[1])
    old_modifiers = tuple(int(part) for part in match.groups()[1:] if part)
    new, new_modifiers = TYPE_NAMES.get(target[0], target[0]), target[1]
    if old in ("varchar", "text") and new == "text":
        return True
    if old == "text" and new == "varchar":
        return not new_modifiers
    if old != new:
        return False
    if not new_modifiers:
        return True
    if not old_modifiers:
        return False
    if old == "numeric":  # more digits, the same scale
        return new_modifiers[0] >= old_modifiers[0] and _scale(new_modifiers) == _scale(old_modifiers)
    return new_modifiers[0] >= old_modifiers[0]


def _scale(modifiers: tuple[int, ...]) -> int:
    return modifiers[1] if len(modifiers) > 1 else 0


def _count(rows: int) -> str:
    if rows >= 1_000_000:
        return f"{rows / 1_000_000:.1f} M"
    if rows >= 10_000:
        return f"{rows / 1000:.0f} k"
    return str(rows)
