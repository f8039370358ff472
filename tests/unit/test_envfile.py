"""The app env file (render, quote, parse, masked diff) and the pure parts of rolling restarts and rollbacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops import inventory
from ops.envfile import masked_diff, parse_env_file, quote_value, render_env_file
from ops.pg_url import with_credentials
from ops.rollout import (
    HostOutcome,
    batches,
    build_switch_command,
    newer_migrations,
    previous_release,
    restart_reason,
    roll,
    rollback_target,
)
from ops.secret_store import SecretStore
from ops.secrets import Secret
from tests.app.server import parse_env_file as app_parse_env_file

TRICKY_VALUES = [
    "plain", "", "with space", "it's", 'say "hi"', "dollar$HOME", "hash # not a comment", "two\nlines",
    "back\\slash", "back\\nslash", "scrypt$n=16384,r=8,p=1$c2FsdA$aGFzaA", "postgresql://u:p%40ss@h:5432/d?x=1",
    "'quoted'", "tab\there", "ünïcode",
]


@pytest.mark.parametrize("value", TRICKY_VALUES)
def test_quoted_values_read_back_unchanged(value: str) -> None:
    assert parse_env_file(f"KEY={quote_value(value)}\n") == {"KEY": value}


@pytest.mark.parametrize("value", [v for v in TRICKY_VALUES if "\\" not in v])
def test_the_test_app_reads_the_same_values(value: str) -> None:
    assert app_parse_env_file(f"KEY={quote_value(value)}\n") == {"KEY": value}


@pytest.mark.parametrize(("value", "written"), [
    ("abc-123_./:@%", "abc-123_./:@%"),
    ("a b", "'a b'"),
    ("a$b", "'a$b'"),
    ("it's", '"it\'s"'),
    ("a\nb", '"a\\nb"'),
])
def test_quoting_is_minimal_and_safe(value: str, written: str) -> None:
    assert quote_value(value) == written


def test_parse_skips_comments_blank_lines_and_export() -> None:
    text = "# comment\n\nexport A=1\nB = two \nC=x # trailing\nnot a line\nA=3\n"
    assert parse_env_file(text) == {"A": "3", "B": "two", "C": "x"}


@pytest.mark.parametrize(("url", "user", "expected"), [
    ("postgresql://app:old@db:5432/shop", None, "postgresql://app:n%2Fw%40@db:5432/shop"),
    ("postgresql://app@db/shop?sslmode=require", "role1", "postgresql://role1:n%2Fw%40@db/shop?sslmode=require"),
    ("postgresql://app:old@db:6432/shop?pgbouncer=true", "r", "postgresql://r:n%2Fw%40@db:6432/shop?pgbouncer=true"),
])
def test_with_credentials_replaces_password_and_user(url: str, user: str | None, expected: str) -> None:
    assert with_credentials(url, "n/w@", user=user) == expected


def test_masked_diff_never_shows_secret_values() -> None:
    old = "DATABASE_URL=postgresql://app:oldpass1@db/shop\nAUTH_SECRET=oldsecret1\nNODE_ENV=staging\nGONE=1\n"
    new = ("DATABASE_URL=postgresql://app:newpass2@db/shop\nAUTH_SECRET=newsecret2\nNODE_ENV=production\n"
           "S3_SECRET_ACCESS_KEY=brandnew3\nS3_BUCKET=b\n")
    lines = masked_diff(old, new)
    assert lines == [
        "~ DATABASE_URL: changed (credentials)",
        "~ AUTH_SECRET: changed",
        "~ NODE_ENV: staging → production",
        "+ S3_SECRET_ACCESS_KEY=***",
        "+ S3_BUCKET=b",
        "- GONE",
    ]
    shown = "\n".join(lines)
    for secret in ("oldpass1", "newpass2", "oldsecret1", "newsecret2", "brandnew3"):
        assert secret not in shown


def test_masked_diff_of_a_new_file_and_of_equal_files() -> None:
    assert masked_diff(None, "A=1\nTOKEN=abcdefgh\n") == ["(new file)", "+ A=1", "+ TOKEN=***"]
    assert masked_diff("A=1\n", "A=1\n") == []
    assert masked_diff("# old\nA=1\n", "# new\nA=1\n") == ["(comments or formatting only)"]


def _environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str = "") -> inventory.Environment:
    monkeypatch.setenv("UNIT_DB_URL", "postgresql://app:inventorypw@127.0.0.1:5432/shop")
    monkeypatch.setenv("OPS_HOME", str(tmp_path / ".ops"))
    (tmp_path / "inventory.yaml").write_text(f"""
project: unit
envs:
  staging:
    database: {{url: "${{env:UNIT_DB_URL}}", direct_url: "postgresql://app:inventorypw@127.0.0.1:5432/shop",
               role: app_role}}
    storage: {{provider: r2, endpoint: "https://acct.r2.example", bucket: assets,
              access_key_id: inventorykeyid, secret_access_key: inventorysecret, public_base: "https://cdn.example"}}
    hosts:
      - {{name: web1, address: 127.0.0.1, app: {{env: {{DATABASE_URL: "postgresql://x@127.0.0.1:1/broken"}}}}}}
      - {{name: web2, address: 127.0.0.1}}
    app: {{env: {{NODE_ENV: production, FEATURE_X: true, PORT: 3000}}}}
{extra}""")
    return inventory.load(tmp_path / "inventory.yaml").environment("staging")


def test_render_uses_the_inventory_then_the_secret_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _environment(tmp_path, monkeypatch)
    before = parse_env_file(render_env_file(env, "web2"))
    assert before == {
        "DATABASE_URL": "postgresql://app:inventorypw@127.0.0.1:5432/shop",
        "DIRECT_URL": "postgresql://app:inventorypw@127.0.0.1:5432/shop",
        "S3_ENDPOINT": "https://acct.r2.example", "S3_REGION": "auto", "S3_BUCKET": "assets",
        "S3_ACCESS_KEY_ID": "inventorykeyid", "S3_SECRET_ACCESS_KEY": "inventorysecret",
        "S3_PUBLIC_BASE": "https://cdn.example",
        "NODE_ENV": "production", "FEATURE_X": "true", "PORT": "3000",
    }
    store = SecretStore(env.inventory.state_dir, env.name)
    for key, value in {"DATABASE_PASSWORD": "storedpw", "STORAGE_ACCESS_KEY_ID": "rotatedid",
                       "STORAGE_SECRET_ACCESS_KEY": "rotatedsecret", "AUTH_SECRET": "x" * 32,
                       "ADMIN_PASSWORD_HASH": "scrypt$n=16384,r=8,p=1$c2FsdA$aGFzaA"}.items():
        store.set(key, Secret(value))
    after = parse_env_file(render_env_file(env, "web2"))  # read at call time: no caching
    assert after["DATABASE_URL"] == "postgresql://app_role:storedpw@127.0.0.1:5432/shop"
    assert after["DIRECT_URL"] == "postgresql://app_role:storedpw@127.0.0.1:5432/shop"
    assert (after["S3_ACCESS_KEY_ID"], after["S3_SECRET_ACCESS_KEY"]) == ("rotatedid", "rotatedsecret")
    assert after["AUTH_SECRET"] == after["NEXTAUTH_SECRET"] == after["BETTER_AUTH_SECRET"] == "x" * 32
    assert after["ADMIN_PASSWORD_HASH"] == "scrypt$n=16384,r=8,p=1$c2FsdA$aGFzaA"


def test_a_hosts_app_env_replaces_the_rendered_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _environment(tmp_path, monkeypatch)
    text = render_env_file(env, "web1")
    assert text.count("DATABASE_URL=") == 1
    assert parse_env_file(text)["DATABASE_URL"] == "postgresql://x@127.0.0.1:1/broken"
    assert text.startswith("# unit / staging / web1:")


def test_missing_optional_values_are_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPS_HOME", str(tmp_path / ".ops"))
    (tmp_path / "inventory.yaml").write_text(
        "project: unit\nenvs:\n  bare:\n    database: {url: 'postgresql://app@db/shop'}\n")
    env = inventory.load(tmp_path / "inventory.yaml").environment("bare")
    text = render_env_file(env)
    assert parse_env_file(text) == {"DATABASE_URL": "postgresql://app@db/shop?sslmode=require"}  # off the machine
    assert "\n\n\n" not in text and "S3_" not in text


# --- rolling restart and releases ---------------------------------------------------------


@pytest.mark.parametrize(("marker", "env_sha", "release", "expected"), [
    (None, None, None, None),
    (None, "abc", None, "no restart by opsbook on record"),
    ({"env_sha256": "abc", "release": "r2"}, "abc", "r2", None),
    ({"env_sha256": "abc", "release": "r2"}, "def", "r2", "the env file changed since the app was started"),
    ({"env_sha256": "abc", "release": "r2"}, "abc", "r1", "current points to r1 but the app was started on r2"),
])
def test_restart_reason(marker: dict | None, env_sha: str | None, release: str | None,
                        expected: str | None) -> None:
    assert restart_reason(marker, env_sha, release) == expected


def test_batches() -> None:
    assert batches(["a", "b", "c"], 1) == [["a"], ["b"], ["c"]]
    assert batches(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    assert batches([], 3) == []


@pytest.mark.parametrize(("batch", "max_fail", "expected"), [
    (1, 0, {"h1": "restarted", "h2": "failed", "h3": "not attempted", "h4": "not attempted"}),
    (1, 1, {"h1": "restarted", "h2": "failed", "h3": "restarted", "h4": "restarted"}),
    (2, 0, {"h1": "restarted", "h2": "failed", "h3": "not attempted", "h4": "not attempted"}),
    (3, 0, {"h1": "restarted", "h2": "failed", "h3": "restarted", "h4": "not attempted"}),
])
def test_roll_stops_once_failures_pass_the_threshold(batch: int, max_fail: int, expected: dict[str, str]) -> None:
    reported: list[str] = []

    def restart_one(name: str) -> HostOutcome:
        return HostOutcome(name, "failed" if name == "h2" else "restarted")

    outcomes = roll(["h1", "h2", "h3", "h4"], batch=batch, max_fail=max_fail, restart_one=restart_one,
                    report=lambda outcome: reported.append(outcome.host))
    assert {o.host: o.status for o in outcomes} == expected
    assert reported == ["h1", "h2", "h3", "h4"]  # every host is reported, in order


@pytest.mark.parametrize(("releases", "current", "expected"), [
    (["r1", "r2", "r3"], "r3", "r2"),
    (["r3", "r1", "r2"], "r2", "r1"),
    (["r1"], "r1", None),
    (["r1", "r2"], None, None),
    (["r1", "r2"], "gone", None),
])
def test_previous_release(releases: list[str], current: str | None, expected: str | None) -> None:
    assert previous_release(releases, current) == expected


def test_rollback_target_agrees_across_hosts() -> None:
    releases = {"web1": ["r1", "r2", "r3"], "web2": ["r1", "r2", "r3"]}
    assert rollback_target({"web1": "r3", "web2": "r3"}, releases) == "r2"
    assert rollback_target({"web1": "r2", "web2": "r3"}, releases) == "r2"  # finish a half-done rollback
    assert rollback_target({"web1": "r1", "web2": "r1"}, releases) is None
    assert rollback_target({"web1": None}, releases) is None


def test_switch_command_renames_a_new_link_over_current() -> None:
    command = build_switch_command("/srv/my app", "r2")
    assert command.startswith("cd '/srv/my app' && test -d releases/r2 && ln -s releases/r2 .current.tmp-")
    assert "mv -T .current.tmp-" in command and command.count("current") >= 3


def test_newer_migrations() -> None:
    assert newer_migrations(["a", "b", "c"], ["a", "b"]) == ["c"]
    assert newer_migrations(["a"], ["a", "b"]) == []


@pytest.mark.parametrize(("url", "require_tls", "pooled", "expected"), [
    ("postgresql://a:b@db.example.com:6432/x", True, True, "postgresql://a:b@db.example.com:6432/x?sslmode=require&pgbouncer=true"),
    ("postgresql://a:b@db.example.com/x", True, False, "postgresql://a:b@db.example.com/x?sslmode=require"),
    ("postgresql://a:b@db.example.com/x?sslmode=verify-full", True, False, "postgresql://a:b@db.example.com/x?sslmode=verify-full"),
    ("postgresql://a:b@127.0.0.1:5432/x", True, False, "postgresql://a:b@127.0.0.1:5432/x"),
    ("postgresql://a:b@localhost/x?pgbouncer=false", True, True, "postgresql://a:b@localhost/x?pgbouncer=false"),
    ("postgresql://a:b@db.example.com/x", False, False, "postgresql://a:b@db.example.com/x"),
])
def test_app_urls_get_tls_off_the_machine_and_pgbouncer_when_pooled(url, require_tls, pooled, expected) -> None:
    from ops.envfile import with_connection_parameters

    assert with_connection_parameters(url, require_tls=require_tls, pooled=pooled) == expected
