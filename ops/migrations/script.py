"""A migration script as PostgreSQL's parser reads it: statements, their lines, names in them.

Shared by the two linters (ops/migrations/lint.py: what breaks the running app;
ops/migrations/locks.py: what locks a busy table). The parse trees are libpg_query's
(ops/sql_parse.py); this module adds what the rules need on top: the line each statement
and each action of an ALTER TABLE starts on (the tree has no location for most actions,
so the scanner's tokens find them: the first after the table's name, then each after a
top-level comma), and names as written, unquoted.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from ops import sql_parse
from ops.lazy_dataclasses import dataclass
from ops.sql_parse import Statement, Token

COMMA, DOT, OPEN, CLOSE = "ASCII_44", "ASCII_46", "ASCII_40", "ASCII_41"


@dataclass(frozen=True)
class Table:
    """A table as a statement names it: schema (None: the search path's) and name, unquoted."""

    schema: str | None
    name: str

    @classmethod
    def of(cls, range_var: dict[str, Any]) -> Table:
        return cls(range_var.get("schemaname"), range_var.get("relname", "?"))

    def same(self, other: Table) -> bool:
        return self.name == other.name and (self.schema is None or other.schema is None or self.schema == other.schema)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name

    def quoted(self) -> str:
        parts = [self.schema, self.name] if self.schema else [self.name]
        return ".".join('"' + part.replace('"', '""') + '"' for part in parts)


class Script:
    """One migration's SQL, parsed once."""

    def __init__(self, sql: str):
        self.sql = sql

    @cached_property
    def statements(self) -> list[Statement]:
        return sql_parse.statements(self.sql)

    @cached_property
    def tokens(self) -> tuple[Token, ...]:
        return sql_parse.tokens(self.sql)

    @cached_property
    def _starts(self) -> list[int]:
        return [token.start for token in self.tokens]

    def line(self, offset: int) -> int:
        return self.sql.count("\n", 0, offset) + 1

    def actions(self, statement: Statement) -> list[tuple[int, dict[str, Any]]]:
        """An ALTER TABLE's actions, each with the offset it starts at."""
        commands = [command.get("AlterTableCmd", {}) for command in statement.fields.get("cmds", [])]
        starts = list(self._action_starts(statement))
        return [(starts[index] if index < len(starts) else statement.start, command)
                for index, command in enumerate(commands)]

    def first_action(self, statement: Statement) -> int:
        """Where the action after an ALTER TABLE's name starts (a RENAME's own line)."""
        return next(self._action_starts(statement), statement.start)

    def _action_starts(self, statement: Statement) -> Iterator[int]:
        relation = statement.fields.get("relation") or {}
        location = relation.get("location", statement.start)
        first, last = bisect_left(self._starts, statement.start), bisect_left(self._starts, statement.end)
        inside = [token for token in self.tokens[first:last] if token.name not in sql_parse.COMMENT_TOKENS]
        index = next((i for i, token in enumerate(inside) if token.start >= location), len(inside))
        while index + 2 < len(inside) and inside[index + 1].name == DOT:  # schema.table
            index += 2
        index += 1
        if index >= len(inside):
            return
        yield inside[index].start
        depth = 0
        for position in range(index, len(inside)):
            name = inside[position].name
            depth += (name == OPEN) - (name == CLOSE)
            if name == COMMA and depth == 0 and position + 1 < len(inside):
                yield inside[position + 1].start


def mask(sql: str) -> str:
    """The script with comments and string literals blanked (newlines kept): same length, same lines."""
    out = list(sql)
    for token in sql_parse.tokens(sql):
        if token.name in sql_parse.COMMENT_TOKENS | sql_parse.STRING_TOKENS:
            for position in range(token.start, min(token.end, len(out))):
                if out[position] != "\n":
                    out[position] = " "
    return "".join(out)


def strings(nodes: list[dict[str, Any]]) -> list[str]:
    """The parts of a dotted name ([{"String": {"sval": "public"}}, ...])."""
    return [node["String"]["sval"] for node in nodes if "String" in node]


def type_name(node: dict[str, Any]) -> str:
    """A TypeName's own name (its last part: "varchar" of pg_catalog.varchar)."""
    parts = strings(node.get("names", []))
    return parts[-1] if parts else "?"


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict in a parse tree, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def outside_transaction(sql: str) -> list[str] | None:
    """The script's statements, to run one by one, when one of them cannot run in a transaction block
    (CREATE INDEX CONCURRENTLY and the like: the safe forms the lock linter recommends); None when the
    script runs as it is, one implicit transaction. A BEGIN … COMMIT in the script still groups its part."""
    statements = sql_parse.statements(sql)
    if any(statement.error for statement in statements) or not any(map(_no_transaction, statements)):
        return None  # unreadable: PostgreSQL reports it, as it would for the whole script
    return [sql[statement.start:statement.end] for statement in statements]


def _no_transaction(statement: Statement) -> bool:
    fields = statement.fields
    if statement.kind in ("IndexStmt", "DropStmt"):
        return bool(fields.get("concurrent"))
    if statement.kind == "ReindexStmt":
        return any(param.get("DefElem", {}).get("defname") == "concurrently" for param in fields.get("params", []))
    if statement.kind == "AlterTableStmt":
        return any(command.get("AlterTableCmd", {}).get("subtype") == "AT_DetachPartition"
                   and command["AlterTableCmd"].get("def", {}).get("PartitionCmd", {}).get("concurrent")
                   for command in fields.get("cmds", []))
    return statement.kind == "VacuumStmt" and bool(fields.get("is_vacuumcmd"))
