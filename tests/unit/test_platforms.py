"""app.platform: both platforms registered behind one contract, the inventory schema, the README's example."""

from __future__ import annotations

import re
import textwrap
from urllib.parse import urlsplit

import yaml

from ops import inventory, neon
from ops.inventory_schema import schema_errors
from ops.platform_steps import REGISTERED
from ops.platforms import PLATFORMS, Platform
from ops.platforms import platform as platform_of
from tests.cli import REPOSITORY

CONTRACT = ("require", "push_env_steps", "restart_step", "rollback_steps", "probes")


def test_every_platform_is_registered_and_offers_the_whole_contract() -> None:
    assert set(PLATFORMS) == {"ssh", "vercel"} == {kind.name for kind in REGISTERED}
    for platform in PLATFORMS.values():
        missing = [name for name in CONTRACT if not callable(getattr(platform, name, None))]
        assert missing == [], f"{platform.name} lacks {missing}"
        assert isinstance(platform.describe, str) and platform.describe
        assert set(CONTRACT) <= set(dir(Platform))


def readme_vercel_environment() -> dict:
    text = (REPOSITORY / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)\n *```", text, re.DOTALL) if "platform: vercel" in b]
    assert len(blocks) == 1, "the README shows one Vercel inventory example"
    return yaml.safe_load(textwrap.dedent(blocks[0]))["envs"]


def test_the_readme_vercel_example_is_a_valid_inventory() -> None:
    inventory = {"project": "shop", "envs": readme_vercel_environment()}
    assert [error.message for error in schema_errors(inventory)] == []


def test_the_schema_refuses_an_unknown_platform_and_a_vercel_section_without_its_project() -> None:
    unknown = {"project": "shop", "envs": {"prod": {"database": {"url": "x"}, "app": {"platform": "heroku"}}}}
    assert any("heroku" in error.message for error in schema_errors(unknown))
    no_project = {"project": "shop", "envs": {"prod": {"database": {"url": "x"},
                                                        "app": {"platform": "vercel", "vercel": {"token": "t"}}}}}
    assert any("project_id" in error.message for error in schema_errors(no_project))


def test_the_readme_vercel_and_neon_example_loads_as_an_environment_of_both(tmp_path, monkeypatch) -> None:
    """Through the inventory loader (schema and checks), then read as the runbooks read it."""
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump({"project": "shop", "envs": readme_vercel_environment()}))
    monkeypatch.setenv("NEON_API_KEY", "napi_example")
    monkeypatch.setenv("VERCEL_TOKEN", "vercel_example")
    monkeypatch.setenv("OPS_HOME", str(tmp_path / ".ops"))
    env = inventory.load(path).environment("prod")
    assert platform_of(env).name == "vercel" and neon.is_neon(env) and env.protected
    platform_of(env).require(env)
    assert neon.client(env).project_id == "calm-sky-123456" and neon.branch_name(env) == "main"
    assert env.raw("drill.target") == "neon-branch"
    direct = urlsplit(env.database_url(direct=True).reveal())
    assert direct.hostname == "ep-calm-1.us-east-2.aws.neon.tech"  # admin work: the direct endpoint
    assert urlsplit(env.database_url(direct=False).reveal()).hostname == "ep-calm-1-pooler.us-east-2.aws.neon.tech"
