"""Which databases a backup holds (`database.names`): the app's alone, a list, or every one ("all").

With `all` the list is read when the backup runs, on the admin role's maintenance connection: every
non-template database that accepts connections and that the role may connect to, but not the side
databases opsbook's own restores, verifications and diffs make and drop (`<db>__restore_<stamp>`…).
The app's database comes first: the manifest's top-level dump fields describe the first database.
The list a backup took is recorded in its manifest (`databases`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ops import restore_db
from ops.patterns import Pattern

if TYPE_CHECKING:
    import psycopg

    from ops.inventory import Environment

SIDE_DATABASE = Pattern(r"__(restore|old|verify|diff)_\d{14}$")  # restore_db.side_name's names

EVERY_DATABASE = ("SELECT datname FROM pg_database WHERE NOT datistemplate AND datallowconn "
                  "AND has_database_privilege(datname, 'CONNECT') ORDER BY datname")


def backup_databases(env: Environment) -> list[str] | None:
    """The databases a backup of `env` dumps, in order; None: the app's database alone, stored as always."""
    names = env.database_names()
    if names is None or isinstance(names, list):
        return names
    with restore_db.maintenance_connection(env.admin_url(), "opsbook backup: list the databases") as connection:
        return every_database(connection, env.database_name())


def every_database(connection: psycopg.Connection, first: str) -> list[str]:
    return ordered([row[0] for row in connection.execute(EVERY_DATABASE).fetchall()], first)


def ordered(names: list[str], first: str) -> list[str]:
    """`names` without opsbook's side databases, `first` (the app's) ahead of the others."""
    kept = [name for name in names if not SIDE_DATABASE.search(name)]
    return sorted(kept, key=lambda name: (name != first, name))
