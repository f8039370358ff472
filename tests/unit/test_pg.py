"""Pure parts of ops.pg: URL parsing, child environments, lock keys, command builders."""

from __future__ import annotations

import pytest

from ops import pg, pg_tools, pg_url
from ops.cluster_globals import plan_roles
from ops.errors import InventoryError
from ops.secrets import Secret
from ops.table_diff import compare, split_name
from ops.table_restore import selection


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://app:pw@db.example.com:6543/shop", ("db.example.com", 6543, "shop", "app")),
        ("postgres://app:pw@db.example.com/shop", ("db.example.com", 5432, "shop", "app")),
        ("postgresql://app@10.0.0.5", ("10.0.0.5", 5432, "app", "app")),
        ("postgresql://app:pw@[::1]:5433/shop", ("::1", 5433, "shop", "app")),
        ("postgresql://us%40er:p%40ss@h/my%20db", ("h", 5432, "my db", "us@er")),
        ("postgresql://app:pw@h/shop?host=/var/run/postgresql&port=6000",
         ("/var/run/postgresql", 6000, "shop", "app")),
        ("postgresql://app:pw@h/shop?schema=public&connection_limit=5&pgbouncer=true",
         ("h", 5432, "shop", "app")),
    ],
)
def test_parse_url(url: str, expected: tuple[str, int, str, str]) -> None:
    target = pg_url.parse_url(Secret(url))
    assert (target.host, target.port, target.dbname, target.user) == expected
    assert "pw" not in target.describe()


@pytest.mark.parametrize(
    ("target", "text"),
    [
        (pg_url.DatabaseTarget("127.0.0.1", 5432, "app", "postgres"), "postgres@127.0.0.1:5432/app"),
        (pg_url.DatabaseTarget("::1", 5433, "app", "ops"), "ops@[::1]:5433/app"),
    ],
)
def test_describe(target: pg_url.DatabaseTarget, text: str) -> None:
    assert target.describe() == text


@pytest.mark.parametrize(
    "url",
    ["mysql://u:hunter2secret@h/db", "postgresql://u:hunter2secret@h:99999/db",
     "postgresql://u:hunter2secret@h:port/db", "postgresql://u:hunter2secret@h1,h2/db"],
)
def test_parse_url_rejects_without_leaking_the_password(url: str) -> None:
    with pytest.raises(InventoryError) as caught:
        pg_url.parse_url(url)
    assert "hunter2secret" not in str(caught.value)
    assert caught.value.hint


@pytest.mark.parametrize(
    ("url", "dbname", "expected"),
    [
        ("postgresql://app:p%40ss@h:5433/shop?sslmode=require", "shop_restore",
         "postgresql://app:p%40ss@h:5433/shop_restore?sslmode=require"),
        ("postgresql://app:pw@h", "other", "postgresql://app:pw@h/other"),
        ("postgresql://app:pw@h/a?dbname=a", "b c", "postgresql://app:pw@h/b%20c?dbname=b%20c"),
    ],
)
def test_with_database(url: str, dbname: str, expected: str) -> None:
    result = pg_url.with_database(Secret(url), dbname)
    assert isinstance(result, Secret)
    assert result.reveal() == expected
    assert pg_url.parse_url(result).dbname == dbname
    assert pg_url.connection_params(result)["password"] == pg_url.connection_params(url)["password"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://app:p%40ss@db:6543/shop?sslmode=verify-full&sslrootcert=/ca.pem&pgbouncer=true",
         {"PGHOST": "db", "PGPORT": "6543", "PGDATABASE": "shop", "PGUSER": "app", "PGPASSWORD": "p@ss",
          "PGSSLMODE": "verify-full", "PGSSLROOTCERT": "/ca.pem", "PGCONNECT_TIMEOUT": "10",
          "PGAPPNAME": "opsbook"}),
        ("postgresql://app@db/shop?connect_timeout=3&application_name=nightly&keepalives=1",
         {"PGHOST": "db", "PGPORT": "5432", "PGDATABASE": "shop", "PGUSER": "app",
          "PGCONNECT_TIMEOUT": "3", "PGAPPNAME": "nightly"}),
    ],
)
def test_libpq_environment(url: str, expected: dict[str, str]) -> None:
    assert pg_url.libpq_environment(Secret(url)) == expected


def test_child_environment_drops_the_operators_pg_settings() -> None:
    base = {"PATH": "/usr/bin", "PGHOST": "elsewhere", "PGSERVICE": "prod", "PGSSLMODE": "disable"}
    environment = pg_url.child_environment("postgresql://app:pw@db/shop", base)
    assert environment["PATH"] == "/usr/bin"
    assert environment["PGHOST"] == "db"
    assert "PGSERVICE" not in environment
    assert "PGSSLMODE" not in environment


def test_lock_key_is_stable_distinct_and_63_bit() -> None:
    key = pg.lock_key("opsbook", "prod", "database")
    assert key == pg.lock_key("opsbook", "prod", "database")
    assert key == 7013800324360584012  # must never change between releases: runs would not exclude
    others = {pg.lock_key("opsbook", "staging", "database"), pg.lock_key("opsbookprod", "database"),
              pg.lock_key("opsbook", "prod", "data", "base"), pg.lock_key()}
    assert key not in others and len(others) == 4
    assert all(0 <= value < 2**63 for value in [*others, key])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pg_dump (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)\n", (15, "15.14")),
        ("pg_restore (PostgreSQL) 18.6\n", (18, "18.6")),
        ("psql (PostgreSQL) 19devel\n", (19, "19devel")),
        ("pg_dump (PostgreSQL) 9.6.24\n", (9, "9.6.24")),
        ("pg_dump: command not found", None),
    ],
)
def test_parse_tool_version(text: str, expected: tuple[int, str] | None) -> None:
    assert pg_tools.parse_tool_version(text) == expected


TOOL = pg_tools.ClientTool(name="pg_dump", path="/usr/lib/postgresql/15/bin/pg_dump", major=15, version="15.14")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, [TOOL.path, "--no-password", "--compress=0", "--format=custom"]),
        ({"snapshot": "00000003-0000001B-1", "compress": 6},
         [TOOL.path, "--no-password", "--compress=6", "--format=custom", "--snapshot=00000003-0000001B-1"]),
        ({"jobs": 2, "output": "/backups/dir"},
         [TOOL.path, "--no-password", "--compress=0", "--format=directory", "--jobs=2", "--file=/backups/dir"]),
        ({"output": "/backups/dump.pgc"},
         [TOOL.path, "--no-password", "--compress=0", "--format=custom", "--file=/backups/dump.pgc"]),
    ],
)
def test_dump_command(options: dict, expected: list[str]) -> None:
    assert pg_tools.dump_command(TOOL, **options) == expected


def test_excluded_table_data_patterns_match_exactly_one_table() -> None:
    command = pg_tools.dump_command(TOOL, exclude_table_data=["public.Session", 'audit.Odd"Name*'])
    assert command[-2:] == ['--exclude-table-data="public"."Session"', '--exclude-table-data="audit"."Odd""Name*"']


@pytest.mark.parametrize("options", [{"jobs": 2}, {"compress": 10}, {"compress": -1}])
def test_dump_command_refuses_impossible_options(options: dict) -> None:
    with pytest.raises(ValueError):
        pg_tools.dump_command(TOOL, **options)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"dbname": "shop_restore"}, ["pg_restore", "--no-password", "--exit-on-error", "--dbname=shop_restore"]),
        ({"dbname": "x", "archive": "/tmp/d.pgc", "jobs": 2, "no_owner": True},
         ["pg_restore", "--no-password", "--exit-on-error", "--dbname=x", "--jobs=2", "--no-owner",
          "--no-acl", "/tmp/d.pgc"]),
    ],
)
def test_restore_command(options: dict, expected: list[str]) -> None:
    assert pg_tools.restore_command("pg_restore", **options) == expected


def test_restore_command_refuses_jobs_from_stdin() -> None:
    with pytest.raises(ValueError):
        pg_tools.restore_command("pg_restore", dbname="x", jobs=2)


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://app:pw@ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech/shop?sslmode=require&pgbouncer=true",
     "postgresql://app:pw@ep-cool-darkness-123456.us-east-2.aws.neon.tech/shop?sslmode=require"),
    ("postgresql://app@ep-a-pooler.eu-central-1.aws.neon.tech:5432/shop",
     "postgresql://app@ep-a.eu-central-1.aws.neon.tech:5432/shop"),
    ("postgresql://ep-x-pooler-user:pw@ep-x-pooler.neon.tech/d", "postgresql://ep-x-pooler-user:pw@ep-x.neon.tech/d"),
])
def test_direct_from_pooled_strips_the_neon_pooler_suffix(url: str, expected: str) -> None:
    derived = pg_url.direct_from_pooled(url)
    assert derived is not None and derived.reveal() == expected


@pytest.mark.parametrize("url", [
    "postgresql://app:pw@ep-cool-darkness-123456.us-east-2.aws.neon.tech/shop",
    "postgresql://app:pw@pgbouncer.internal:6432/shop?pgbouncer=true",
    "postgresql://app:pw@db-pooler-two.internal/shop",
    "postgresql://app:pw@[::1]:5432/shop",
])
def test_direct_from_pooled_leaves_other_hosts_alone(url: str) -> None:
    assert pg_url.direct_from_pooled(url) is None


# --- restore.diff's merge and the globals' role plan (pure) -----------------------------------------

GLOBALS = """--
\\restrict abc
SET default_transaction_read_only = off;

CREATE ROLE "Mixed Case";
ALTER ROLE "Mixed Case" WITH NOSUPERUSER INHERIT NOLOGIN;
CREATE ROLE app;
ALTER ROLE app WITH NOSUPERUSER INHERIT LOGIN PASSWORD 'SCRAM-SHA-256$4096:x';
CREATE ROLE owner_r;
ALTER ROLE owner_r WITH NOSUPERUSER INHERIT LOGIN CONNECTION LIMIT 5;
CREATE ROLE postgres;
ALTER ROLE postgres WITH SUPERUSER INHERIT CREATEROLE LOGIN;
CREATE ROLE root_too;
ALTER ROLE root_too WITH SUPERUSER INHERIT LOGIN;
ALTER ROLE owner_r SET work_mem TO '8MB';
GRANT "Mixed Case" TO owner_r GRANTED BY postgres;
GRANT app TO postgres GRANTED BY postgres;
CREATE TABLESPACE fast OWNER postgres LOCATION '/srv/fast';
\\unrestrict abc
"""


def test_only_missing_roles_are_created_and_existing_ones_never_altered():
    plan = plan_roles(GLOBALS, existing={"postgres", "app"}, restoring="deployer")
    assert plan.create == ["Mixed Case", "owner_r"]
    assert plan.skipped == {"app": "exists on the target (left as it is)",
                            "postgres": "exists on the target (left as it is)",
                            "root_too": "a superuser of the source server"}
    assert plan.statements == [
        'CREATE ROLE "Mixed Case";', 'ALTER ROLE "Mixed Case" WITH NOSUPERUSER INHERIT NOLOGIN;',
        "CREATE ROLE owner_r;", "ALTER ROLE owner_r WITH NOSUPERUSER INHERIT LOGIN CONNECTION LIMIT 5;",
        "ALTER ROLE owner_r SET work_mem TO '8MB';", 'GRANT "Mixed Case" TO owner_r;']
    assert plan.left_out == ["tablespaces"]
    assert plan_roles(GLOBALS, existing=set(), restoring="owner_r").skipped["owner_r"] == "the restoring role"


def test_the_merge_finds_missing_changed_and_added_rows_by_key():
    backup = iter([((1,), ("1", "a")), ((2,), ("2", "b")), ((4,), ("4", "d")), ((5,), ("5", None))])
    live = iter([((2,), ("2", "B")), ((3,), ("3", "c")), ((4,), ("4", "d"))])
    found = compare(backup, live, [0])
    assert [key for key, _row in found.missing] == [["1"], ["5"]]
    assert found.changed == [(["2"], ["2", "b"])] and found.added == [["3"]] and found.same == 1
    assert found.summary() == {"missing": 2, "changed": 1, "added_since": 1, "same": 1}


def test_partial_restore_options_and_names():
    assert selection(["User", "Brand"], None) == ("--table", "User", "--table", "Brand")
    assert selection(["User"], "shop") == ("--schema", "shop", "--table", "User")
    assert selection([], "shop") == ("--schema", "shop")
    assert split_name("User", None) == ("public", "User") and split_name("shop.User", None) == ("shop", "User")
