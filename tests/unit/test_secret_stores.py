"""The secret store backends' pure parts and the inventory's secret-manager settings, without servers."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest

from ops import inventory
from ops.errors import InventoryError
from ops.secret_move import differing
from ops.secret_store import SecretStore
from ops.secret_store_aws import AwsSecretStore
from ops.secret_store_kubernetes import KubernetesSecretStore, decoded, secret_manifest
from ops.secrets import Secret

INVENTORY = """\
project: acme
defaults:
  secret_managers: {command_timeout_seconds: 5, aws: {region: eu-west-1}}
  secrets: {store: aws-sm}
envs:
  staging:
    secret_managers: {command_timeout_seconds: 1}
    database: {url: "${cmd:op read op://ops/db/url}"}
  prod:
    database: {url: "${aws-sm:prod/db#url}"}
    secrets: {store: kubernetes}
    schedule: {kubernetes: {image: "ghcr.io/acme/opsbook:1", namespace: shop}}
  dev:
    database: {url: "postgresql://u@h/d"}
    secrets: {store: file}
"""


def load(tmp_path: Path, text: str = INVENTORY) -> inventory.Inventory:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return inventory.load(path)


def test_each_reference_resolves_with_its_environments_manager_settings(tmp_path):
    loaded = load(tmp_path)
    staging = loaded.environment("staging").raw("database.url")
    prod = loaded.environment("prod").raw("database.url")
    assert staging.managers == {"command_timeout_seconds": 1, "aws": {"region": "eu-west-1"}}
    assert prod.managers == {"command_timeout_seconds": 5, "aws": {"region": "eu-west-1"}}


def test_the_store_each_environment_names(tmp_path):
    loaded = load(tmp_path)
    staging, prod, dev = (loaded.environment(name).secret_store() for name in ("staging", "prod", "dev"))
    assert isinstance(staging, AwsSecretStore) and staging.name == "opsbook/acme/staging"
    assert staging.settings.region == "eu-west-1"
    assert isinstance(prod, KubernetesSecretStore) and prod.label == "Kubernetes Secret shop/opsbook-prod"
    assert isinstance(dev, SecretStore) and dev.path == loaded.state_dir / "secrets" / "dev.env"


@pytest.mark.parametrize(("text", "expected"), [
    ("    database: {url: \"${cmd:op 'unbalanced}\"}\n", "cannot be split into words"),
    ("    database: {url: \"${cmd:}\"}\n", "names no command"),
    ("    database: {url: \"${aws-sm:#key}\"}\n", "needs a secret name"),
    ("    database: {url: \"${aws-sm:name#}\"}\n", "needs a secret name"),
    ("    database: {url: x}\n    secrets: {store: vault}\n", "envs.a.secrets.store: 'vault' is not one of"),
])
def test_malformed_manager_references_and_unknown_stores_are_inventory_problems(tmp_path, text, expected):
    with pytest.raises(InventoryError) as raised:
        load(tmp_path, "project: x\nenvs:\n  a:\n" + text)
    assert any(expected in problem for problem in raised.value.problems), raised.value.problems


def test_the_kubernetes_secret_is_a_valid_object_and_reads_back():
    values = {"AUTH_SECRET": Secret("a-secret-value"), "DATABASE_PASSWORD": Secret("pässword")}
    manifest = secret_manifest("opsbook-prod", "shop", "prod", values, resource_version="7")
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    assert manifest["metadata"]["resourceVersion"] == "7"
    assert decoded(manifest) == values


def test_differing_names_what_the_target_lacks_or_holds_otherwise():
    source = {"A": Secret("one-value"), "B": Secret("two-value"), "EMPTY": Secret("")}
    assert differing(source, {"A": Secret("one-value"), "B": Secret("other")}) == ["B"]
    assert differing(source, {}) == ["A", "B"]
