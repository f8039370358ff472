"""Schema drift: does the live schema match what the migrations folder builds?

The folder is applied to a scratch database on the same server (`<db>__drift_<stamp>`,
like the restore's scratch databases, dropped on every way out), and both schemas are
read from the catalog and compared: tables, columns (type, nullability, default),
indexes, constraints and enum values, in the URL's Prisma schema. Prisma's own
`_prisma_migrations` is left out: its rows differ by design. The equivalent of
`prisma migrate diff --from-migrations … --to-url … --exit-code`, without Node.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from ops import pg, pg_url
from ops.clock import utc_now
from ops.errors import CheckFailed
from ops.lazy_dataclasses import dataclass
from ops.migrations.apply import apply_pending
from ops.migrations.lock_wait import LockPolicy
from ops.migrations.state import MIGRATIONS_TABLE, MigrationSource, load_migration_source, prisma_schema
from ops.restore_db import leftovers, maintenance_connection, side_name

if TYPE_CHECKING:
    import psycopg

    from ops.inventory import Environment
    from ops.migrations.state import LocalMigration
    from ops.secrets import Secret

# Each query yields (kind, name, description) for the objects of schema %(schema)s.
CATALOG = {
    "table": "SELECT format('%%I', c.relname), CASE c.relkind WHEN 'p' THEN 'partitioned table' ELSE 'table' END"
             " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
             " WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p') AND c.relname <> %(skip)s",
    "column": "SELECT format('%%I.%%I', c.relname, a.attname), format_type(a.atttypid, a.atttypmod)"
              " || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END"
              " || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')"
              " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
              " JOIN pg_namespace n ON n.oid = c.relnamespace"
              " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
              " WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p') AND c.relname <> %(skip)s"
              " AND a.attnum > 0 AND NOT a.attisdropped",
    "index": "SELECT format('%%I', i.relname), pg_get_indexdef(i.oid)"
             " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid"
             " JOIN pg_namespace n ON n.oid = i.relnamespace"
             " WHERE n.nspname = %(schema)s AND t.relname <> %(skip)s",
    "constraint": "SELECT format('%%I.%%I', t.relname, k.conname), pg_get_constraintdef(k.oid)"
                  " FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid"
                  " JOIN pg_namespace n ON n.oid = t.relnamespace"
                  " WHERE n.nspname = %(schema)s AND t.relname <> %(skip)s",
    "enum": "SELECT format('%%I', t.typname), string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)"
            " FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid JOIN pg_namespace n ON n.oid = t.typnamespace"
            " WHERE n.nspname = %(schema)s GROUP BY t.typname",
}


@dataclass(frozen=True)
class Difference:
    kind: str  # table, column, index, constraint, enum
    name: str
    database: str | None  # the live schema's description; None: missing there
    migrations: str | None  # what the migrations build; None: they do not

    def __str__(self) -> str:
        if self.migrations is None:
            return f"{self.kind} {self.name}: in the database only ({self.database})"
        if self.database is None:
            return f"{self.kind} {self.name}: missing from the database (the migrations build: {self.migrations})"
        return (f"{self.kind} {self.name} differs: the database has {self.database}; "
                f"the migrations build {self.migrations}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "database": self.database, "migrations": self.migrations,
                "text": str(self)}


Objects = dict[tuple[str, str], str]


def read_schema(conn: psycopg.Connection, schema: str) -> Objects:
    """Every table, column, index, constraint and enum of `schema`, each with its description."""
    objects: Objects = {}
    for kind, query in CATALOG.items():
        for name, description in conn.execute(query, {"schema": schema, "skip": MIGRATIONS_TABLE}).fetchall():
            objects[(kind, name)] = description or ""
    return objects


def compare(live: Objects, built: Objects) -> list[Difference]:
    """The differences, sorted by kind and name (pure)."""
    order = list(CATALOG)
    keys = sorted(set(live) | set(built), key=lambda key: (order.index(key[0]), key[1]))
    return [Difference(kind, name, live.get((kind, name)), built.get((kind, name)))
            for kind, name in keys if live.get((kind, name)) != built.get((kind, name))]


def find_drift(live_url: Secret, admin_url: Secret, migrations: list[LocalMigration], label: str) -> list[Difference]:
    """Apply `migrations` to a scratch database on the live database's server, compare both schemas."""
    schema = prisma_schema(live_url)
    with pg.connect(live_url, application_name=label[:63], autocommit=True) as live:
        database = live.info.dbname
        live_objects = read_schema(live, schema)
    with scratch_database(admin_url, database, label) as scratch_url:
        url = with_schema(scratch_url, schema)
        apply_pending(url, migrations, application_name=label, policy=LockPolicy(timeout=0))
        with pg.connect(url, application_name=label[:63], autocommit=True) as scratch:
            built = read_schema(scratch, schema)
    return compare(live_objects, built)


def environment_drift(env: Environment, label: str) -> tuple[MigrationSource, list[Difference]]:
    """The environment's migrations (checkout or first host) and how its live schema differs from them."""
    source = load_migration_source(env)
    return source, find_drift(env.database_url(direct=True), env.admin_url(), source.migrations, label)


@contextmanager
def scratch_database(admin_url: Secret, database: str, label: str) -> Iterator[Secret]:
    """`<database>__drift_<stamp>`, created by the admin role and dropped however the block ends."""
    with maintenance_connection(admin_url, label) as connection:
        may = connection.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
        if not may.fetchone()[0]:
            raise CheckFailed(f"{pg_url.parse_url(admin_url).describe()}: the role may not create the scratch "
                              "database the drift check applies the migrations to",
                              hint="set database.admin_url to a role with CREATEDB")
        for leftover in leftovers(connection, database, "drift"):
            pg.drop_database(connection, leftover)  # left by a check that was killed
        name = side_name(database, "drift", utc_now())
        pg.create_database(connection, name)
        try:
            yield pg_url.with_database(admin_url, name)
        finally:
            pg.drop_database(connection, name)


def with_schema(url: Secret, schema: str) -> str:
    """`url` with Prisma's `?schema=` set to `schema` (the admin URL may name another or none)."""
    parts = urlsplit(url.reveal())
    query = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if key != "schema"]
    return parts._replace(query=urlencode([*query, ("schema", schema)])).geturl()
