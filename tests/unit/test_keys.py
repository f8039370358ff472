"""Pure parts of key handling: admin password hashes, R2 derived secrets, policy copies, the key override."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from ops import inventory
from ops.clock import parse_time_or_none as parse_time
from ops.key_providers import copy_policies, r2_secret
from ops.keys import KeyStatus, store_admin_password_hash, verify_admin_password
from ops.secret_store import SecretStore
from ops.secrets import Secret
from runbooks.secrets_rotate import canonical


def test_admin_password_hash_is_salted_scrypt_and_verifies():
    password = Secret("correct horse battery staple")
    first, second = store_admin_password_hash(password), store_admin_password_hash(password)
    assert first.startswith("scrypt$n=16384,r=8,p=1$") and len(first.split("$")) == 4
    assert first != second  # salted
    assert password.reveal() not in first
    assert verify_admin_password(password, first) and verify_admin_password(password, second)
    assert not verify_admin_password(Secret("correct horse battery stapler"), first)


@pytest.mark.parametrize("stored", ["", "scrypt$n=16384", "bcrypt$n=1,r=8,p=1$c2FsdA$aGFzaA",
                                    "scrypt$n=3,r=8,p=1$c2FsdA$aGFzaA", "scrypt$x=1$c2FsdA$aGFzaA"])
def test_malformed_hashes_never_verify(stored):
    assert verify_admin_password(Secret("anything"), stored) is False


def test_r2_secret_is_hex_sha256_of_the_token_value():
    assert r2_secret("token-value").reveal() == hashlib.sha256(b"token-value").hexdigest()
    assert str(r2_secret("token-value")) == "***"


def test_copied_policies_keep_effect_resources_and_group_ids_only():
    policies = [{"id": "p1", "effect": "allow", "resources": {"com.cloudflare.edge.r2.bucket.a_default_b": "*"},
                 "permission_groups": [{"id": "g1", "name": "Workers R2 Storage Bucket Item Write"}]}]
    assert copy_policies(policies) == [{"effect": "allow", "resources": {"com.cloudflare.edge.r2.bucket.a_default_b":
                                                                          "*"}, "permission_groups": [{"id": "g1"}]}]


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2026-01-02T03:04:05.123+00:00", datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)),
    (None, None), ("not a date", None)])
def test_parse_time(text, expected):
    assert parse_time(text) == expected


@pytest.mark.parametrize(("name", "canonical_name"), [
    ("ADMIN_PASSWORD", "ADMIN_PASSWORD"), ("nextauth_secret", "AUTH_SECRET"), ("BETTER_AUTH_SECRET", "AUTH_SECRET")])
def test_secret_names(name, canonical_name):
    assert canonical(name) == canonical_name


def test_status_json_masks_and_dates():
    created = datetime(2026, 1, 1, tzinfo=UTC)
    status = KeyStatus("prod", "aws-iam", "AKIA…WXYZ", created, 100.0, 90, created + timedelta(days=90), None,
                       True, False)
    assert status.to_json()["due_at"] == "2026-04-01T00:00:00Z" and status.to_json()["overdue"] is True
    assert any("OVERDUE" in line for line in status.lines())


def test_rotated_key_in_the_secret_store_wins_for_storage_and_inheriting_backups(tmp_path, monkeypatch):
    monkeypatch.delenv("OPS_HOME", raising=False)
    file = tmp_path / "inventory.yaml"
    storage = {"provider": "s3", "endpoint": "http://127.0.0.1:9", "bucket": "assets",
               "access_key_id": "${env:OLD_KEY_ID}", "secret_access_key": "${env:OLD_SECRET}"}
    file.write_text(yaml.safe_dump({"project": "p", "envs": {
        "a": {"storage": storage, "backups": {"bucket": "backups"}},
        "b": {"storage": storage, "backups": {"bucket": "backups", "access_key_id": "own", "secret_access_key": "x"}},
    }}))
    loaded = inventory.load(file)
    for name in ("a", "b"):
        SecretStore(loaded.state_dir, name).set("STORAGE_ACCESS_KEY_ID", Secret("NEWKEY"))
        SecretStore(loaded.state_dir, name).set("STORAGE_SECRET_ACCESS_KEY", Secret("new-secret"))
    # the old ${env:…} references may be gone after a rotation: they are not resolved
    assert loaded.environment("a").storage_config("storage").access_key_id.reveal() == "NEWKEY"
    assert loaded.environment("a").storage_config("backups").secret_access_key.reveal() == "new-secret"
    assert loaded.environment("b").storage_config("backups").access_key_id.reveal() == "own"
