"""Lint pending migrations for changes that break the app version still running.

The runbook's rule: migrations stay backward-compatible, because the old release keeps
serving while (and after) the schema changes. Flagged, with the line each starts on:
dropped tables and columns, renames, column type changes, SET NOT NULL, new NOT NULL
columns without a default, and dropped enum values (PostgreSQL cannot drop a value,
so Prisma recreates the type: `ALTER TYPE "T" RENAME TO "T_old"` … `DROP TYPE "T_old"`).

A small scanner blanks out comments and string literals (keeping every newline, so
offsets still give line numbers), splits statements on top-level semicolons and the
actions of an ALTER TABLE on top-level commas; each rule is a regular expression.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ops.patterns import Pattern

if TYPE_CHECKING:
    from ops.migrations.state import LocalMigration

IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
QUALIFIED = rf"{IDENT}(?:\s*\.\s*{IDENT})?"
_FLAGS = re.IGNORECASE | re.DOTALL

DROP_TABLE = Pattern(rf"\s*DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?P<names>{QUALIFIED}(?:\s*,\s*{QUALIFIED})*)", _FLAGS)
ALTER_TABLE = Pattern(rf"\s*ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?(?P<table>{QUALIFIED})\s+", _FLAGS)
ALTER_TYPE_RENAME = Pattern(rf"\s*ALTER\s+TYPE\s+(?P<type>{QUALIFIED})\s+RENAME\s+TO\s+(?P<new>{IDENT})", _FLAGS)
ALTER_TYPE_RENAME_VALUE = Pattern(rf"\s*ALTER\s+TYPE\s+(?P<type>{QUALIFIED})\s+RENAME\s+VALUE\s", _FLAGS)
DROP_TYPE = Pattern(rf"\s*DROP\s+TYPE\s+(?:IF\s+EXISTS\s+)?(?P<names>{QUALIFIED}(?:\s*,\s*{QUALIFIED})*)", _FLAGS)

ACTION_DROP_COLUMN = Pattern(rf"DROP\s+(?:COLUMN\s+)?(?:IF\s+EXISTS\s+)?(?P<column>{IDENT})", _FLAGS)
ACTION_RENAME_COLUMN = Pattern(rf"RENAME\s+(?:COLUMN\s+)?(?P<column>{IDENT})\s+TO\s+(?P<new>{IDENT})", _FLAGS)
ACTION_RENAME_TABLE = Pattern(rf"RENAME\s+TO\s+(?P<new>{IDENT})", _FLAGS)
ACTION_TYPE = Pattern(rf"ALTER\s+(?:COLUMN\s+)?(?P<column>{IDENT})\s+(?:SET\s+DATA\s+)?TYPE\s+(?P<type>{QUALIFIED})",
                         _FLAGS)
ACTION_SET_NOT_NULL = Pattern(rf"ALTER\s+(?:COLUMN\s+)?(?P<column>{IDENT})\s+SET\s+NOT\s+NULL", _FLAGS)
ACTION_ADD_COLUMN = Pattern(rf"ADD\s+(?:COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(?P<column>{IDENT})\s+(?P<rest>.*)",
                               _FLAGS)
NOT_COLUMNS = {"constraint", "primary", "foreign", "unique", "check", "exclude"}
SELF_FILLING = Pattern(r"\b(?:DEFAULT|GENERATED|SMALLSERIAL|SERIAL|BIGSERIAL|SERIAL[248])\b", _FLAGS)
NOT_NULL = Pattern(r"\bNOT\s+NULL\b", _FLAGS)

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


@dataclass(frozen=True)
class Piece:
    """A statement or an ALTER TABLE action: masked text and its offset in the script."""

    text: str
    offset: int


# ---------------------------------------------------------------- scanning


def mask(sql: str) -> str:
    """The script with comments and string literals blanked (newlines kept): same length, same lines."""
    out = list(sql)
    index, length = 0, len(sql)
    while index < length:
        end = _literal_end(sql, index)
        if end is None:
            index += 1
            continue
        for position in range(index, end):
            if out[position] != "\n":
                out[position] = " "
        index = end
    return "".join(out)


def _literal_end(sql: str, index: int) -> int | None:
    """Where the comment or string literal starting at `index` ends; None when none starts there."""
    pair = sql[index:index + 2]
    if pair == "--":
        newline = sql.find("\n", index)
        return len(sql) if newline < 0 else newline
    if pair == "/*":
        close = sql.find("*/", index + 2)
        return len(sql) if close < 0 else close + 2
    if sql[index] == "'":
        position = index + 1
        while True:
            close = sql.find("'", position)
            if close < 0:
                return len(sql)
            if sql[close + 1:close + 2] != "'":
                return close + 1
            position = close + 2
    if sql[index] == "$":
        tag = re.match(r"\$(?:[A-Za-z_]\w*)?\$", sql[index:])
        if tag:
            close = sql.find(tag.group(0), index + len(tag.group(0)))
            return len(sql) if close < 0 else close + len(tag.group(0))
    return None


def split_top_level(text: str, separator: str, offset: int = 0) -> Iterator[Piece]:
    """Pieces of masked `text` between top-level separators (outside parentheses and "quotes")."""
    depth, quoted, start = 0, False, 0
    for index, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif char == separator and depth == 0:
            yield from _piece(text, start, index, offset)
            start = index + 1
    yield from _piece(text, start, len(text), offset)


def _piece(text: str, start: int, end: int, offset: int) -> Iterator[Piece]:
    chunk = text[start:end]
    stripped = chunk.lstrip()
    if stripped.strip():
        yield Piece(stripped.rstrip(), offset + start + len(chunk) - len(stripped))


def _line(sql: str, offset: int) -> int:
    return sql.count("\n", 0, offset) + 1


def _name(identifier: str) -> str:
    """An identifier as written, unquoted; a schema-qualified one keeps only its last part."""
    last = re.split(r'\s*\.\s*(?=(?:"|[A-Za-z_]))', identifier.strip())[-1]
    return last[1:-1].replace('""', '"') if last.startswith('"') else last.lower()


# ---------------------------------------------------------------- rules


def lint_sql(migration: str, sql: str) -> list[Finding]:
    """Every breaking change in one migration script, in order."""
    masked = mask(sql)
    statements = list(split_top_level(masked, ";"))
    recreated = _recreated_enums(statements)
    findings: list[Finding] = []
    for statement in statements:
        for offset, rule, what in _statement_findings(statement, recreated):
            findings.append(Finding(migration, _line(sql, offset), rule, what))
    return findings


def lint_migrations(migrations: Iterable[LocalMigration]) -> list[Finding]:
    return [finding for migration in migrations for finding in lint_sql(migration.name, migration.sql)]


def _recreated_enums(statements: list[Piece]) -> set[str]:
    """Types renamed to `<name>_old`: Prisma's way of dropping enum values."""
    names = set()
    for statement in statements:
        match = ALTER_TYPE_RENAME.match(statement.text)
        if match and _name(match["new"]) == f"{_name(match['type'])}_old":
            names.add(_name(match["type"]))
    return names


def _statement_findings(statement: Piece, recreated: set[str]) -> Iterator[tuple[int, str, str]]:
    text, offset = statement.text, statement.offset
    if match := DROP_TABLE.match(text):
        yield offset, "drop-table", f"drops table {', '.join(_names(match['names']))}"
    elif match := ALTER_TYPE_RENAME.match(text):
        yield from _type_rename(match, offset, recreated)
    elif match := ALTER_TYPE_RENAME_VALUE.match(text):
        yield offset, "rename", f"renames a value of enum {_name(match['type'])}"
    elif match := DROP_TYPE.match(text):
        kept = [name for name in _names(match["names"]) if name.removesuffix("_old") not in recreated]
        if kept:
            yield offset, "drop-type", f"drops type {', '.join(kept)}"
    elif match := ALTER_TABLE.match(text):
        table = _name(match["table"])
        actions = split_top_level(text[match.end():], ",", offset + match.end())
        for action in actions:
            yield from _action_findings(table, action, recreated)


def _names(listed: str) -> list[str]:
    return [_name(part) for part in split_top_level_names(listed)]


def split_top_level_names(listed: str) -> list[str]:
    return [piece.text for piece in split_top_level(listed, ",")]


def _type_rename(match: re.Match[str], offset: int, recreated: set[str]) -> Iterator[tuple[int, str, str]]:
    old, new = _name(match["type"]), _name(match["new"])
    if old in recreated and new == f"{old}_old":
        yield offset, "drop-enum-value", f"recreates enum {old} (renamed to {new}) to drop values"
    elif not (old.endswith("_new") and old.removesuffix("_new") in recreated):
        yield offset, "rename", f"renames type {old} to {new}"


def _action_findings(table: str, action: Piece, recreated: set[str]) -> Iterator[tuple[int, str, str]]:
    text, offset = action.text, action.offset
    if (match := ACTION_DROP_COLUMN.match(text)) and _name(match["column"]) not in NOT_COLUMNS | {"default"}:
        yield offset, "drop-column", f"drops column {_name(match['column'])} of table {table}"
    elif match := ACTION_RENAME_COLUMN.match(text):
        yield offset, "rename", f"renames column {_name(match['column'])} of table {table} to {_name(match['new'])}"
    elif match := ACTION_RENAME_TABLE.match(text):
        yield offset, "rename", f"renames table {table} to {_name(match['new'])}"
    elif match := ACTION_TYPE.match(text):
        if _name(match["type"]).removesuffix("_new") not in recreated:
            yield offset, "alter-column-type", f"changes the type of {table}.{_name(match['column'])}"
    elif match := ACTION_SET_NOT_NULL.match(text):
        yield offset, "set-not-null", f"makes {table}.{_name(match['column'])} NOT NULL"
    elif (match := ACTION_ADD_COLUMN.match(text)) and _name(match["column"]) not in NOT_COLUMNS:
        rest = match["rest"]
        if NOT_NULL.search(rest) and not SELF_FILLING.search(rest):
            yield offset, "add-not-null-without-default", f"adds {table}.{_name(match['column'])} NOT NULL " \
                                                          "without a default"
