from pathlib import Path

import pytest

from ops import inventory
from ops.errors import InventoryError
from ops.secrets import MASK, Secret

BASE = """\
project: acme
default_env: staging
defaults:
  backups:
    retention: {keep_last: 7, daily: 7}
    prefix: default/
  ssh: {user: deploy}
envs:
  staging:
    database:
      url: ${env:STAGING_URL}
    storage: {provider: s3, bucket: assets, endpoint: "http://s3:9000", secret_access_key: "${env:S3_SECRET}"}
    backups:
      bucket: backups
      retention: {daily: 3}
    hosts:
      - {name: web1, address: 10.0.0.5, app: {health_url: "http://127.0.0.1:4000/api/health"}}
      - {name: web2, address: 10.0.0.6, user: admin}
    app: {dir: /srv/app, health_url: "http://127.0.0.1:3000/api/health"}
  other:
    database: {url: "postgresql://u@h/d"}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(InventoryError) as raised:
        inventory.load(write(tmp_path, text))
    return raised.value.problems


def test_merge_order_defaults_then_env_then_host(tmp_path):
    env = inventory.load(write(tmp_path, BASE)).environment("staging")
    assert env.raw("backups.retention") == {"keep_last": 7, "daily": 3}  # dicts merge key by key
    assert env.raw("backups.prefix") == "default/"
    hosts = env.host_configs()
    assert [(h.name, h.user) for h in hosts] == [("web1", "deploy"), ("web2", "admin")]
    assert env.app_settings("web1")["health_url"] == "http://127.0.0.1:4000/api/health"
    assert env.app_settings("web2")["health_url"] == "http://127.0.0.1:3000/api/health"
    assert env.app_settings("web2")["dir"] == "/srv/app"


def test_references_resolve_only_when_used(tmp_path, monkeypatch):
    monkeypatch.delenv("STAGING_URL", raising=False)
    env = inventory.load(write(tmp_path, BASE)).environment("staging")  # loading needs no variable
    with pytest.raises(InventoryError) as raised:
        env.database_url()
    message = str(raised.value)
    assert "inventory.yaml, line 11" in message and "envs.staging.database.url" in message
    assert "${env:STAGING_URL} is not set" in message and "export STAGING_URL" in message
    monkeypatch.setenv("STAGING_URL", "postgresql://app:pw-from-env@db/app")
    url = env.database_url()
    assert isinstance(url, Secret) and url.reveal() == "postgresql://app:pw-from-env@db/app"


def test_reference_defaults_and_files(tmp_path, monkeypatch):
    (tmp_path / "token.txt").write_text("file-secret-value\n")
    monkeypatch.delenv("MISSING_VAR", raising=False)
    reference = inventory.Reference("a-${env:MISSING_VAR:-fallback}-${file:" + str(tmp_path / "token.txt") + "}",
                                    "x.y", "inventory.yaml, line 1")
    assert reference.resolve().reveal() == "a-fallback-file-secret-value"
    with pytest.raises(InventoryError, match="cannot be read"):
        inventory.Reference("${file:/nonexistent/x}", "x.y", "here").resolve()


def test_storage_config_inherits_connection_settings_for_backups(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_SECRET", "the-s3-secret")
    env = inventory.load(write(tmp_path, BASE)).environment("staging")
    config = env.storage_config("backups")
    assert (config.bucket, config.endpoint, config.prefix) == ("backups", "http://s3:9000", "default/")
    assert config.secret_access_key.reveal() == "the-s3-secret"


def test_every_problem_is_reported_at_once_with_path_line_and_hint(tmp_path):
    broken = BASE.replace("keep_last: 7", "keep_lst: 7").replace("provider: s3", "provider: s4").replace(
        "address: 10.0.0.6", "adress: 10.0.0.6")
    problems = problems_of(tmp_path, broken)
    assert "defaults.backups.retention.keep_lst: unknown key; did you mean 'keep_last'? (line 5)" in problems
    assert any(p.startswith("envs.staging.storage.provider: 's4' is not one of") and p.endswith("(line 12)")
               for p in problems)
    assert "envs.staging.hosts.1.address: required (line 18)" in problems
    assert "envs.staging.hosts.1.adress: unknown key; did you mean 'address'? (line 18)" in problems


@pytest.mark.parametrize(("text", "expected"), [
    ("project: x\nenvs: {}\n", "envs: {} should be non-empty"),
    ("envs: {a: {}}\n", "project: required"),
    ("project: x\ndefault_env: nope\nenvs: {a: {}, b: {}}\n",
     "default_env: names no environment ('nope'); known environments: a, b (line 2)"),
    ("project: x\ndefault_env: stagign\nenvs: {staging: {}}\n", "did you mean 'staging'?"),
    ("project: x\nenvs: {Prod: {}}\n", "envs.Prod: environment names are lower-case"),
    ("project: x\nenvs:\n  a:\n    database: {url: '${env:}x${oops'}\n", "envs.a.database.url: malformed reference"),
])
def test_validation_messages(tmp_path, text, expected):
    assert any(expected in problem for problem in problems_of(tmp_path, text)), problems_of(tmp_path, text)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    with pytest.raises(InventoryError) as raised:
        inventory.load(write(tmp_path, "project: x\nenvs:\n  a: {b: 1\n  c: 2\n"))
    assert "inventory.yaml, line" in str(raised.value) and "YAML syntax error" in str(raised.value)


def test_unknown_environment_suggests_the_closest(tmp_path):
    with pytest.raises(InventoryError, match="did you mean 'staging'"):
        inventory.load(write(tmp_path, BASE)).environment("stagign")


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(InventoryError, match="OPS_INVENTORY"):
        inventory.load(tmp_path / "nope.yaml")


def test_masked_view_hides_secrets_and_names_references(tmp_path):
    env = inventory.load(write(tmp_path, BASE)).environment("other")
    assert env.masked()["database"]["url"] == MASK  # literal URL with credentials-bearing key
    staging = inventory.load(write(tmp_path, BASE)).environment("staging")
    assert staging.masked()["database"]["url"] == f"{MASK} (from ${{env:STAGING_URL}})"


def test_state_dir_defaults_next_to_the_inventory(tmp_path, monkeypatch):
    monkeypatch.delenv("OPS_HOME", raising=False)
    assert inventory.load(write(tmp_path, BASE)).state_dir == (tmp_path / ".ops").resolve()


BROKEN_URLS = """\
project: x
envs:
  prod:
    database: {url: "://app:pw-in-url@db/app", direct_url: "mysql://app@db/app", admin_url: "postgresql:///app"}
    storage: {bucket: b, endpoint: "not a url:9000", public_base: "cdn.example.com"}
    backups: {endpoint: "http://s3:port"}
    app: {health_url: "/api/health", public_url: "https://shop.example"}
    keys: {endpoint: "ftp://iam.example", api_base: "https://api.cloudflare.com/client/v4"}
    notify: [{kind: webhook, url: "hooks.example.com/T0/B0/secret-hook"}]
    hosts:
      - {name: web1, address: 10.0.0.5, app: {ready_url: "http:// 127.0.0.1/ready"}}
      - {name: web2, address: 10.0.0.6}
      - {name: web1, address: 10.0.0.7}
"""


def test_urls_must_parse_and_host_names_be_unique(tmp_path):
    problems = problems_of(tmp_path, BROKEN_URLS)
    def problem(path: str, line: int) -> str:
        found = [p for p in problems if p.startswith(f"{path}: ")]
        assert len(found) == 1 and found[0].endswith(f"(line {line})"), (path, problems)
        return found[0]

    assert "no scheme" in problem("envs.prod.database.url", 4)
    assert "postgresql://" in problem("envs.prod.database.direct_url", 4)
    assert "no host" in problem("envs.prod.database.admin_url", 4)
    assert "no scheme" in problem("envs.prod.storage.endpoint", 5)
    assert "no scheme" in problem("envs.prod.storage.public_base", 5)
    assert "port" in problem("envs.prod.backups.endpoint", 6)
    assert "no scheme" in problem("envs.prod.app.health_url", 7)
    assert "http" in problem("envs.prod.keys.endpoint", 8)
    assert "no scheme" in problem("envs.prod.notify.0.url", 9)
    assert "envs.prod.hosts.0.app.ready_url" in " ".join(problems)
    assert "'web1' is also the name of envs.prod.hosts.0" in problem("envs.prod.hosts.2.name", 13)
    assert len(problems) == 11, problems
    assert not any(secret in p for p in problems for secret in ("pw-in-url", "secret-hook", "not a url"))


def test_well_formed_urls_and_references_pass_the_check(tmp_path):
    text = BASE.replace('url: "postgresql://u@h/d"', 'url: "postgres://u@h:5432/d?sslmode=require"')
    text += ("    storage: {bucket: b, endpoint: 'https://${env:ACCOUNT:-x}.r2.cloudflarestorage.com'}\n"
             "    app: {health_url: 'http://[::1]:3000/api/health', ready_url: '${env:READY_URL}'}\n"
             "  socket:\n    database: {url: 'postgresql://app@/shop?host=/run/postgresql'}\n")
    inventory.load(write(tmp_path, text))


def test_a_reference_that_resolves_to_a_broken_url_names_reference_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGING_URL", "://app:resolved-pw@db/app")
    env = inventory.load(write(tmp_path, BASE)).environment("staging")
    with pytest.raises(InventoryError) as raised:
        env.database_url()
    message = str(raised.value)
    assert "envs.staging.database.url" in message and "${env:STAGING_URL}" in message, message
    assert "inventory.yaml, line 11" in message and "no scheme" in message
    assert "resolved-pw" not in message and "://app" not in message
    monkeypatch.setenv("STAGING_URL", "postgresql://app:resolved-pw@db/app")
    assert env.database_url().reveal() == "postgresql://app:resolved-pw@db/app"


def test_a_neon_pooler_url_gives_the_direct_one_for_admin_work_unless_written(tmp_path, monkeypatch):
    pooled = "postgresql://app:pw@ep-calm-1-pooler.us-east-2.aws.neon.tech/shop?sslmode=require&pgbouncer=true"
    monkeypatch.setenv("NEON_POOLED", pooled)
    inv = inventory.load(write(tmp_path, """\
project: acme
envs:
  prod:
    database: {url: "${env:NEON_POOLED}", provider: neon, project_id: p-1, api_key: "${env:NEON_API_KEY}"}
  given:
    database: {url: "${env:NEON_POOLED}", direct_url: "postgresql://admin:pw@db.internal/shop"}
"""))
    prod = inv.environment("prod")
    direct = "postgresql://app:pw@ep-calm-1.us-east-2.aws.neon.tech/shop?sslmode=require"
    assert prod.admin_url().reveal() == direct
    assert prod.database_url(direct=True).reveal() == direct
    assert prod.database_url(direct=False).reveal() == pooled
    assert inv.environment("given").admin_url().reveal() == "postgresql://admin:pw@db.internal/shop"


def test_database_names_are_a_list_or_all(tmp_path):
    text = BASE.replace('    database: {url: "postgresql://u@h/d"}\n',
                        '    database: {url: "postgresql://u@h/d", names: [app, analytics]}\n')
    assert inventory.load(write(tmp_path, text)).environment("other").database_names() == ["app", "analytics"]
    assert inventory.load(write(tmp_path, text.replace("[app, analytics]", "all"))).environment(
        "other").database_names() == "all"
    assert inventory.load(write(tmp_path, BASE)).environment("other").database_names() is None
    for wrong in ("[]", "some", "[app, app]"):
        assert any(problem.startswith("envs.other.database.names")
                   for problem in problems_of(tmp_path, text.replace("[app, analytics]", wrong))), wrong
