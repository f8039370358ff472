"""The database host over SSH (`pitr.host`): its command lines (pure), and how the inventory names the host."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from ops import inventory, pitr_host, pitr_ssh
from ops.errors import CheckFailed, InventoryError

SECRET = "unit-test-secret-value-456"


def test_a_file_is_written_from_stdin_0600_from_the_start_and_renamed_and_its_content_is_never_on_the_line(
        tmp_path):
    target = tmp_path / "conf" / "credentials.env"
    command = pitr_ssh.write_command(target, 0o600, "deploy", "deploy")
    assert SECRET not in command and "chown" not in command, "not root: the files are ours, the server's user's"
    assert "chown postgres: " in pitr_ssh.write_command(target, 0o600, "root", "postgres")
    text = f"AWS_SECRET_ACCESS_KEY={SECRET}\n\n"  # trailing newlines kept
    subprocess.run(["sh", "-c", command], env={"PATH": "/usr/bin:/bin", pitr_ssh.CONTENT_VARIABLE: text}, check=True)
    assert target.read_text() == text and target.stat().st_mode & 0o777 == 0o600
    assert target.parent.stat().st_mode & 0o777 == 0o700 and not list(target.parent.glob("*.tmp"))
    fingerprint = subprocess.run(["sh", "-c", pitr_ssh.fingerprint_command(target)], capture_output=True,
                                 text=True, check=True).stdout
    assert fingerprint.split()[0] == pitr_ssh.digest(text) and SECRET not in fingerprint
    assert subprocess.run(["sh", "-c", pitr_ssh.fingerprint_command(tmp_path / "none")], capture_output=True,
                          text=True, check=True).stdout == ""


def test_the_data_directory_command_prints_the_version_and_the_real_path(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "PG_VERSION").write_text("15\n")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    printed = subprocess.run(["sh", "-c", pitr_ssh.data_dir_command(tmp_path / "link")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert printed == ["15", str((tmp_path / "data").resolve())]
    assert subprocess.run(["sh", "-c", pitr_ssh.data_dir_command(tmp_path)], capture_output=True, text=True,
                          check=True).stdout == ""


def test_the_temporary_folder_command_prints_what_was_left_and_leaves_it_empty_and_private(tmp_path):
    folder = tmp_path / "opsbook-pitr-prod" / "tmp"
    (folder / "barman-cloud-backup-x1").mkdir(parents=True)
    (folder / "barman-cloud-backup-x1" / "part.tar").write_text("data")
    command = pitr_ssh.empty_folder_command(folder, "deploy", "deploy")
    assert "chown" not in command and "chown postgres: " in pitr_ssh.empty_folder_command(folder, "root", "postgres")
    printed = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.split()
    assert printed == ["barman-cloud-backup-x1"] and list(folder.iterdir()) == []
    assert folder.stat().st_mode & 0o777 == 0o700
    again = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    assert again == "" and folder.is_dir()


def test_commands_run_as_the_server_user_through_runuser_only_when_logged_in_as_root():
    assert pitr_ssh.as_user(["barman-cloud-backup", "s3://b/p"], "root", "postgres") == \
        "runuser -u postgres -- barman-cloud-backup s3://b/p"
    assert pitr_ssh.as_user(["barman-cloud-backup"], "postgres", "postgres") == "barman-cloud-backup"
    assert pitr_ssh.as_user(["barman-cloud-backup-delete"], "root", None) == "barman-cloud-backup-delete"
    restart = pitr_ssh.pg_ctl_restart_command(Path("/var/lib/postgresql/15/main"), 15, Path("/etc/x/pg.log"), 120,
                                              None, "root", "postgres")
    assert restart.startswith("bin=/usr/lib/postgresql/15/bin;")
    assert restart.endswith('runuser -u postgres -- "$bin/pg_ctl" restart -D /var/lib/postgresql/15/main -m fast '
                            "-w -t 120 -l /etc/x/pg.log")
    assert shlex.split(pitr_ssh.pg_ctl_restart_command(Path("/d"), 16, Path("/l"), 5, Path("/opt/pg/bin"),
                                                       "postgres", "postgres"))[0] == "bin=/opt/pg/bin;"


def load_env(tmp_path: Path, pitr: dict, backups_provider: str = "s3") -> inventory.Environment:
    backups = ({"provider": "s3", "bucket": "b", "endpoint": "http://127.0.0.1:9"} if backups_provider == "s3"
               else {"provider": "local", "bucket": "b", "path": str(tmp_path / "b")})
    data = {"project": "p", "envs": {"prod": {
        "database": {"url": "postgresql://app@db.internal/shop"}, "backups": backups,
        "ssh": {"user": "root", "port": 2222}, "hosts": [{"name": "web1", "address": "10.0.0.1"},
                                                         {"name": "db1", "address": "10.0.0.2"}],
        "pitr": {"data_dir": "/var/lib/postgresql/15/main", **pitr}}}}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    return inventory.load(path).environment("prod")


def test_pitr_host_names_a_host_of_the_environment_or_gives_an_address(tmp_path):
    named = pitr_host.database_host(load_env(tmp_path, {"host": "db1"}))
    assert (named.ssh.name, named.ssh.address, named.ssh.port, named.os_user) == ("db1", "10.0.0.2", 2222, "postgres")
    assert named.where == "host db1 (root@10.0.0.2:2222)"
    given = pitr_host.database_host(load_env(tmp_path, {"host": {"address": "10.0.0.9", "user": "postgres"}}))
    assert (given.ssh.name, given.ssh.target, given.os_user) == ("database", "postgres@10.0.0.9:2222", "postgres")
    assert isinstance(pitr_host.machine_of(given), pitr_ssh.SshMachine)
    assert isinstance(pitr_host.machine_of(pitr_host.database_host(load_env(tmp_path, {}))), pitr_host.LocalMachine)


def test_an_unknown_host_name_and_a_folder_backup_storage_are_refused(tmp_path):
    with pytest.raises(InventoryError, match=r"pitr.host: 'db9' is not one of prod's hosts \(web1, db1\)") as error:
        pitr_host.database_host(load_env(tmp_path, {"host": "db9"}))
    assert error.value.exit_code == 2
    with pytest.raises(CheckFailed, match="cannot archive into it"):
        pitr_host.database_host(load_env(tmp_path, {"host": "db1"}, backups_provider="local"))
    with pytest.raises(InventoryError):
        load_env(tmp_path, {"host": {"user": "postgres"}})  # an address is required
