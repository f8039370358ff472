"""The contract gate: no dropping or renaming what a live release still uses.

Expand/contract, enforced by what is deployed: a pending migration that drops or renames
a table or a column is refused while the `prisma/schema.prisma` of any host's current
release still maps a model to that table or a field to that column (Prisma's `@@map` and
`@map` followed). The schema is read from the release directory `current` points to (or
from `app.dir` itself without the releases layout). This module is pure: it finds the
removals in the SQL and the references in a schema's text; ops/migrate_steps.py reads
the hosts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING

from ops.lazy_dataclasses import dataclass
from ops.migrations.script import Script, strings

if TYPE_CHECKING:
    from ops.migrations.state import LocalMigration


@dataclass(frozen=True)
class Removal:
    """A table, or a column of one, that a migration drops or renames (names unquoted, schema left out)."""

    migration: str
    line: int
    action: str  # "drops" or "renames"
    table: str
    column: str | None = None

    @property
    def what(self) -> str:
        return f'column "{self.table}"."{self.column}"' if self.column else f'table "{self.table}"'

    def __str__(self) -> str:
        return f"{self.migration}/migration.sql:{self.line} {self.action} {self.what}"


@dataclass(frozen=True)
class Reference:
    """Where a release's schema uses a table or a column: `model User` or `model User, field email`."""

    table: str
    column: str | None
    where: str


def removals(migrations: Iterable[LocalMigration]) -> list[Removal]:
    """Every DROP TABLE, DROP COLUMN and RENAME of a table or column in the migrations, in order."""
    found: list[Removal] = []
    for migration in migrations:
        script = Script(migration.sql)
        for statement in script.statements:
            line = script.line(statement.start)
            fields, kind = statement.fields, statement.kind
            if kind == "DropStmt" and fields.get("removeType") == "OBJECT_TABLE":
                found += [Removal(migration.name, line, "drops", strings(item["List"]["items"])[-1])
                          for item in fields.get("objects", []) if "List" in item]
            elif kind == "AlterTableStmt":
                table = (fields.get("relation") or {}).get("relname", "?")
                found += [Removal(migration.name, script.line(offset), "drops", table, command["name"])
                          for offset, command in script.actions(statement)
                          if command.get("subtype") == "AT_DropColumn" and command.get("name")]
            elif kind == "RenameStmt" and fields.get("renameType") in ("OBJECT_TABLE", "OBJECT_COLUMN"):
                table = (fields.get("relation") or {}).get("relname", "?")
                column = fields.get("subname") if fields["renameType"] == "OBJECT_COLUMN" else None
                found.append(Removal(migration.name, line, "renames", table, column))
    return found


@cache
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    block = re.compile(r"^\s*(model|view)\s+(\w+)\s*\{(.*?)^\s*\}", re.M | re.S)
    field = re.compile(r"^\s*(\w+)\s+(\w+)(\[\])?\??(.*)$")
    mapped = re.compile(r"@@?map\(\s*(?:name:\s*)?\"([^\"]*)\"")
    return block, field, mapped


def references(schema_text: str) -> list[Reference]:
    """The tables and columns a schema.prisma's models use (relation fields, which have no column, left out)."""
    block, field, mapped = _patterns()
    text = re.sub(r"//.*", "", schema_text)
    models = [(match[2], match[3]) for match in block.finditer(text)]
    names = {name for name, _body in models}
    found: list[Reference] = []
    for model, body in models:
        table = model
        columns: list[tuple[str, str]] = []
        for raw in body.splitlines():
            line = raw.strip()
            if line.startswith("@@"):
                named = mapped.search(line)
                table = named[1] if named and line.startswith("@@map") else table
                continue
            parsed = field.match(line)
            if parsed is None or parsed[2] in names:  # a relation field: its foreign key is its own field
                continue
            named = mapped.search(parsed[4])
            columns.append((named[1] if named else parsed[1], parsed[1]))
        found.append(Reference(table, None, f"model {model}"))
        found += [Reference(table, column, f"model {model}, field {name}") for column, name in columns]
    return found


def conflicts(found: list[Removal], schema_text: str) -> list[tuple[Removal, Reference]]:
    """Each removal a schema still references: a dropped table by its model, a dropped column by its field."""
    used = references(schema_text)
    return [(removal, reference) for removal in found for reference in used
            if reference.table == removal.table and reference.column == removal.column]
