"""Host keys through the real CLI, against an sshd of the test's own whose host key can change:
a key is recorded on first contact (OpenSSH's accept-new), a changed key is refused before anything is
pushed, `inv hosts.forget` accepts a legitimate change, and `strict_host_keys` wants the key beforehand."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli import Opsbook
from tests.fixtures.ssh import SshServer, free_port, make_key, start_sshd, stop_sshd


def fingerprint(public_key: Path) -> str:
    """SHA256:… as `ssh-keygen -l` shows it."""
    listed = subprocess.run(["ssh-keygen", "-lf", str(public_key)], check=True, capture_output=True, text=True)
    return listed.stdout.split()[1]


def known_line(port: int, public_key: Path) -> str:
    key_type, blob = public_key.read_text().split()[:2]
    return f"[127.0.0.1]:{port} {key_type} {blob}"


class RebuiltHost:
    """An sshd on a fixed port of its own; `rebuild()` restarts it with a newly generated host key."""

    def __init__(self, directory: Path, server: SshServer):
        self.directory = directory
        self.port = free_port()
        self.authorized_keys = directory / "authorized_keys"
        self.authorized_keys.write_text(Path(f"{server.key_filename}.pub").read_text())
        self.generation = 0
        self.process: subprocess.Popen | None = None
        self.rebuild()

    @property
    def public_key(self) -> Path:
        return self.directory / f"host_{self.generation}.pub"

    def rebuild(self) -> None:
        self.stop()
        self.generation += 1
        host_key = make_key(self.directory / f"host_{self.generation}")
        self.process = start_sshd(self.directory, self.port, host_key, self.authorized_keys)

    def stop(self) -> None:
        if self.process is not None:
            stop_sshd(self.process)
            self.process = None


@pytest.fixture
def rebuilt_host(tmp_path: Path, ssh_server: SshServer) -> Iterator[RebuiltHost]:
    directory = tmp_path / "sshd"
    directory.mkdir()
    host = RebuiltHost(directory, ssh_server)
    yield host
    host.stop()


@pytest.fixture
def keyed_env(opsbook: Opsbook, rebuilt_host: RebuiltHost, ssh_server: SshServer, postgres_server: Any,
              tmp_path: Path) -> Any:
    """write(**ssh) -> `staging` with one app host, web1, on the rebuilt host; returns its env file."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    opsbook.environ["APP_DATABASE_URL"] = postgres_server.create_database().reveal()

    def write(**ssh: Any) -> Path:
        opsbook.write_inventory({"project": "hostkeys", "default_env": "staging", "envs": {"staging": {
            "database": {"url": "${env:APP_DATABASE_URL}"},
            "ssh": {"user": ssh_server.user, "key_file": ssh_server.key_filename, **ssh},
            "hosts": [{"name": "web1", "address": "127.0.0.1", "port": rebuilt_host.port}],
            "app": {"dir": str(app_dir), "env_file": str(app_dir / ".env")},
        }}})
        return app_dir / ".env"

    return write


def test_first_contact_is_recorded_a_changed_key_refused_until_forgotten(
        opsbook: Opsbook, keyed_env: Any, rebuilt_host: RebuiltHost) -> None:
    env_file = keyed_env()
    known_hosts = opsbook.state_dir / "known_hosts"
    first_key = rebuilt_host.public_key

    first = opsbook.run("deploy.push-env")
    assert first.exit_code == 0, first
    assert env_file.exists()
    assert known_hosts.read_text().splitlines() == [known_line(rebuilt_host.port, first_key)]
    assert fingerprint(first_key) in first.stderr and "web1" in first.stderr, first  # "recorded …"

    again = opsbook.run("deploy.push-env")
    assert again.exit_code == 0 and fingerprint(first_key) not in again.stderr, again

    rebuilt_host.rebuild()  # same address and port, a new host key: a rebuilt host, or someone in between
    env_file.unlink()
    refused = opsbook.run("deploy.push-env")
    assert refused.exit_code in (1, 3), refused
    assert not env_file.exists()  # nothing was pushed
    message = refused.stderr
    assert "web1" in message and f"127.0.0.1:{rebuilt_host.port}" in message, message
    assert fingerprint(first_key) in message and fingerprint(rebuilt_host.public_key) in message, message
    assert "inv hosts.forget --env staging --host web1" in message and str(known_hosts) in message, message
    assert "Traceback" not in refused.output
    assert known_hosts.read_text().splitlines() == [known_line(rebuilt_host.port, first_key)]

    unknown = opsbook.run("hosts.forget", "--env", "staging", "--host", "web9")
    assert unknown.exit_code == 2 and "web1" in unknown.stderr, unknown

    forgotten = opsbook.run("hosts.forget", "--env", "staging", "--host", "web1")
    assert forgotten.exit_code == 0, forgotten
    assert fingerprint(first_key) in forgotten.stderr, forgotten
    assert known_hosts.read_text().strip() == ""

    accepted = opsbook.run("deploy.push-env")
    assert accepted.exit_code == 0, accepted
    assert env_file.exists()
    assert known_hosts.read_text().splitlines() == [known_line(rebuilt_host.port, rebuilt_host.public_key)]


def test_strict_host_keys_needs_the_key_beforehand_in_either_known_hosts_file(
        opsbook: Opsbook, keyed_env: Any, rebuilt_host: RebuiltHost, tmp_path: Path) -> None:
    keyed_env(strict_host_keys=True)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    opsbook.environ["HOME"] = str(home)
    known_hosts = opsbook.state_dir / "known_hosts"

    refused = opsbook.run("deploy.push-env")
    assert refused.exit_code in (1, 3), refused
    assert "web1" in refused.stderr and "strict_host_keys" in refused.stderr, refused
    assert fingerprint(rebuilt_host.public_key) in refused.stderr, refused  # what to verify out of band
    assert not known_hosts.exists() or known_hosts.read_text().strip() == ""

    # The operator's own ~/.ssh/known_hosts is honoured ...
    (home / ".ssh" / "known_hosts").write_text(known_line(rebuilt_host.port, rebuilt_host.public_key) + "\n")
    from_home = opsbook.run("deploy.push-env")
    assert from_home.exit_code == 0, from_home

    # ... and so is opsbook's file; a changed key in ~/.ssh/known_hosts is refused, naming that file.
    (home / ".ssh" / "known_hosts").unlink()
    known_hosts.write_text(known_line(rebuilt_host.port, rebuilt_host.public_key) + "\n")
    from_opsbook = opsbook.run("deploy.push-env")
    assert from_opsbook.exit_code == 0, from_opsbook

    old_key = rebuilt_host.public_key
    rebuilt_host.rebuild()
    (home / ".ssh" / "known_hosts").write_text(known_line(rebuilt_host.port, old_key) + "\n")
    changed = opsbook.run("deploy.push-env")
    assert changed.exit_code in (1, 3), changed
    assert str(home / ".ssh" / "known_hosts") in changed.stderr and fingerprint(old_key) in changed.stderr, changed
