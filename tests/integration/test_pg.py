"""ops.pg against real PostgreSQL 15 and 18 clusters on loopback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from pathlib import Path

import psycopg
import pytest

from ops import pg, pg_tools, pg_url
from ops.errors import CheckFailed, ConnectionFailed, LockHeld, StepFailed
from tests.fixtures.postgres import PostgresServer


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


def _plain_url(server: PostgresServer, password: str, dbname: str = "postgres", port: int | None = None) -> str:
    # A plain string, not a Secret: the password is not registered for redaction,
    # so only ops.pg's own discipline keeps it out of messages.
    return f"postgresql://postgres:{password}@127.0.0.1:{port or server.port}/{dbname}"


# --- connections -----------------------------------------------------------------------------


def test_connect_names_itself_and_reads_the_server_version(postgres_server: PostgresServer) -> None:
    with pg.connect(postgres_server.url(), application_name="opsbook test") as conn:
        assert pg.server_version(conn)[0] == postgres_server.major
        name = conn.execute("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        assert name.fetchone()[0] == "opsbook test"
        assert not conn.autocommit


def test_wrong_password_names_the_target_and_hides_the_password(postgres_server: PostgresServer) -> None:
    wrong = "Wr0ng-Passw0rd-4711"
    with pytest.raises(ConnectionFailed) as caught:
        pg.connect(_plain_url(postgres_server, wrong))
    text = str(caught.value)
    assert f"127.0.0.1:{postgres_server.port}/postgres" in text
    assert "password" in caught.value.hint
    assert wrong not in text and postgres_server.password.reveal() not in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_server_down_is_a_connection_failure(postgres_server: PostgresServer) -> None:
    port = _closed_port()
    with pytest.raises(ConnectionFailed) as caught:
        pg.connect(_plain_url(postgres_server, "Secr3t-Never-Shown", port=port), connect_timeout=3)
    assert f"127.0.0.1:{port}/postgres" in str(caught.value)
    assert "running" in caught.value.hint
    assert "Secr3t-Never-Shown" not in str(caught.value)


def test_missing_database_says_so(postgres_server: PostgresServer) -> None:
    with pytest.raises(ConnectionFailed) as caught:
        pg.connect(pg_url.with_database(postgres_server.url(), "no_such_db"))
    assert "no_such_db" in str(caught.value) and "does not exist" in caught.value.hint


# --- advisory locks --------------------------------------------------------------------------


def test_second_holder_is_refused_with_the_first_holders_name(postgres_server: PostgresServer) -> None:
    key = pg.lock_key("opsbook", "test", "refused")
    with pg.connect(postgres_server.url(), autocommit=True) as first, pg.connect(postgres_server.url()) as second:
        with pg.advisory_lock(first, key, holder_label="opsbook run R1 by alice@laptop"):
            with pytest.raises(LockHeld) as caught, pg.advisory_lock(second, key, holder_label="opsbook run R2"):
                pytest.fail("the lock was granted twice")
            assert caught.value.exit_code == 75
            assert "opsbook run R1 by alice@laptop" in str(caught.value)
            assert "127.0.0.1" in str(caught.value)
        # Released on exit: now the second run gets it, and its connection is left idle.
        with pg.advisory_lock(second, key, holder_label="opsbook run R2"):
            assert _advisory_holders(first, key) == ["opsbook run R2"]
        assert second.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert _advisory_holders(first, key) == []


def test_lock_of_a_dead_holder_is_taken_over(postgres_server: PostgresServer) -> None:
    key = pg.lock_key("opsbook", "test", "takeover")
    with contextlib.ExitStack() as stack, pg.connect(postgres_server.url(), autocommit=True) as second:
        dying = pg.connect(postgres_server.url(), autocommit=True)
        stack.enter_context(pg.advisory_lock(dying, key, holder_label="opsbook run that dies"))
        dying.close()  # the holder's session ends without releasing: the server frees the lock
        with pg.advisory_lock(second, key, holder_label="opsbook run R3"):
            assert _advisory_holders(second, key) == ["opsbook run R3"]
    # Leaving the dead holder's block must not raise on its closed connection.


def _advisory_holders(conn: psycopg.Connection, key: int) -> list[str]:
    rows = conn.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.classid::bigint = %s AND l.objid::bigint = %s",
        (key >> 32, key & 0xFFFFFFFF)).fetchall()
    return [row[0] for row in rows]


# --- client tools ----------------------------------------------------------------------------


def test_finds_a_pg_dump_for_the_server(postgres_server: PostgresServer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPS_PG_BIN", raising=False)
    tool = pg_tools.find_client_tool("pg_dump", postgres_server.major)
    assert tool.major >= postgres_server.major and Path(tool.path).exists()
    exact = pg_tools.find_client_tool("pg_dump", postgres_server.major, [str(postgres_server.bin_dir)])
    assert exact.path == str(postgres_server.bin_dir / "pg_dump")
    assert exact.version.startswith(f"{postgres_server.major}.")


def test_older_client_is_refused_for_a_newer_server(postgres_server: PostgresServer,
                                                    postgres18_server: PostgresServer) -> None:
    with pg.connect(postgres18_server.url()) as conn:
        server_major = pg.server_version(conn)[0]
    assert server_major == 18
    with pytest.raises(CheckFailed) as caught:
        pg_tools.find_client_tool("pg_dump", server_major, [str(postgres_server.bin_dir)])
    text = str(caught.value)
    assert "PostgreSQL 18" in text and f"pg_dump {postgres_server.major}." in text
    assert str(postgres_server.bin_dir / "pg_dump") in text
    assert "postgresql-client-18" in text and "postgresql@18" in text and "OPS_PG_BIN" in text
    assert caught.value.exit_code == 3
    # The refusal is needed: that pg_dump really cannot dump the newer server.
    dumped = subprocess.run(pg_tools.dump_command(str(postgres_server.bin_dir / "pg_dump")),
                            env=pg_url.child_environment(postgres18_server.url()), capture_output=True,
                            check=False)
    assert dumped.returncode != 0 and b"server version mismatch" in dumped.stderr


def test_default_search_ignores_the_wheel_but_honours_ops_pg_bin(postgres18_server: PostgresServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPS_PG_BIN", raising=False)
    wheel_tool = str(postgres18_server.bin_dir / "pg_dump")
    with contextlib.suppress(CheckFailed):  # this machine may have a real PostgreSQL 18 client
        assert pg_tools.find_client_tool("pg_dump", 18).path != wheel_tool
    monkeypatch.setenv("OPS_PG_BIN", str(postgres18_server.bin_dir))
    tool = pg_tools.find_client_tool("pg_dump", 15)  # chosen by the operator, though older servers would do
    assert (tool.path, tool.major) == (wheel_tool, 18)
    dumped = subprocess.run(pg_tools.dump_command(tool), env=pg_url.child_environment(postgres18_server.url()),
                            capture_output=True, check=True)
    assert dumped.stdout.startswith(b"PGDMP")


# --- databases and row counts ----------------------------------------------------------------


def test_create_and_drop_database(postgres_server: PostgresServer) -> None:
    name = "opsbook_Created db"  # needs quoting
    with pg.connect(postgres_server.url(), autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS app_owner")
        admin.execute("CREATE ROLE app_owner")
        pg.drop_database(admin, name)
        pg.create_database(admin, name, owner="app_owner", template="template0")
        assert pg.database_exists(admin, name)
        owner = admin.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,))
        assert owner.fetchone()[0] == "app_owner"
        with pytest.raises(StepFailed) as caught:
            pg.create_database(admin, name)
        assert "already exists" in str(caught.value)
        with pg.connect(pg_url.with_database(postgres_server.url(), name)) as user_of_it:
            pg.drop_database(admin, name)  # force: its open session does not block the drop
            assert user_of_it.closed or user_of_it.broken or _session_gone(user_of_it)
        assert not pg.database_exists(admin, name)
        pg.drop_database(admin, name)  # already gone: nothing to do
        admin.execute("DROP ROLE app_owner")
    with pg.connect(postgres_server.url()) as in_transaction, pytest.raises(ValueError):
        pg.create_database(in_transaction, "never_created")


def _session_gone(conn: psycopg.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False


def test_table_row_counts(postgres_server: PostgresServer) -> None:
    with pg.connect(postgres_server.create_database(), autocommit=True) as conn:
        conn.execute("""
            CREATE SCHEMA shop;
            CREATE TABLE public."User" (id int);
            INSERT INTO public."User" SELECT generate_series(1, 3);
            CREATE TABLE shop.orders (id int, day date) PARTITION BY RANGE (day);
            CREATE TABLE shop.orders_2026 PARTITION OF shop.orders FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
            INSERT INTO shop.orders SELECT i, '2026-05-01' FROM generate_series(1, 5) i;
            CREATE TABLE shop.events (id int);
            CREATE TABLE shop.events_old () INHERITS (shop.events);
            INSERT INTO shop.events VALUES (1);
            INSERT INTO shop.events_old VALUES (2), (3);
            CREATE TABLE shop.empty (id int);
            CREATE VIEW shop.v AS SELECT 1;
        """)
        assert pg.table_row_counts(conn) == {
            "public.User": 3, "shop.empty": 0, "shop.events": 1, "shop.events_old": 2, "shop.orders_2026": 5,
        }
        assert list(pg.table_row_counts(conn)) == sorted(pg.table_row_counts(conn))


def test_counts_and_dump_share_one_snapshot(postgres_server: PostgresServer) -> None:
    source_url = postgres_server.create_database()
    target_url = postgres_server.create_database()
    tool = pg_tools.find_client_tool("pg_dump", postgres_server.major, [str(postgres_server.bin_dir)])
    restore = pg_tools.find_client_tool("pg_restore", postgres_server.major, [str(postgres_server.bin_dir)])
    with pg.connect(source_url, autocommit=True) as writer, pg.connect(source_url) as reader:
        writer.execute("CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 10)")
        with pg.exported_snapshot(reader) as snapshot:
            counts = pg.table_row_counts(reader)
            writer.execute("INSERT INTO items SELECT generate_series(11, 15)")  # after the snapshot
            dump = subprocess.run(pg_tools.dump_command(tool, snapshot=snapshot),
                                  env=pg_url.child_environment(source_url), capture_output=True, check=True)
    assert counts == {"public.items": 10}
    target = pg_url.parse_url(target_url).dbname
    subprocess.run(pg_tools.restore_command(restore, dbname=target), input=dump.stdout,
                   env=pg_url.child_environment(target_url), capture_output=True, check=True)
    with pg.connect(target_url) as restored:
        assert pg.table_row_counts(restored) == counts
