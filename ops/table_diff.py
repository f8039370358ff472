"""restore.diff's comparison: a backup's rows of one table against the live table's, by primary key, and the
reviewed SQL file that puts the backup's rows back.

Both sides are read ordered by the primary key through server-side cursors and merged, so memory stays
bounded whatever the table's size. Keys come back as Python values (ints, uuids, text ordered COLLATE "C",
which is code-point order, as Python compares str), every column as its text form (NULL as None): two rows
differ when any text differs, and the file writes each value as that text, quoted (sql.Literal) and cast to
the column's type, so any type round-trips. Rows only in the live table are reported, never deleted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import field
from typing import TYPE_CHECKING, Any

from ops import pg
from ops.errors import CheckFailed, UsageError
from ops.lazy_dataclasses import dataclass

if TYPE_CHECKING:
    import psycopg

SHOWN_KEYS = 20  # changed or added keys named in the file's comments


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type: a name this server reads, quoted where needed
    key: int  # position in the primary key (1-based), 0 when not part of it
    collatable: bool
    generated: bool  # GENERATED ALWAYS AS (…): never written
    identity_always: bool  # GENERATED ALWAYS AS IDENTITY: written with OVERRIDING SYSTEM VALUE


@dataclass
class Table:
    schema: str
    name: str
    columns: list[Column]

    @property
    def keys(self) -> list[Column]:
        return sorted((column for column in self.columns if column.key), key=lambda column: column.key)

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass
class Difference:
    missing: list[tuple[list[str | None], list[str | None]]] = field(default_factory=list)  # (key, backup row)
    changed: list[tuple[list[str | None], list[str | None]]] = field(default_factory=list)
    added: list[list[str | None]] = field(default_factory=list)  # keys only in the live table
    same: int = 0
    backup_hash: str = ""  # sha256 of each side's rows in key order (hashed): equal when the rows are
    live_hash: str = ""

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.changed) + len(self.added)

    def summary(self) -> dict[str, int]:
        return {"missing": len(self.missing), "changed": len(self.changed), "added_since": len(self.added),
                "same": self.same}


# --- reading ---------------------------------------------------------------------------------

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, NULL),
       coalesce((SELECT k.n FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) WHERE k.attnum = a.attnum), 0),
       a.attcollation <> 0, a.attgenerated <> '', a.attidentity = 'a'
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


def split_name(name: str, schema: str | None) -> tuple[str, str]:
    """("public", "User") from `User`, or from `public.User`; the names as written (case kept)."""
    if "." in name and schema is None:
        head, _, tail = name.partition(".")
        return head, tail
    return schema or "public", name


def read_table(conn: psycopg.Connection, schema: str, name: str) -> Table | None:
    rows = conn.execute(_COLUMNS, (schema, name)).fetchall()
    if not rows:
        return None
    return Table(schema, name, [Column(*row) for row in rows])


def require_key(table: Table | None, schema: str, name: str, where: str) -> Table:
    """The table, refused (UsageError: exit 3 means "rows differ") when absent or without a primary key."""
    if table is None:
        raise UsageError(f"there is no table {schema}.{name} in {where}",
                          hint="name the table as the database spells it (case matters), with --schema if not public")
    if not table.keys:
        raise UsageError(f"{table.label} in {where} has no primary key: its rows cannot be matched with the backup's",
                          hint="compare it by hand: `inv restore --table … --into SCRATCH` restores the backup's "
                               "copy beside it")
    return table


def select_query(conn: psycopg.Connection, table: Table, columns: list[Column], where: str | None) -> str:
    """Keys as values, then every column as text, ordered by the key as Python orders the values."""
    keys = [f"t.{pg.quote_identifier(conn, column.name)}" for column in table.keys]
    texts = [f"t.{pg.quote_identifier(conn, column.name)}::text" for column in columns]
    order = [f'{name} COLLATE "C"' if column.collatable else name for name, column in zip(keys, table.keys,
                                                                                          strict=True)]
    return (f"SELECT {', '.join(keys + texts)} FROM {pg.quote_identifier(conn, table.schema, table.name)} AS t"
            + (f" WHERE ({where})" if where else "") + f" ORDER BY {', '.join(order)}")


def keyed_rows(conn: psycopg.Connection, query: str, keys: int, side: str) -> Iterator[tuple[tuple, tuple]]:
    """(key values, column texts) in key order; CheckFailed when the order is not one Python can follow."""
    previous: tuple | None = None
    for row in pg.stream_rows(conn, query, f"opsbook_diff_{side}"):
        key, values = tuple(row[:keys]), tuple(row[keys:])
        if previous is not None and not previous < key:
            raise CheckFailed(f"the {side} rows do not come back in an order opsbook can merge on (key type)",
                              hint="compare the table by hand against a scratch restore (`inv restore --table …`)")
        previous = key
        yield key, values


def compare(backup: Iterator[tuple[tuple, tuple]], live: Iterator[tuple[tuple, tuple]],
            key_positions: list[int]) -> Difference:
    """A merge of both sides in key order; `key_positions` pick the key's texts out of a row."""
    found = Difference()
    old, new = next(backup, None), next(live, None)
    while old is not None or new is not None:
        if new is None or (old is not None and old[0] < new[0]):
            found.missing.append(([old[1][i] for i in key_positions], list(old[1])))
            old = next(backup, None)
        elif old is None or new[0] < old[0]:
            found.added.append([new[1][i] for i in key_positions])
            new = next(live, None)
        else:
            if old[1] != new[1]:
                found.changed.append(([old[1][i] for i in key_positions], list(old[1])))
            else:
                found.same += 1
            old, new = next(backup, None), next(live, None)
    return found


def hashed(rows: Iterator[tuple[tuple, tuple]], digest: Any) -> Iterator[tuple[tuple, tuple]]:
    """`rows`, each one's texts fed to `digest` on the way: both sides' digests are equal exactly when their
    rows are (the table's content hash, in key order)."""
    for key, values in rows:
        digest.update(repr(values).encode())
        yield key, values


# --- the reviewed file -------------------------------------------------------------------------


def render(conn: psycopg.Connection, table: Table, columns: list[Column], found: Difference, *,
           restore_changed: bool, header: list[str]) -> str:
    """The SQL file: one transaction re-inserting missing rows (and restoring changed ones when asked)."""
    name = pg.quote_identifier(conn, table.schema, table.name)
    written = [column for column in columns if not column.generated]
    lines = [f"-- {line}" for line in header]
    lines += [f"-- {len(found.missing)} row(s) missing from the live table: re-inserted",
              f"-- {len(found.changed)} row(s) changed since the backup: "
              + ("restored to the backup's values" if restore_changed else "left alone (--restore-changed)"),
              f"-- {len(found.added)} row(s) only in the live table: left alone"]
    lines += [f"--   changed, left alone: {_key_text(key)}" for key, _row in found.changed[:SHOWN_KEYS]
              if not restore_changed]
    lines += [f"--   only live: {_key_text(key)}" for key in found.added[:SHOWN_KEYS]]
    lines += ["BEGIN;"]
    override = " OVERRIDING SYSTEM VALUE" if any(column.identity_always for column in written) else ""
    targets = ", ".join(pg.quote_identifier(conn, column.name) for column in written)
    positions = {column.name: index for index, column in enumerate(columns)}
    for _key, row in found.missing:
        values = ", ".join(_literal(conn, row[positions[column.name]], column) for column in written)
        lines.append(f"INSERT INTO {name} ({targets}){override} VALUES ({values});")
    if restore_changed:
        settable = [column for column in written if not column.key and not column.identity_always]
        for _key, row in found.changed:
            assignments = ", ".join(f"{pg.quote_identifier(conn, column.name)} = "
                                    f"{_literal(conn, row[positions[column.name]], column)}" for column in settable)
            lines.append(f"UPDATE {name} SET {assignments} WHERE {_match(conn, table, row, positions)};")
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def statements(found: Difference, restore_changed: bool) -> int:
    return len(found.missing) + (len(found.changed) if restore_changed else 0)


def _literal(conn: psycopg.Connection, text: str | None, column: Column) -> str:
    return "NULL" if text is None else f"{pg.quote_literal(conn, text)}::{column.type}"


def _match(conn: psycopg.Connection, table: Table, row: list[str | None], positions: dict[str, int]) -> str:
    return " AND ".join(f"{pg.quote_identifier(conn, column.name)} = "
                        f"{_literal(conn, row[positions[column.name]], column)}" for column in table.keys)


def _key_text(key: list[str | None]) -> str:
    return ", ".join(str(part) for part in key).replace("\n", " ")[:200]


def common_columns(live: Table, backup: Table) -> tuple[list[Column], list[str]]:
    """The live table's columns the backup also has, and a note for each column on one side only."""
    theirs = {column.name for column in backup.columns}
    ours = {column.name for column in live.columns}
    notes = [f"column {name} is not in the backup's table" for name in sorted(ours - theirs)]
    notes += [f"column {name} is only in the backup's table" for name in sorted(theirs - ours)]
    return [column for column in live.columns if column.name in theirs], notes


def key_positions(table: Table, columns: list[Column]) -> list[int]:
    names = [column.name for column in columns]
    return [names.index(column.name) for column in table.keys]


def diff_tables(backup_conn: Any, live_conn: Any, live: Table, backup: Table, where: str | None
                ) -> tuple[list[Column], Difference]:
    """The comparison of both sides, each read in a transaction of its own."""
    columns, _notes = common_columns(live, backup)
    missing_keys = [column.name for column in live.keys if column.name not in {c.name for c in columns}]
    if missing_keys:
        raise CheckFailed(f"the backup's {backup.label} has no column {', '.join(missing_keys)} of the live "
                          "primary key: the rows cannot be matched", hint="compare by hand against a scratch restore")
    keys = len(live.keys)
    digests = hashlib.sha256(), hashlib.sha256()
    backup_rows = hashed(keyed_rows(backup_conn, select_query(backup_conn, live, columns, where), keys, "backup"),
                         digests[0])
    live_rows = hashed(keyed_rows(live_conn, select_query(live_conn, live, columns, where), keys, "live"), digests[1])
    found = compare(backup_rows, live_rows, key_positions(live, columns))
    found.backup_hash, found.live_hash = digests[0].hexdigest(), digests[1].hexdigest()
    return columns, found
