"""Lint pending migrations for changes that break the app version still running.

The runbook's rule: migrations stay backward-compatible, because the old release keeps
serving while (and after) the schema changes. Flagged, with the line each starts on:
dropped tables and columns, renames, column type changes, SET NOT NULL, new NOT NULL
columns without a default, and dropped enum values (PostgreSQL cannot drop a value,
so Prisma recreates the type: `ALTER TYPE "T" RENAME TO "T_old"` … `DROP TYPE "T_old"`).
A statement PostgreSQL's parser cannot read is a finding of its own (`cannot-parse`).

Statements are read by PostgreSQL's own parser (ops/migrations/script.py); the rules
look at the parse trees, so comments, string literals and quoted names never mislead
them. What locks a busy table is the other linter's (ops/migrations/locks.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ops.lazy_dataclasses import dataclass
from ops.migrations.script import Script, Table, mask, strings, type_name
from ops.sql_parse import Statement

if TYPE_CHECKING:
    from ops.migrations.state import LocalMigration

__all__ = ["RULES", "Finding", "lint_migrations", "lint_script", "lint_sql", "mask"]

SELF_FILLING_TYPES = {"smallserial", "serial", "bigserial", "serial2", "serial4", "serial8"}
SELF_FILLING = {"CONSTR_DEFAULT", "CONSTR_GENERATED", "CONSTR_IDENTITY"}

RULES = {
    "drop-table": "the running app still reads and writes it; data is lost",
    "drop-column": "the running app still selects it; data is lost",
    "rename": "the running app still uses the old name",
    "alter-column-type": "rewrites the table under a lock, and the running app may send values of the old type",
    "set-not-null": "fails if rows hold NULL, and the running app may still insert NULL",
    "add-not-null-without-default": "fails on a table with rows, and the running app's inserts omit it",
    "drop-enum-value": "Prisma recreates the enum without the value: rows holding it make the migration fail "
                       "and the running app may still write it",
    "drop-type": "columns or the running app may still use the type",
    "cannot-parse": "PostgreSQL's parser (libpg_query) cannot read it, so nothing about it was checked; the "
                    "server will most likely refuse it too",
}


@dataclass(frozen=True)
class Finding:
    """One risky statement in a migration: where, which rule, what it does."""

    migration: str
    line: int
    rule: str
    what: str

    def __str__(self) -> str:
        return f"{self.migration}/migration.sql:{self.line}: {self.rule}: {self.what} ({RULES[self.rule]})"

    def to_json(self) -> dict[str, Any]:
        return {"migration": self.migration, "line": self.line, "rule": self.rule, "what": self.what}


def lint_sql(migration: str, sql: str) -> list[Finding]:
    """Every breaking change in one migration script, in order."""
    return lint_script(migration, Script(sql))


def lint_script(migration: str, script: Script) -> list[Finding]:
    recreated = _recreated_enums(script.statements)
    findings: list[Finding] = []
    for statement in script.statements:
        for offset, rule, what in _statement_findings(script, statement, recreated):
            findings.append(Finding(migration, script.line(offset), rule, what))
    return findings


def lint_migrations(migrations: Iterable[LocalMigration]) -> list[Finding]:
    return [finding for migration in migrations for finding in lint_sql(migration.name, migration.sql)]


def _recreated_enums(statements: list[Statement]) -> set[str]:
    """Types renamed to `<name>_old`: Prisma's way of dropping enum values."""
    names = set()
    for statement in statements:
        old, new = _type_rename(statement)
        if old and new == f"{old}_old":
            names.add(old)
    return names


def _type_rename(statement: Statement) -> tuple[str | None, str | None]:
    fields = statement.fields
    if statement.kind != "RenameStmt" or fields.get("renameType") != "OBJECT_TYPE":
        return None, None
    parts = strings(fields.get("object", {}).get("List", {}).get("items", []))
    return (parts[-1] if parts else "?"), fields.get("newname")


def _statement_findings(script: Script, statement: Statement, recreated: set[str]) -> Iterator[tuple[int, str, str]]:
    kind, fields, offset = statement.kind, statement.fields, statement.start
    if statement.error is not None:
        yield offset, "cannot-parse", f"cannot parse: {statement.error}"
    elif kind == "DropStmt" and fields.get("removeType") == "OBJECT_TABLE":
        yield offset, "drop-table", f"drops table {', '.join(_dropped_names(fields))}"
    elif kind == "DropStmt" and fields.get("removeType") == "OBJECT_TYPE":
        kept = [name for name in _dropped_names(fields) if name.removesuffix("_old") not in recreated]
        if kept:
            yield offset, "drop-type", f"drops type {', '.join(kept)}"
    elif kind == "AlterEnumStmt" and fields.get("oldVal"):
        yield offset, "rename", f"renames a value of enum {strings(fields.get('typeName', []))[-1]}"
    elif kind == "RenameStmt":
        yield from _rename_findings(script, statement, recreated)
    elif kind == "AlterTableStmt" and fields.get("objtype") == "OBJECT_TABLE":
        table = Table.of(fields.get("relation", {})).name
        for start, command in script.actions(statement):
            yield from _action_findings(table, start, command, recreated)


def _dropped_names(fields: dict[str, Any]) -> list[str]:
    names = []
    for item in fields.get("objects", []):
        parts = strings(item.get("List", {}).get("items", [])) if "List" in item else \
            strings(item.get("TypeName", {}).get("names", []))
        names.append(parts[-1] if parts else "?")
    return names


def _rename_findings(script: Script, statement: Statement, recreated: set[str]) -> Iterator[tuple[int, str, str]]:
    fields = statement.fields
    kind, new = fields.get("renameType"), fields.get("newname")
    if kind == "OBJECT_TYPE":
        old, _ = _type_rename(statement)
        if old in recreated and new == f"{old}_old":
            yield statement.start, "drop-enum-value", f"recreates enum {old} (renamed to {new}) to drop values"
        elif not (old and old.endswith("_new") and old.removesuffix("_new") in recreated):
            yield statement.start, "rename", f"renames type {old} to {new}"
        return
    # relationType is set for a column's rename only (a table's carries the field's zero value)
    if kind != "OBJECT_TABLE" and not (kind == "OBJECT_COLUMN" and fields.get("relationType") == "OBJECT_TABLE"):
        return
    table = Table.of(fields.get("relation", {})).name
    offset = script.first_action(statement)
    if kind == "OBJECT_COLUMN":
        yield offset, "rename", f"renames column {fields.get('subname')} of table {table} to {new}"
    else:
        yield offset, "rename", f"renames table {table} to {new}"


def _action_findings(table: str, offset: int, command: dict[str, Any],
                     recreated: set[str]) -> Iterator[tuple[int, str, str]]:
    subtype, column = command.get("subtype"), command.get("name")
    if subtype == "AT_DropColumn":
        yield offset, "drop-column", f"drops column {column} of table {table}"
    elif subtype == "AT_AlterColumnType":
        new_type = type_name(command.get("def", {}).get("ColumnDef", {}).get("typeName", {}))
        if new_type.removesuffix("_new") not in recreated:
            yield offset, "alter-column-type", f"changes the type of {table}.{column}"
    elif subtype == "AT_SetNotNull":
        yield offset, "set-not-null", f"makes {table}.{column} NOT NULL"
    elif subtype == "AT_AddColumn":
        definition = command.get("def", {}).get("ColumnDef", {})
        if _not_null_without_default(definition):
            yield offset, "add-not-null-without-default", f"adds {table}.{definition.get('colname')} NOT NULL " \
                                                          "without a default"


def _not_null_without_default(definition: dict[str, Any]) -> bool:
    kinds = {constraint.get("Constraint", {}).get("contype") for constraint in definition.get("constraints", [])}
    self_filling = kinds & SELF_FILLING or type_name(definition.get("typeName", {})) in SELF_FILLING_TYPES
    return "CONSTR_NOTNULL" in kinds and not self_filling
