"""Preflight against real PostgreSQL, moto S3 (and IAM), an sshd app host and a local public site.

One ready environment; each check is broken in place, must fail, and is repaired.
The pure rules (TLS, pooler, auth secret, headers) are table-tested on their own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from ops import inventory
from ops.backup_manifest import verification_key
from ops.checks import Warn
from ops.clock import iso_z
from ops.errors import OpsError
from ops.storage import open_storage
from runbooks import preflight
from tests.fixtures.backups import store_backup, verify
from tests.fixtures.shop import DEMO_MIGRATIONS

AUTH_SECRET = "a-long-enough-auth-secret-of-48-characters-012345"
LIFECYCLE = {"Rules": [{"ID": "abort", "Status": "Enabled", "Filter": {"Prefix": ""},
                        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7}}]}
SECURE_HEADERS = {"Strict-Transport-Security": "max-age=63072000; includeSubDomains",
                  "Content-Security-Policy": "default-src 'self'"}


# --- pure rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "problem"), [
    ("postgresql://app@127.0.0.1:5432/shop", None),
    ("postgresql://app@localhost/shop", None),
    ("postgresql://app@db.example.com/shop?sslmode=require", None),
    ("postgresql://app@db.example.com/shop?sslmode=verify-full&x=1", None),
    ("postgresql://app@db.example.com/shop", "no sslmode"),
    ("postgresql://app@db.example.com/shop?sslmode=prefer", "sslmode=prefer"),
    ("postgresql://app@db.example.com/shop?sslmode=disable", "sslmode=disable"),
])
def test_tls_rule(url, problem):
    found = preflight.tls_problem(url)
    assert (found is None) if problem is None else (problem in found)


@pytest.mark.parametrize(("url", "direct", "problems"), [
    ("postgresql://app@db.example.com:5432/shop", None, []),  # not pooled
    ("postgresql://app@db.example.com:6432/shop?pgbouncer=true", "postgresql://app@db.example.com:5432/shop", []),
    ("postgresql://app@db.example.com:6432/shop", "postgresql://app@db.example.com:5432/shop", ["pgbouncer=true"]),
    ("postgresql://app@ep-x-pooler.example.com/shop?pgbouncer=true", None, ["direct_url"]),
    ("postgresql://app@pool.example.com:5432/shop", None, ["pgbouncer=true", "direct_url"]),
    ("postgresql://app@a.example.com:5432/shop", "postgresql://app@b.example.com:5432/shop", ["pgbouncer=true"]),
])
def test_pooler_rule(url, direct, problems):
    found = preflight.pooler_problems(url, direct)
    assert len(found) == len(problems) and all(word in line for word, line in zip(problems, found, strict=True))


@pytest.mark.parametrize(("values", "problem"), [
    ({"NEXTAUTH_SECRET": "x" * 32}, None),
    ({"BETTER_AUTH_SECRET": "x" * 64}, None),
    ({"NEXTAUTH_SECRET": "x" * 31}, "NEXTAUTH_SECRET has 31"),
    ({"NEXTAUTH_SECRET": "x" * 40, "BETTER_AUTH_SECRET": "short"}, "BETTER_AUTH_SECRET has 5"),
    ({}, "no auth secret"),
])
def test_auth_secret_rule(values, problem):
    found = preflight.auth_secret_problem(values)
    assert (found is None) if problem is None else (problem in found)


@pytest.mark.parametrize(("headers", "failures", "warnings"), [
    (SECURE_HEADERS, 0, 0),
    ({"strict-transport-security": "max-age=300", "content-security-policy": "default-src 'self'"}, 0, 1),
    ({"Content-Security-Policy-Report-Only": "default-src 'self'",
      "Strict-Transport-Security": "max-age=31536000"}, 0, 1),
    ({"Content-Security-Policy": "default-src 'self'"}, 1, 0),
    ({}, 2, 0),
])
def test_security_header_rule(headers, failures, warnings):
    found = preflight.header_problems(headers)
    assert (len(found[0]), len(found[1])) == (failures, warnings)


# --- a ready environment -----------------------------------------------------------------------


@pytest.fixture
def public_site() -> Iterator[dict[str, Any]]:
    """A stand-in for the public URL; `headers` can be changed while it runs."""
    state: dict[str, Any] = {"headers": dict(SECURE_HEADERS)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            for name, value in state["headers"].items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def ready(tmp_path: Path, postgres_server: Any, s3_server: Any, app_host_factory: Any,
          public_site: dict[str, Any]) -> dict[str, Any]:
    from ops.migrations import apply_pending

    (host,) = app_host_factory(("web1",))
    database_url = postgres_server.create_database()
    apply_pending(database_url, DEMO_MIGRATIONS)
    repository = tmp_path / "app"
    shutil.copytree(DEMO_MIGRATIONS, repository / "prisma" / "migrations")
    iam_user = f"opsbook-{uuid.uuid4().hex[:8]}"
    key_id, secret = s3_server.create_access_key(iam_user)
    assets, backups = s3_server.make_bucket(), s3_server.make_bucket()
    for bucket in (assets.bucket, backups.bucket):
        s3_server.client().put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=LIFECYCLE)
    env_text = "\n".join([
        f"DATABASE_URL={database_url.reveal()}", f"S3_ENDPOINT={s3_server.endpoint}", "S3_REGION=us-east-1",
        f"S3_BUCKET={assets.bucket}", f"S3_ACCESS_KEY_ID={key_id}", f"S3_SECRET_ACCESS_KEY={secret.reveal()}",
        f"NEXTAUTH_SECRET={AUTH_SECRET}", "APP_NAME=shop", ""])
    host.env_file.write_text(env_text)
    subprocess.run(host.restart_command, shell=True, check=True, capture_output=True, timeout=60)
    storage = {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": assets.bucket,
               "access_key_id": key_id, "secret_access_key": secret.reveal()}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump({"project": "preflighttest", "envs": {"web": {
        "database": {"url": database_url.reveal()},
        "storage": storage,
        "backups": {"bucket": backups.bucket, "prefix": "web/"},
        "keys": {"provider": "aws-iam", "iam_user": iam_user},
        "ssh": {"user": host.host.user, "port": host.host.port, "key_file": host.host.key_filename},
        "hosts": [{"name": "web1", "address": "127.0.0.1"}],
        "app": {"repository": str(repository), "migrations": {"engine": "native", "dir": "prisma/migrations"},
                "env_file": str(host.env_file), "health_url": host.health_url, "ready_url": host.ready_url,
                "public_url": public_site["url"], "env": {"APP_NAME": "shop"}},
        "targets": {"rpo_hours": 24, "rto_minutes": 60},
    }}}))
    env = inventory.load(path).environment("web")
    backup_storage = open_storage(env.storage_config("backups"))
    backup_id = store_backup(backup_storage, datetime.now(UTC) - timedelta(hours=2))
    store_drill(backup_storage, passed=True)
    return {"env": env, "host": host, "env_text": env_text, "repository": repository, "site": public_site,
            "backups": backup_storage, "backup_id": backup_id, "s3": s3_server, "assets": assets.bucket,
            "inventory": path}


def store_drill(storage: Any, *, passed: bool) -> None:
    now = datetime.now(UTC)
    report = {"id": "drill-1", "source_env": "web", "target_env": "scratch", "operator": "tester",
              "started_at": iso_z(now - timedelta(minutes=20)), "finished_at": iso_z(now), "backup_id": "b",
              "passed": passed, "rto_seconds": 1200, "rpo_seconds": 3600, "steps": [], "failures": []}
    storage.put_bytes("drills/drill-1/report.json", json.dumps(report).encode())


def status_of(env: Any, name: str) -> tuple[str, str]:
    """(pass|warn|fail, detail) of one preflight check, as run_checks classifies it."""
    probe = dict(preflight.probes(env))[name]
    try:
        return "pass", probe()
    except Warn as warning:
        return "warn", str(warning)
    except OpsError as error:
        return "fail", error.message


def restart(host: Any) -> None:
    subprocess.run(host.restart_command, shell=True, check=True, capture_output=True, timeout=60)


def break_cases(ready: dict[str, Any]) -> list[tuple[str, Callable[[], Any], Callable[[], None], str]]:
    """(check, break → env to check, repair, word expected in the failure)."""
    env, host, s3 = ready["env"], ready["host"], ready["s3"]
    pending = ready["repository"] / "prisma" / "migrations" / "20990101000000_add_orders"

    def rewrite_env(old: str, new: str) -> Callable[[], Any]:
        return lambda: (host.env_file.write_text(ready["env_text"].replace(old, new)), env)[1]

    def add_pending() -> Any:
        pending.mkdir()
        (pending / "migration.sql").write_text("CREATE TABLE orders (id int);\n")
        return env

    def stop_app() -> Any:
        host.stop()
        return env

    def lifecycle(bucket: str, rules: dict | None) -> Callable[[], Any]:
        client = s3.client()
        if rules is None:
            return lambda: (client.delete_bucket_lifecycle(Bucket=bucket), env)[1]
        return lambda: client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=rules)

    def set_headers(headers: dict[str, str]) -> Callable[[], Any]:
        return lambda: (ready["site"].__setitem__("headers", headers), env)[1]

    def restore_env_file() -> None:
        host.env_file.write_text(ready["env_text"])

    nothing = lambda: None  # noqa: E731
    cases = [
        ("env file on web1", rewrite_env("S3_BUCKET=", "S3_BUCKIT="), restore_env_file, "S3_BUCKET"),
        ("env file on web1", rewrite_env("APP_NAME=shop", "#"), restore_env_file, "APP_NAME"),
        ("auth secret on web1", rewrite_env(AUTH_SECRET, "too-short"), restore_env_file, "NEXTAUTH_SECRET has 9"),
        ("database TLS", lambda: env.with_overrides({"database": {"url": "postgresql://app@db.example.com/shop"}}),
         nothing, "no sslmode"),
        ("database pooler", lambda: env.with_overrides(
            {"database": {"url": "postgresql://app@db.example.com:6432/shop?sslmode=require"}}), nothing,
         "pgbouncer=true"),
        ("migrations", add_pending, lambda: shutil.rmtree(pending), "1 pending migration"),
        ("last backup", lambda: env.with_overrides({"targets": {"rpo_hours": 1}}), nothing,
         "older than the RPO target of 1 h"),
        ("last backup", lambda: (ready["backups"].delete(verification_key(ready["backup_id"])), env)[1],
         lambda: verify(ready["backups"], ready["backup_id"]), "no backup was ever verified"),
        ("DR drill", lambda: (store_drill(ready["backups"], passed=False), env)[1],
         lambda: store_drill(ready["backups"], passed=True), "FAILED"),
        ("lifecycle rule (storage)", lifecycle(ready["assets"], None), lifecycle(ready["assets"], LIFECYCLE),
         "incomplete multipart"),
        ("app health on web1", stop_app, lambda: restart(host), "no answer"),
        ("app ready on web1", stop_app, lambda: restart(host), "no answer"),
        ("security headers", set_headers({"Content-Security-Policy": "default-src 'self'"}),
         set_headers(dict(SECURE_HEADERS)), "no Strict-Transport-Security"),
        ("security headers", set_headers({}), set_headers(dict(SECURE_HEADERS)), "no Content-Security-Policy"),
        ("storage key age", lambda: env.with_overrides({"keys": {"max_age_days": 0}}), nothing, "rotation was due"),
    ]
    return cases


def test_each_check_passes_on_a_ready_environment_and_fails_when_what_it_checks_is_broken(ready, opsbook):
    env = ready["env"]
    opsbook.environ["OPS_INVENTORY"] = str(ready["inventory"])
    result = opsbook.run("preflight", "--env", "web", "--json")
    assert result.exit_code == 0, result
    names = [check["name"] for check in result.json()["checks"]]
    assert names == ["env file on web1", "auth secret on web1", "database TLS", "database pooler", "migrations",
                     "schema drift", "last backup", "DR drill", "storage key age", "lifecycle rule (storage)",
                     "lifecycle rule (backups)", "app health on web1", "app ready on web1", "security headers"]
    assert {check["status"] for check in result.json()["checks"]} == {"pass"}, result
    assert "fix:" not in result.stderr

    cases = break_cases(ready)
    assert {case[0] for case in cases} | {"lifecycle rule (backups)", "storage key age", "schema drift"} == set(names)
    for name, break_it, repair, expected in cases:
        broken_env = break_it()
        status, detail = status_of(broken_env, name)
        assert (status, name) == ("fail", name), detail
        assert expected in detail, (name, detail)
        repair()
        assert status_of(env, name)[0] == "pass", (name, status_of(env, name))

    with psycopg.connect(env.database_url(direct=True).reveal(), autocommit=True) as connection:
        connection.execute('ALTER TABLE "Brand" ADD COLUMN "motto" TEXT')  # by hand: drift is a warning
        status, detail = status_of(env, "schema drift")
        assert status == "warn" and 'column "Brand".motto: in the database only (text)' in detail, detail
        connection.execute('ALTER TABLE "Brand" DROP COLUMN "motto"')
    assert status_of(env, "schema drift")[0] == "pass"

    # the backup lock: only a warning where it is missing, then proved against the backup key itself
    assert "backup lock" not in dict(preflight.probes(env))  # neither protected nor locked: not a concern
    status, detail = status_of(env.with_overrides({"protected": True}), "backup lock")
    assert status == "warn" and "not locked" in detail, detail
    status, detail = status_of(env.with_overrides({"backups": {"lock_days": 7}}), "backup lock")
    assert status == "fail" and "no Object Lock" in detail, detail
    locked = ready["s3"].unique_bucket_name("locked")
    ready["s3"].client().create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    governance = env.with_overrides({"backups": {"bucket": locked, "lock_days": 7}})
    status, detail = status_of(governance, "backup lock")  # moto grants every key the bypass
    assert status == "fail" and "bypassing governance retention" in detail, detail
    compliance = env.with_overrides({"backups": {"bucket": locked, "lock_days": 7, "lock_mode": "compliance"}})
    status, detail = status_of(compliance, "backup lock")
    assert status == "warn" and "no lifecycle rule expires noncurrent versions" in detail, detail
    ready["s3"].client().put_bucket_lifecycle_configuration(Bucket=locked, LifecycleConfiguration={"Rules": [
        *LIFECYCLE["Rules"], {"ID": "old-versions", "Status": "Enabled", "Filter": {"Prefix": ""},
                              "NoncurrentVersionExpiration": {"NoncurrentDays": 7}}]})
    status, detail = status_of(compliance, "backup lock")
    assert status == "pass" and "delete of a locked probe version was refused" in detail, detail

    ready["host"].stop()
    result = opsbook.run("preflight", "--env", "web", "--json")
    assert result.exit_code == 3, result
    failed = [check["name"] for check in result.json()["checks"] if check["status"] == "fail"]
    assert failed == ["app health on web1", "app ready on web1"]
    assert "2 of 14 checks failed" in result.stderr and "deploy.restart" in result.stderr
    assert ready["env_text"].split("S3_SECRET_ACCESS_KEY=")[1].split("\n")[0] not in result.output
