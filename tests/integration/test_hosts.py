"""ops.hosts against a real sshd on loopback, and the test app started over SSH."""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ops.errors import ConnectionFailed, StepFailed
from ops.hosts import (
    HostConnection,
    build_fetch_command,
    connect,
    parse_fetch_output,
    run_on_hosts,
)
from ops.secrets import Secret
from tests.fixtures.ssh import AppHost, SshServer, free_port


@pytest.fixture(scope="module")
def web1(ssh_server: SshServer):
    with connect(ssh_server.host_config("web1")) as connection:
        yield connection


def make_secret(prefix: str = "secret") -> Secret:
    return Secret(f"{prefix}-{secrets.token_hex(12)}")


# --- commands --------------------------------------------------------------------


def test_run_captures_output_and_exit_code(web1: HostConnection) -> None:
    result = web1.run("echo hello; echo warning >&2")
    assert (result.ok, result.exit_code, result.stdout, result.stderr) == (True, 0, "hello\n", "warning\n")

    failed = web1.run("exit 3", check=False)
    assert (failed.ok, failed.exit_code) == (False, 3)


def test_failing_command_raises_step_failed_naming_host_command_and_stderr(web1: HostConnection) -> None:
    with pytest.raises(StepFailed) as caught:
        web1.run("echo first >&2; echo 'disk is full' >&2; exit 4")
    message = str(caught.value)
    assert caught.value.where == "web1"
    assert "web1" in message and "exited with code 4" in message
    assert "echo first" in message  # the command
    assert "disk is full" in message  # the end of stderr
    assert caught.value.hint


def test_environment_reaches_the_command_but_never_its_command_line(
        web1: HostConnection, tmp_path: Path) -> None:
    token = make_secret("token")
    tricky = Secret("it's \"quoted\" $HOME `date`\nsecond line")
    ps_file = tmp_path / "ps.txt"
    command = (f"ps -eo args > {ps_file}; printf %s \"$API_TOKEN\" | sha256sum; "
               "printf %s \"$TRICKY\" | sha256sum; echo \"$PLAIN\"; echo \"$API_TOKEN\"")
    result = web1.run(command, environment={"API_TOKEN": token, "TRICKY": tricky, "PLAIN": "plain value"})

    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == hashlib.sha256(token.reveal().encode()).hexdigest()
    assert lines[1].split()[0] == hashlib.sha256(tricky.reveal().encode()).hexdigest()
    assert lines[2] == "plain value"
    assert lines[3] == "***"  # output is redacted
    processes = ps_file.read_text()
    assert "ps -eo args" in processes  # ps saw the running command...
    assert token.reveal() not in processes  # ...but not the secret


def test_secret_in_stderr_of_a_failing_command_is_masked(web1: HostConnection) -> None:
    token = make_secret()
    with pytest.raises(StepFailed) as caught:
        web1.run("echo \"bad token $TOKEN\" >&2; exit 1", environment={"TOKEN": token})
    assert token.reveal() not in str(caught.value)
    assert "bad token ***" in str(caught.value)


def test_timeout_raises_step_failed(web1: HostConnection) -> None:
    started = time.monotonic()
    with pytest.raises(StepFailed, match="did not finish within"):
        web1.run("sleep 10", timeout=0.5)
    assert time.monotonic() - started < 5
    assert web1.run("echo still usable").stdout == "still usable\n"


# --- files -----------------------------------------------------------------------


def test_read_text_of_a_missing_file_is_none(web1: HostConnection, tmp_path: Path) -> None:
    assert web1.read_text(str(tmp_path / "missing.env")) is None


def test_write_text_atomic_sets_mode_and_keeps_previous(web1: HostConnection, tmp_path: Path) -> None:
    path = tmp_path / "app.env"
    previous = tmp_path / "app.env.prev"
    web1.write_text_atomic(str(path), "A=1\n", keep_previous=str(previous))
    assert path.read_text() == "A=1\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not previous.exists()  # nothing to keep on the first write

    web1.write_text_atomic(str(path), "A=2\n", keep_previous=str(previous))
    assert web1.read_text(str(path)) == "A=2\n"
    assert previous.read_text() == "A=1\n"
    assert stat.S_IMODE(previous.stat().st_mode) == 0o600

    web1.write_text_atomic(str(path), "A=3\n", mode=0o640)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.env", "app.env.prev"]  # no temporaries left


def test_write_text_atomic_into_a_missing_directory_fails_cleanly(web1: HostConnection, tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "app.env"
    with pytest.raises(StepFailed) as caught:
        web1.write_text_atomic(str(target), "A=1\n")
    assert str(target) in str(caught.value) and "web1" in str(caught.value)


# --- HTTP from the host, against the test app ------------------------------------


def start_app(app_host: AppHost, env_text: str) -> None:
    with connect(app_host.host) as connection:
        connection.write_text_atomic(str(app_host.env_file), env_text)
        connection.run(app_host.restart_command, timeout=30)


def test_health_is_200_then_503_with_a_broken_database_url(app_hosts: list[AppHost], postgres_server) -> None:
    web1_app = app_hosts[0]
    start_app(web1_app, f"DATABASE_URL='{postgres_server.url().reveal()}'\n")
    with connect(web1_app.host) as connection:
        status, body = connection.fetch_url(web1_app.health_url)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert connection.fetch_url(web1_app.ready_url)[0] == 200

        wrong_password = make_secret("wrong")
        broken = postgres_server.url().reveal().replace(postgres_server.password.reveal(), wrong_password.reveal())
        first_pid = web1_app.pid()
        start_app(web1_app, f"DATABASE_URL={broken}\n")
        assert web1_app.pid() != first_pid  # really restarted
        status, body = connection.fetch_url(web1_app.health_url)
        assert status == 503
        assert "password authentication failed" in json.loads(body)["reason"]
        log = connection.run(web1_app.log_command).stdout
    assert "GET /api/health 503" in log
    for text in (body, web1_app.app_dir.joinpath("app.log").read_text()):
        assert wrong_password.reveal() not in text
        assert postgres_server.password.reveal() not in text


def test_ready_reports_pending_migrations(app_hosts: list[AppHost], postgres_server, tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    (migrations / "20240101000000_init").mkdir(parents=True)
    database_url = postgres_server.create_database()
    web2_app = app_hosts[1]
    start_app(web2_app, f"DATABASE_URL=\"{database_url.reveal()}\"\nAPP_MIGRATIONS_DIR={migrations}\n")
    with connect(web2_app.host) as connection:
        assert connection.fetch_url(web2_app.health_url)[0] == 200
        status, body = connection.fetch_url(web2_app.ready_url)
    assert status == 503
    assert json.loads(body)["check"] == "migrations" and "20240101000000_init" in body


def test_an_app_that_will_not_start_fails_its_restart(app_hosts: list[AppHost]) -> None:
    app_host = app_hosts[0]
    with connect(app_host.host) as connection:
        connection.write_text_atomic(str(app_host.env_file), "NODE_ENV=production\n")
        with pytest.raises(StepFailed, match="missing required variable DATABASE_URL"):
            connection.run(app_host.restart_command, timeout=30)


def test_fetch_url_reports_status_0_when_nothing_listens(web1: HostConnection) -> None:
    assert web1.fetch_url(f"http://127.0.0.1:{free_port()}/api/health", timeout=5) == (0, "")


def test_python_fallback_of_fetch(web1: HostConnection, app_hosts: list[AppHost], postgres_server) -> None:
    app_host = app_hosts[0]
    start_app(app_host, f"DATABASE_URL={postgres_server.url().reveal()}\n")
    result = web1.run(build_fetch_command(app_host.health_url, 5, prefer_curl=False))
    assert parse_fetch_output(result.stdout) == (200, '{"status": "ok"}')
    missing = web1.run(build_fetch_command(app_host.ready_url.replace("ready", "nope"), 5, prefer_curl=False))
    assert parse_fetch_output(missing.stdout)[0] == 404


# --- connection failures -----------------------------------------------------------


def test_closed_port_raises_connection_failed_naming_the_host(ssh_server: SshServer) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as caught:
        connect(ssh_server.host_config("db-bastion", port=port))
    message = str(caught.value)
    assert "db-bastion" in message and f"127.0.0.1:{port}" in message and ssh_server.user in message
    assert "refused" in message and caught.value.hint
    assert time.monotonic() - started < 5


def test_wrong_key_raises_connection_failed_about_authentication(ssh_server: SshServer, tmp_path: Path) -> None:
    other_key = tmp_path / "other_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    with pytest.raises(ConnectionFailed) as caught:
        connect(ssh_server.host_config("web1", key_filename=str(other_key)))
    message = str(caught.value)
    assert "authentication failed" in message and f"{ssh_server.user}@127.0.0.1" in message
    assert str(other_key) in message and "authorized_keys" in message


def test_missing_key_file_and_unknown_host_key(ssh_server: SshServer, tmp_path: Path) -> None:
    with pytest.raises(ConnectionFailed, match="does not exist"):
        connect(ssh_server.host_config("web1", key_filename=str(tmp_path / "nope")))
    with pytest.raises(ConnectionFailed, match="known_hosts"):
        connect(ssh_server.host_config("web1", strict_host_keys=True, known_hosts=str(tmp_path / "known_hosts")))


def test_non_ssh_port_raises_connection_failed(ssh_server: SshServer) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        listener.settimeout(5)

        def answer_and_close() -> None:
            conn, _ = listener.accept()
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

        thread = threading.Thread(target=answer_and_close)
        thread.start()
        with pytest.raises(ConnectionFailed, match="SSH"):
            connect(ssh_server.host_config("web1", port=port))
        thread.join()


def test_run_on_hosts_returns_each_hosts_result_or_error(ssh_server: SshServer) -> None:
    hosts = [ssh_server.host_config("web1"), ssh_server.host_config("web2", port=free_port())]
    results = run_on_hosts(hosts, lambda connection: connection.run("echo up").stdout.strip())
    assert results[0] == (hosts[0], "up")
    assert results[1][0] == hosts[1] and isinstance(results[1][1], ConnectionFailed)
    assert "web2" in str(results[1][1])


def test_ready_fails_on_storage_once_its_key_is_revoked(app_hosts: list[AppHost], postgres_server,
                                                         s3_server) -> None:
    bucket = s3_server.make_bucket()
    key_id, key_secret = s3_server.create_access_key()
    app_host = app_hosts[0]
    start_app(app_host, "\n".join([
        f"DATABASE_URL={postgres_server.url().reveal()}", f"S3_ENDPOINT={s3_server.endpoint}",
        f"S3_BUCKET={bucket.bucket}", f"S3_ACCESS_KEY_ID={key_id}",
        f"S3_SECRET_ACCESS_KEY={key_secret.reveal()}", f"S3_REGION={s3_server.region}", ""]))
    with connect(app_host.host) as connection, s3_server.enforce_auth():
        assert connection.fetch_url(app_host.ready_url)[0] == 200
        s3_server.delete_access_key(key_id, using=(key_id, key_secret))
        status, body = connection.fetch_url(app_host.ready_url)
    assert status == 503 and json.loads(body)["check"] == "storage"
    assert key_secret.reveal() not in body + app_host.app_dir.joinpath("app.log").read_text()
