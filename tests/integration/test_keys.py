"""keys.rotate, keys.status and secrets.rotate through the real CLI: moto (IAM + S3 with credentials
enforced), the fake Cloudflare token API, sshd hosts running the test app, real PostgreSQL."""

from __future__ import annotations

import shlex
import signal
import subprocess
import uuid
from typing import Any

import pytest

from ops import inventory
from ops.envfile import parse_env_file, render_env_file
from ops.keys import verify_admin_password
from ops.secret_store import SecretStore
from ops.secrets import Secret
from tests.cli import Opsbook, http_status, wait_for
from tests.fixtures.s3 import iam_keys, refused
from tests.fixtures.secrets import stored

STEPS = ["create-key", "probe-key", "store-key", "push-env-web1", "push-env-web2", "restart", "confirm-apps",
         "revoke-old-key", "record-rotation"]


def host_entry(host: Any) -> dict[str, Any]:
    return {"name": host.name, "address": "127.0.0.1", "user": host.host.user, "port": host.host.port,
            "key_file": host.host.key_filename,
            "app": {"dir": str(host.app_dir), "env_file": str(host.env_file), "restart": host.restart_command,
                    "health_url": host.health_url, "ready_url": host.ready_url, "health_timeout": 15}}


def write_inventory(opsbook: Opsbook, postgres: Any, s3: Any, hosts: list[Any], keys: dict[str, Any],
                    key_id: str, secret: Secret) -> dict[str, str]:
    buckets = {"assets": f"assets-{uuid.uuid4().hex[:8]}", "backups": f"backups-{uuid.uuid4().hex[:8]}"}
    for bucket in buckets.values():
        s3.client().create_bucket(Bucket=bucket)
    opsbook.environ.update({"DATABASE_URL": postgres.url().reveal(), "S3_KEY_ID": key_id,
                            "S3_SECRET": secret.reveal()})
    opsbook.write_inventory({"project": "keystest", "default_env": "staging", "envs": {"staging": {
        "database": {"url": "${env:DATABASE_URL}"},
        "storage": {"provider": "s3", "endpoint": s3.endpoint, "region": "us-east-1", "bucket": buckets["assets"],
                    "access_key_id": "${env:S3_KEY_ID}", "secret_access_key": "${env:S3_SECRET}"},
        "backups": {"bucket": buckets["backups"], "prefix": "staging/"},
        "keys": {**keys, "probe_timeout": 2},
        "hosts": [host_entry(host) for host in hosts],
    }}})
    return buckets


def start_apps(opsbook: Opsbook, hosts: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The apps run with the old key before the rotation, as in production."""
    for name, value in {**opsbook.environ, "OPS_HOME": str(opsbook.state_dir)}.items():
        monkeypatch.setenv(name, value)
    env = inventory.load(opsbook.inventory).environment("staging")
    for host in hosts:
        host.env_file.write_text(render_env_file(env, host.name))
        host.env_file.chmod(0o600)
        subprocess.run(shlex.split(host.restart_command), check=True, capture_output=True, timeout=30)


def ready(host: Any) -> int:
    return http_status(host.ready_url)


def env_file_key(host: Any) -> tuple[str | None, str | None]:
    values = parse_env_file(host.env_file.read_text())
    return values.get("S3_ACCESS_KEY_ID"), values.get("S3_SECRET_ACCESS_KEY")


def assert_rotated(opsbook: Opsbook, s3: Any, bucket: str, hosts: list[Any], old: tuple[str, Secret]) -> str:
    """Exactly one working key, the one the secret store and every app use; the old one refused."""
    secrets = stored(opsbook)
    new_id, new_secret = secrets["STORAGE_ACCESS_KEY_ID"], Secret(secrets["STORAGE_SECRET_ACCESS_KEY"])
    assert new_id != old[0]
    assert not any(k.startswith(("STORAGE_NEXT", "STORAGE_PREVIOUS")) for k in secrets), secrets
    assert refused(s3, bucket, new_id, new_secret) is None
    assert refused(s3, bucket, *old) == "InvalidAccessKeyId"
    for host in hosts:
        assert env_file_key(host) == (new_id, new_secret.reveal()), host.name
        assert ready(host) == 200, host.name
    return new_id


@pytest.fixture
def iam_rotation(opsbook, postgres_server, s3_server, app_host_factory, monkeypatch):
    user = f"app-{uuid.uuid4().hex[:8]}"
    old = s3_server.create_access_key(user)
    hosts = app_host_factory(("web1", "web2"))
    buckets = write_inventory(opsbook, postgres_server, s3_server, hosts, {"provider": "aws-iam", "iam_user": user},
                              *old)
    with s3_server.enforce_auth():
        start_apps(opsbook, hosts, monkeypatch)
        yield {"user": user, "old": old, "hosts": hosts, **buckets}


def new_journal(opsbook: Opsbook, interrupted: list[tuple[str, str]]) -> str | None:
    """The run that is not one of those already interrupted (the first has none before it)."""
    seen = {run for run, _ in interrupted}
    fresh = [path.stem for path in opsbook.journals()
             if path.stem not in seen and path.stat().st_size and not opsbook.journal(path.stem)[0]["dry_run"]]
    return fresh[0] if len(fresh) == 1 else None


def first_applied(opsbook: Opsbook, run_id: str) -> str | None:
    return next((e["step"] for e in opsbook.journal(run_id) if e.get("state") == "applied"), None)


def test_aws_iam_rotation_interrupted_after_each_step_in_turn(opsbook, iam_rotation, s3_server):
    """One process per step: each run is killed (SIGKILL or SIGINT) as soon as it applied a step, and the
    next one resumes it; the rotation ends with exactly one working key, the one every app uses."""
    old, hosts, assets = iam_rotation["old"], iam_rotation["hosts"], iam_rotation["assets"]
    dry = opsbook.run("keys.rotate", "--dry-run")
    assert dry.exit_code == 0, dry
    assert "would create a new aws-iam key" in dry.stderr and "would revoke the old key" in dry.stderr
    assert iam_keys(s3_server, iam_rotation["user"], old) == [old[0]] and not stored(opsbook)

    process, interrupted = opsbook.start("keys.rotate"), []
    while True:
        run_id = wait_for(lambda p=process: new_journal(opsbook, interrupted) or p.poll() is not None,
                          what="the run's journal")
        assert run_id is not True, (interrupted, opsbook.collect(process))
        step = wait_for(lambda r=run_id, p=process: first_applied(opsbook, r) or p.poll() is not None,
                        timeout=90, what="a step applied")
        process.send_signal(signal.SIGKILL if len(interrupted) % 2 == 0 else signal.SIGINT)
        result = opsbook.collect(process)
        if opsbook.journal(run_id)[-1].get("status") == "succeeded":
            break  # the last step finished before the signal landed
        assert result.exit_code in (-signal.SIGKILL, 130), result
        interrupted.append((run_id, step))
        for host in hosts:  # at every point, what the apps hold works: the old key goes only at the end
            key_id, secret = env_file_key(host)
            assert refused(s3_server, assets, key_id, Secret(secret)) is None
        process = opsbook.start("runs.resume", run_id)
    steps = [step for _, step in interrupted]
    # Each run was stopped at a later step than the one before (resume makes progress, never repeats).
    # Which steps are hit depends on when the signal lands: fast steps can finish before it does,
    # so only a spread of them is required; every stop above was checked whichever it was.
    positions = [STEPS.index(step) for step in steps]
    assert positions == sorted(set(positions)) and len(positions) >= 4, steps

    new_id = assert_rotated(opsbook, s3_server, assets, hosts, old)
    new = (new_id, Secret(stored(opsbook)["STORAGE_SECRET_ACCESS_KEY"]))
    assert iam_keys(s3_server, iam_rotation["user"], new) == [new_id]
    # recorded here and in the backup bucket, key ids masked
    client = s3_server.client(access_key_id=new[0], secret_access_key=new[1])
    record = client.get_object(Bucket=iam_rotation["backups"], Key="staging/keys/rotations.json")["Body"].read()
    assert new_id[-4:] in record.decode() and new_id not in record.decode()
    status = opsbook.run("keys.status", "--json")
    assert status.exit_code == 0, status
    assert status.json()["last_rotation"] and status.json()["age_days"] == 0 and not status.json()["overdue"]
    produced = opsbook.everything_produced()
    assert old[1].reveal() not in produced and new[1].reveal() not in produced


def test_cloudflare_rotation_against_the_fake_api(opsbook, postgres_server, s3_server, cloudflare_api,
                                                  app_host_factory, monkeypatch):
    account = cloudflare_api.new_account()
    hosts = app_host_factory(("web1",))
    buckets = write_inventory(opsbook, postgres_server, s3_server, hosts, {
        "provider": "cloudflare", "account_id": account.account_id, "api_token": "${env:CLOUDFLARE_API_TOKEN}",
        "api_base": cloudflare_api.base_url}, account.r2_key_id, account.r2_secret)
    opsbook.environ["CLOUDFLARE_API_TOKEN"] = account.api_token.reveal()
    old = (account.r2_key_id, account.r2_secret)
    with s3_server.enforce_auth():
        start_apps(opsbook, hosts, monkeypatch)
        rotated = opsbook.run("keys.rotate")
        assert rotated.exit_code == 0, rotated
        new_id = assert_rotated(opsbook, s3_server, buckets["assets"], hosts, old)

    live = cloudflare_api.live_r2_tokens(account.account_id)
    assert [t.id for t in live] == [new_id]
    # R2's S3 secret is sha256 of the token value, which the API showed only once
    assert env_file_key(hosts[0])[1] == cloudflare_api.r2_secret_of(account.account_id, new_id)
    assert [{k: v for k, v in p.items() if k != "id"} for p in live[0].policies] == \
        [{k: v for k, v in p.items() if k != "id"} for p in account.r2_policies]
    calls = cloudflare_api.calls(account.account_id)
    create = calls.index("POST /tokens")
    assert f"GET /tokens/{old[0]}" in calls[:create]  # the current policies, read first
    assert calls[-1] == f"DELETE /tokens/{old[0]}" or calls.index(f"DELETE /tokens/{old[0]}") > create
    assert [c for c in calls if c.startswith("DELETE")] == [f"DELETE /tokens/{old[0]}"]
    produced = opsbook.everything_produced()
    assert account.api_token.reveal() not in produced and old[1].reveal() not in produced


def test_new_key_that_fails_its_probe_is_deleted_and_the_old_one_kept(opsbook, postgres_server, s3_server,
                                                                      cloudflare_api):
    # A token whose S3 credentials R2 does not know (no R2 permission): refused by the storage.
    account = cloudflare_api.new_account()
    cloudflare_api.registers_s3[account.account_id] = False
    write_inventory(opsbook, postgres_server, s3_server, [], {
        "provider": "cloudflare", "account_id": account.account_id, "api_token": "${env:CLOUDFLARE_API_TOKEN}",
        "api_base": cloudflare_api.base_url}, account.r2_key_id, account.r2_secret)
    opsbook.environ["CLOUDFLARE_API_TOKEN"] = account.api_token.reveal()
    with s3_server.enforce_auth():
        failed = opsbook.run("keys.rotate")
    assert failed.exit_code == 1, failed
    assert "failed its probe" in failed.stderr and "was deleted" in failed.stderr
    assert [t.id for t in cloudflare_api.live_r2_tokens(account.account_id)] == [account.r2_key_id]
    assert cloudflare_api.calls(account.account_id)[-1].startswith("DELETE /tokens/")
    assert not stored(opsbook)  # the secret store still has nothing: the inventory's key is in use


def test_secrets_rotate_admin_password_and_auth_secret(opsbook, postgres_server, s3_server, app_host_factory,
                                                       monkeypatch):
    hosts = app_host_factory(("web1",))
    write_inventory(opsbook, postgres_server, s3_server, hosts, {"provider": "static"}, s3_server.access_key_id,
                    s3_server.secret_access_key)
    start_apps(opsbook, hosts, monkeypatch)
    pid = hosts[0].pid()

    rotated = opsbook.run("secrets.rotate", "--name", "ADMIN_PASSWORD")
    assert rotated.exit_code == 0, rotated
    password = rotated.stderr.split("password manager):", 1)[1].split()[0]
    values = parse_env_file(hosts[0].env_file.read_text())
    assert values["ADMIN_PASSWORD_HASH"].startswith("scrypt$n=16384,r=8,p=1$")
    assert verify_admin_password(Secret(password), values["ADMIN_PASSWORD_HASH"])
    assert hosts[0].pid() != pid and ready(hosts[0]) == 200
    assert rotated.stderr.count(password) == 1
    assert password not in "\n".join(p.read_text() for p in opsbook.state_dir.rglob("*") if p.is_file())

    auth = opsbook.run("secrets.rotate", "--name", "NEXTAUTH_SECRET")
    assert auth.exit_code == 0, auth
    values = parse_env_file(hosts[0].env_file.read_text())
    assert len(values["AUTH_SECRET"]) >= 32
    assert values["AUTH_SECRET"] == values["NEXTAUTH_SECRET"] == values["BETTER_AUTH_SECRET"]
    assert values["AUTH_SECRET"] not in opsbook.everything_produced()
    assert verify_admin_password(Secret(password), values["ADMIN_PASSWORD_HASH"])  # untouched


def cloudflare_env(opsbook: Opsbook, postgres: Any, s3: Any, cloudflare: Any, **restrictions: Any) -> Any:
    """An environment without hosts whose storage key is an R2 token of a new account on the fake API."""
    account = cloudflare.new_account(**restrictions)
    account.buckets = write_inventory(opsbook, postgres, s3, [], {
        "provider": "cloudflare", "account_id": account.account_id, "api_token": "${env:CLOUDFLARE_API_TOKEN}",
        "api_base": cloudflare.base_url}, account.r2_key_id, account.r2_secret)
    opsbook.environ["CLOUDFLARE_API_TOKEN"] = account.api_token.reveal()
    return account


def cloudflare_time(days: int) -> str:
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_cloudflare_rotation_never_widens_the_token(opsbook, postgres_server, s3_server, cloudflare_api):
    """The new token gets the old one's client IP filter and lifetime, not only its policies."""
    condition = {"request_ip": {"in": ["127.0.0.1/32", "10.0.0.0/8"], "not_in": ["10.9.0.0/16"]}}
    lifetime = {"not_before": cloudflare_time(-30), "expires_on": cloudflare_time(200)}
    account = cloudflare_env(opsbook, postgres_server, s3_server, cloudflare_api, condition=condition, **lifetime)
    with s3_server.enforce_auth():
        dry = opsbook.run("keys.rotate", "--dry-run")
        assert dry.exit_code == 0, dry
        assert "client IP filter" in dry.stderr and lifetime["expires_on"] in dry.stderr, dry
        rotated = opsbook.run("keys.rotate")
        assert rotated.exit_code == 0, rotated
    [new] = cloudflare_api.live_r2_tokens(account.account_id)
    assert new.id != account.r2_key_id
    assert (new.condition, new.not_before, new.expires_on) == (condition, lifetime["not_before"],
                                                               lifetime["expires_on"])


def test_cloudflare_refused_admin_token_is_a_failed_precondition(opsbook, postgres_server, s3_server,
                                                                cloudflare_api):
    account = cloudflare_env(opsbook, postgres_server, s3_server, cloudflare_api)
    opsbook.environ["CLOUDFLARE_API_TOKEN"] = "a-token-cloudflare-does-not-know"
    with s3_server.enforce_auth():
        dry = opsbook.run("keys.rotate", "--dry-run")
        real = opsbook.run("keys.rotate")
    for result in (dry, real):
        assert result.exit_code == 3, result
        assert "Cloudflare refused keys.api_token" in result.stderr and "Traceback" not in result.output, result
    assert not any(call.startswith("POST") for call in cloudflare_api.calls(account.account_id))
    assert [t.id for t in cloudflare_api.live_r2_tokens(account.account_id)] == [account.r2_key_id]
    assert not stored(opsbook)


def test_cloudflare_failed_revocation_says_the_new_key_stays(opsbook, postgres_server, s3_server, cloudflare_api):
    account = cloudflare_env(opsbook, postgres_server, s3_server, cloudflare_api)
    old = (account.r2_key_id, account.r2_secret)
    cloudflare_api.fail_deletes.add(old[0])
    with s3_server.enforce_auth():
        failed = opsbook.run("keys.rotate")
        assert failed.exit_code == 1, failed
        assert "undone" not in failed.stderr, failed
        assert "could not revoke the old key" in failed.stderr and "stays" in failed.stderr, failed
        journal = opsbook.journal(opsbook.latest_run_id())
        states = {(e["step"], e["state"]) for e in journal if e["event"] == "step"}
        assert ("create-key", "kept") in states and ("create-key", "undone") not in states, states
        new_id = stored(opsbook)["STORAGE_ACCESS_KEY_ID"]
        assert sorted(t.id for t in cloudflare_api.live_r2_tokens(account.account_id)) == sorted([old[0], new_id])
        assert refused(s3_server, account.buckets["assets"], *old) is None  # revoked only by the next run

        cloudflare_api.fail_deletes.discard(old[0])
        again = opsbook.run("keys.rotate")
        assert again.exit_code == 0, again
        assert [t.id for t in cloudflare_api.live_r2_tokens(account.account_id)] == [new_id]
        assert not any(k.startswith(("STORAGE_NEXT", "STORAGE_PREVIOUS")) for k in stored(opsbook))
    produced = opsbook.everything_produced()
    assert account.api_token.reveal() not in produced and old[1].reveal() not in produced


def test_first_rotation_makes_room_by_revoking_the_replaced_inventory_key(opsbook, postgres_server, s3_server,
                                                                          app_host_factory, monkeypatch):
    """As provision used to leave it: the secret store's key in use everywhere, and the inventory's key of the
    same IAM user still active and used. The rotation revokes that one to make room, never the key in use."""
    user = f"app-{uuid.uuid4().hex[:8]}"
    bootstrap = s3_server.create_access_key(user)
    auditor = s3_server.create_access_key()
    hosts = app_host_factory(("web1",))
    buckets = write_inventory(opsbook, postgres_server, s3_server, hosts, {"provider": "aws-iam", "iam_user": user},
                              *bootstrap)
    made = s3_server.client("iam").create_access_key(UserName=user)["AccessKey"]
    in_use = (made["AccessKeyId"], Secret(made["SecretAccessKey"]))
    SecretStore(opsbook.state_dir, "staging").update({"STORAGE_ACCESS_KEY_ID": Secret(in_use[0]),
                                                      "STORAGE_SECRET_ACCESS_KEY": in_use[1]})
    with s3_server.enforce_auth():
        start_apps(opsbook, hosts, monkeypatch)
        assert env_file_key(hosts[0])[0] == in_use[0]
        assert refused(s3_server, buckets["assets"], *bootstrap) is None  # active, and now used
        dry = opsbook.run("keys.rotate", "--dry-run")
        assert dry.exit_code == 0, dry
        assert "the inventory's key, replaced by the secret store's" in dry.stderr, dry
        rotated = opsbook.run("keys.rotate")
        assert rotated.exit_code == 0, rotated
        new_id = assert_rotated(opsbook, s3_server, buckets["assets"], hosts, in_use)
        assert refused(s3_server, buckets["assets"], *bootstrap) == "InvalidAccessKeyId"
        assert iam_keys(s3_server, user, auditor) == [new_id]


def test_provision_with_cloudflare_leaves_the_token_it_made(opsbook, postgres_server, s3_server, cloudflare_api):
    """The token provision makes replaces the inventory's: same policies, IP filter and lifetime; one left."""
    condition, expires = {"request_ip": {"in": ["127.0.0.1/32"]}}, cloudflare_time(100)
    account = cloudflare_env(opsbook, postgres_server, s3_server, cloudflare_api, condition=condition,
                             expires_on=expires)
    with s3_server.enforce_auth():
        provisioned = opsbook.run("provision")
        assert provisioned.exit_code == 0, provisioned
        [token] = cloudflare_api.live_r2_tokens(account.account_id)
        assert token.id == stored(opsbook)["STORAGE_ACCESS_KEY_ID"] != account.r2_key_id
        assert (token.condition, token.expires_on) == (condition, expires)
        assert refused(s3_server, account.buckets["assets"], account.r2_key_id, account.r2_secret) == \
            "InvalidAccessKeyId"
