"""Load, validate and merge inventory.yaml; resolve secret references when used.

Merge order, fixed and documented (later wins, dicts merge key by key, lists replace):
    1. `defaults`            merged under every environment
    2. `envs.<name>`         the environment itself
    3. `envs.<name>.hosts[]` per host: the environment's `ssh` and `app` under the host's own keys
A sandbox environment (`sandbox: true`) gets its database and storage from the
embedded sandbox (ops/sandbox.py) on top of all that; a sandbox env NAME also has
an undeclared `NAME-drill`, its drill target: a second database of the same cluster.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import re
from dataclasses import field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ops import yaml_text
from ops.errors import InventoryError, OpsError
from ops.hosts import HostConfig
from ops.inventory_checks import duplicate_host_names, literal_url_problems
from ops.inventory_schema import SECRET_KEYS, schema_errors
from ops.known_hosts import FILE_NAME as KNOWN_HOSTS_FILE
from ops.lazy_dataclasses import dataclass
from ops.patterns import Pattern
from ops.pg_url import direct_from_pooled, parse_url, with_credentials
from ops.references import (
    REFERENCE_FORMS,
    REFERENCE_PATTERN,
    Reference,
    as_secret,
    aws_settings,
    manager_reference_problems,
    mask_tree,
    plain,
    resolve,
)
from ops.secret_store import Store
from ops.secret_stores import DEFAULT_STORE, StoreSettings, open_store
from ops.secrets import Secret
from ops.storage import StorageConfig

if TYPE_CHECKING:
    from ops.hosts import HostConfig
    from ops.storage import StorageConfig

DEFAULT_FILE = "inventory.yaml"
SANDBOX_DRILL_SUFFIX = "-drill"  # `local-drill`: the drill target a sandbox env `local` gets (ops/sandbox.py)
_MISSING = object()
# Written by `inv provision` on a Neon environment whose inventory has no URL (ops/neon_provision.py).
PROVISIONED_URLS = {"database.url": "DATABASE_URL", "database.direct_url": "DIRECT_URL"}
_MONITOR_URL = Pattern(r"^(?:defaults|envs\.[^.]+)\.monitor\.(?:url$|jobs\.)")  # a ping URL is a credential


@dataclass
class Inventory:
    """The inventory file as loaded: its data, its lines (for errors) and its digest."""

    file: Path
    data: dict[str, Any]
    lines: dict[str, int]
    digest: str

    @property
    def project(self) -> str:
        return self.data["project"]

    @property
    def default_env(self) -> str:
        return self.data.get("default_env") or next(iter(self.data["envs"]))

    @property
    def env_names(self) -> list[str]:
        return list(self.data["envs"])

    @property
    def state_dir(self) -> Path:
        configured = os.environ.get("OPS_HOME") or self.data.get("state_dir")
        base = Path(configured) if configured else Path(".ops")
        return base if base.is_absolute() else (self.file.parent / base).resolve()

    def location(self, path: str) -> str:
        line = self.lines.get(path)
        return f"{self.file.name}, line {line}" if line else self.file.name

    def environment(self, name: str | None) -> Environment:
        name = name or self.default_env
        if name not in self.data["envs"] and (derived := self._sandbox_drill_target(name)) is not None:
            return derived
        if name not in self.data["envs"]:
            hint = _did_you_mean(name, self.env_names) or f"known environments: {', '.join(self.env_names)}"
            raise InventoryError(f"no environment named {name!r}", where=str(self.file), hint=hint)
        merged = deep_merge(self.data.get("defaults") or {}, self.data["envs"][name])
        return Environment(name=name, data=merged, inventory=self)

    def _sandbox_drill_target(self, name: str) -> Environment | None:
        """`NAME-drill` of a sandbox environment NAME: the drill target the sandbox provides (ops/sandbox.py)."""
        source = name.removesuffix(SANDBOX_DRILL_SUFFIX)
        declared = self.data["envs"].get(source) if source != name else None
        if not isinstance(declared, dict) or not deep_merge(self.data.get("defaults") or {}, declared).get("sandbox"):
            return None
        data = deep_merge(self.data.get("defaults") or {}, {
            "sandbox": True, "drill_target_of": source,
            "description": f"the DR drill's target for {source}: a second database of the sandbox cluster"})
        return Environment(name=name, data=data, inventory=self)


@dataclass
class Environment:
    """One environment of the inventory, defaults merged in."""

    name: str
    data: dict[str, Any]
    inventory: Inventory
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def protected(self) -> bool:
        return bool(self.data.get("protected"))

    @property
    def sandbox(self) -> bool:
        return bool(self.data.get("sandbox"))

    @property
    def decommissioned(self) -> bool:
        return bool(self.data.get("decommissioned"))

    def with_overrides(self, overrides: dict[str, Any]) -> Environment:
        return Environment(self.name, deep_merge(self.data, overrides), self.inventory, overrides)

    def has(self, path: str) -> bool:
        return self.raw(path, None) is not None

    def raw(self, path: str, default: Any = _MISSING) -> Any:
        """The merged value at a dotted path, references left unresolved."""
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                if (stored := self._provisioned_url(path)) is not None:
                    return stored
                if default is _MISSING:
                    raise self.missing(path)
                return default
            node = node[part]
        return node

    def _provisioned_url(self, path: str) -> Secret | None:
        """A Neon environment's URLs `inv provision` stored, where the inventory writes none (ops/neon_provision.py)."""
        if path not in PROVISIONED_URLS or (self.data.get("database") or {}).get("provider") != "neon":
            return None
        return self.secret_store().get(PROVISIONED_URLS[path])

    def value(self, path: str, default: Any = _MISSING) -> Any:
        """The value at a dotted path, references resolved (to Secrets) now."""
        return resolve(self.raw(path, default))

    def missing(self, path: str) -> InventoryError:
        return InventoryError(f"envs.{self.name}.{path}: required for this task but not set",
                              where=self.inventory.location(f"envs.{self.name}"),
                              hint=f"add {path} to envs.{self.name} in {self.inventory.file.name}")

    def database_url(self, *, direct: bool = True) -> Secret:
        """The app role's URL; admin work goes through the direct one (a pooler breaks advisory locks).

        A URL written without a password (`postgresql://app@host/db`) gets the one `inv provision`
        generated for the role, from the secret store, read at call time.
        """
        written = self._written_database_url(direct)

        password = self.secret_store().get("DATABASE_PASSWORD")
        if not password or urlsplit(written.reveal()).password is not None:
            return written
        return Secret(with_credentials(written.reveal(), password.reveal(), user=self.raw("database.role", None)))

    def database_name(self) -> str:
        """The app's database: `database.name`, else the one its direct URL names."""
        return self.raw("database.name", None) or parse_url(self.database_url(direct=True)).dbname

    def database_names(self) -> list[str] | str | None:
        """`database.names`: the databases each backup holds (a list, or "all"); None: the app's database alone."""
        names = self.raw("database.names", None)
        return names if names == "all" or names is None else [str(name) for name in names]

    def admin_url(self) -> Secret:
        """A role that may create roles and databases: `database.admin_url`, else the direct URL as written."""
        if self.has("database.admin_url"):
            return as_secret(self.value("database.admin_url"))
        if "url" not in (self.raw("database", {}) or {}) and self._provisioned_url("database.url") is not None:
            return self.database_url(direct=True)  # the role Neon made owns the database: it is the admin here
        return self._written_database_url(direct=True)

    def _written_database_url(self, direct: bool) -> Secret:
        if direct and self.has("database.direct_url"):
            return as_secret(self.value("database.direct_url"))
        written = as_secret(self.value("database.url"))
        return (direct_from_pooled(written) or written) if direct else written

    def storage_config(self, section: str = "storage") -> StorageConfig:
        """`storage` (the app's assets) or `backups` (dumps, audit, drills), inheriting connection settings."""
        if not self.has(section):
            raise self.missing(section)
        stored = self.stored_storage_keys()
        settings = self._section_settings(section, drop_keys=bool(stored) and section == "storage")
        if section == "storage":
            settings.update(stored)
        if section == "backups":
            inherited = {k: v for k, v in self._section_settings("storage", drop_keys=bool(stored)).items()
                         if k in {"provider", "endpoint", "region", "access_key_id", "secret_access_key", "path"}}
            if "access_key_id" not in self.raw("backups"):  # backups inherits the storage key: the rotated one
                inherited.update(stored)
            settings = {**inherited, **settings}
            if "bucket" not in settings:
                raise self.missing("backups.bucket")
        fields = {"provider", "bucket", "endpoint", "region", "access_key_id", "secret_access_key",
                  "path", "prefix", "public_base"}
        credentials = {"access_key_id", "secret_access_key"}
        values = {k: (v if k in credentials else plain(v)) for k, v in settings.items() if k in fields}
        values.setdefault("provider", "s3")
        if values["provider"] == "local" and "path" in values:
            values["path"] = str(self._relative_to_inventory(str(values["path"])))
        return StorageConfig(**values)

    def backup_copy_configs(self) -> dict[str, StorageConfig]:
        """`backups.copies` by name. What a copy leaves out is the backup bucket's: provider, endpoint,
        region and path always; its keys only when the copy is on the same service (one key pair, one account)."""
        copies = self.raw("backups.copies", None) or []
        names = [str(copy.get("name")) for copy in copies]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise InventoryError(f"envs.{self.name}.backups.copies: the name {duplicates[0]!r} is used twice",
                                 where=self.inventory.location(f"envs.{self.name}.backups.copies"),
                                 hint="give every copy its own name")
        primary = self.storage_config("backups") if copies else None
        return {name: self._copy_config(copy, primary) for name, copy in zip(names, copies, strict=True)}

    def _copy_config(self, copy: dict[str, Any], primary: StorageConfig | None) -> StorageConfig:
        assert primary is not None
        given = {k: v for k, v in resolve(copy).items() if k != "name"}
        credentials = {"access_key_id", "secret_access_key"}
        values: dict[str, Any] = {k: (v if k in credentials else plain(v)) for k, v in given.items()}
        for key in ("provider", "endpoint", "region", "path"):
            if key not in values and getattr(primary, key) is not None:
                values[key] = getattr(primary, key)
        same_service = (values.get("provider"), values.get("endpoint")) == (primary.provider, primary.endpoint)
        if same_service and not credentials & set(values):
            values.update(access_key_id=primary.access_key_id, secret_access_key=primary.secret_access_key)
        if values.get("provider") == "local" and "path" in given:
            values["path"] = str(self._relative_to_inventory(str(values["path"])))
        return StorageConfig(**values)

    def stored_storage_keys(self) -> dict[str, Secret]:
        """After a key rotation the secret store holds the storage key pair; it wins over the inventory's."""
        stored = self.secret_store().read()
        key_id, secret = stored.get("STORAGE_ACCESS_KEY_ID"), stored.get("STORAGE_SECRET_ACCESS_KEY")
        return {"access_key_id": key_id, "secret_access_key": secret} if key_id and secret else {}

    def _section_settings(self, section: str, *, drop_keys: bool) -> dict[str, Any]:
        # Keys replaced by the secret store are not resolved: their ${env:…} may be gone after a rotation.
        raw = self.raw(section, {})
        if drop_keys:
            raw = {k: v for k, v in raw.items() if k not in {"access_key_id", "secret_access_key"}}
        return resolve(raw)

    def host_configs(self, hosts: list[dict[str, Any]] | None = None) -> list[HostConfig]:
        """The app hosts (or `hosts` written the same way), the environment's `ssh` settings under their own."""
        ssh = plain(resolve(self.raw("ssh", {})))
        configs = []
        for host in plain(resolve(self.raw("hosts", []) if hosts is None else hosts)):
            key_file = host.get("key_file") or ssh.get("key_file")
            configs.append(HostConfig(
                name=host["name"], address=host["address"],
                user=host.get("user") or ssh.get("user") or "deploy",
                port=host.get("port") or ssh.get("port") or 22,
                key_filename=str(self._relative_to_inventory(key_file)) if key_file else None,
                connect_timeout=ssh.get("connect_timeout", 10),
                strict_host_keys=ssh.get("strict_host_keys", False),
                known_hosts=str(self.inventory.state_dir / KNOWN_HOSTS_FILE), env=self.name,
            ))
        return configs

    def database_log_host(self) -> HostConfig | None:
        """`database.log_host`: the database server over SSH (named `database` unless it says), or None."""
        host = self.raw("database.log_host", None)
        return self.host_configs([{"name": "database", **host}])[0] if host else None

    def app_settings(self, host_name: str | None = None) -> dict[str, Any]:
        """The app section, with one host's own `app` keys merged over it (step 3 of the order)."""
        app = self.raw("app", {})
        for host in self.raw("hosts", []):
            if host["name"] == host_name:
                app = deep_merge(app, host.get("app") or {})
        return app

    def register_secrets(self) -> None:
        """Resolve every secret of the environment (inventory references and the secret store), so
        redaction knows them all, even those this task never uses: logs and messages can carry any."""
        def walk(node: Any) -> None:
            if isinstance(node, dict | list):
                for value in node.values() if isinstance(node, dict) else node:
                    walk(value)
            elif isinstance(node, Reference):
                with contextlib.suppress(InventoryError):  # an unset variable: nothing to redact
                    node.resolve()  # a Secret registers its value with the redactor

        walk(self.data)
        with contextlib.suppress(OpsError):  # a store out of reach: none of its values reached us either
            self.secret_store().read()

    def masked(self) -> dict[str, Any]:
        return mask_tree(self.data)

    @property
    def store_kind(self) -> str:
        return str(self.raw("secrets.store", None) or DEFAULT_STORE)

    def secret_store(self, kind: str | None = None) -> Store:
        """Where opsbook keeps what it generates for this environment: `secrets.store` (or `kind`)."""
        kind = kind or self.store_kind
        settings = StoreSettings(kind=kind, state_dir=self.inventory.state_dir, env_name=self.name,
                                 project=self.inventory.project)
        if kind == "aws-sm":  # references resolved only for the store in use
            settings = replace(settings, aws=aws_settings(self.raw("secret_managers", {})),
                               aws_secret=plain(resolve(self.raw("secrets.aws_secret", None))))
        if kind == "kubernetes":  # the Secret the scheduled CronJobs read, unless secrets.kubernetes names another
            scheduled = {k: v for k, v in self.raw("schedule.kubernetes", {}).items() if k in {"namespace", "secret"}}
            settings = replace(settings, kubernetes={**scheduled, **resolve(self.raw("secrets.kubernetes", {}))})
        return open_store(settings)

    def _relative_to_inventory(self, path: str) -> Path:
        candidate = Path(os.path.expanduser(path))
        return candidate if candidate.is_absolute() else self.inventory.file.parent / candidate


def inventory_path(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("OPS_INVENTORY") or DEFAULT_FILE)


def load(path: str | Path | None = None) -> Inventory:
    file = inventory_path(str(path) if path else None)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise InventoryError(f"inventory file {file} not found", where=str(file),
                             hint="create inventory.yaml (see README) or set OPS_INVENTORY") from None
    except OSError as error:
        raise InventoryError(f"cannot read {file}: {error.strerror}", where=str(file)) from None
    data, lines = _parse_yaml(text, file)
    problems = validate(data, lines, file)
    if problems:
        raise InventoryError(f"{file} has {len(problems)} problem(s)", problems=problems,
                             hint="fix each line above, then run `inv inventory.check`")
    tree = _wrap_references(data, "", lines, file, _managers_by_scope(data, lines, file))
    return Inventory(file=file.resolve(), data=tree, lines=lines,
                     digest=hashlib.sha256(text.encode()).hexdigest()[:16])


def _parse_yaml(text: str, file: Path) -> tuple[Any, dict[str, int]]:
    data, lines = yaml_text.load(text, file)
    if not isinstance(data, dict):
        raise InventoryError("the inventory must be a mapping with `project` and `envs`", where=str(file))
    return data, lines


def validate(data: dict[str, Any], lines: dict[str, int], file: Path) -> list[str]:
    """Every problem at once, each as `dotted.path: message (line N)`."""
    problems = []
    for error in schema_errors(data):
        problems.extend(_describe(error, lines))
    problems.extend(_check_references(data, lines))
    problems.extend(_at(path, message, lines) for path, message in literal_url_problems(data))
    problems.extend(_at(path, message, lines) for path, message in duplicate_host_names(data))
    default_env = data.get("default_env")
    if default_env and isinstance(data.get("envs"), dict) and default_env not in data["envs"]:
        names = list(data["envs"])
        suggestion = _did_you_mean(str(default_env), names)
        problems.append(_at("default_env", f"names no environment ({default_env!r}); "
                            + (f"{suggestion} " if suggestion else "") + f"known environments: {', '.join(names)}",
                            lines))
    return sorted(set(problems), key=lambda p: (_line_of(p), p))


def _describe(error: Any, lines: dict[str, int]) -> list[str]:
    path = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extra = [key for key in error.instance if key not in allowed]
        return [_at(f"{path}.{key}" if path else key,
                    "unknown key" + (f"; {_did_you_mean(key, allowed)}" if _did_you_mean(key, allowed) else ""),
                    lines) for key in extra]
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return [_at(f"{path}.{missing}" if path else missing, "required", lines, fallback=path)]
    if "propertyNames" in error.schema_path:
        return [_at(f"{path}.{error.instance}", "environment names are lower-case letters, digits, - and _",
                    lines)]
    return [_at(path, error.message, lines)]


def _check_references(node: Any, lines: dict[str, int], path: str = "") -> list[str]:
    problems = []
    if isinstance(node, dict):
        for key, value in node.items():
            problems += _check_references(value, lines, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            problems += _check_references(value, lines, f"{path}.{index}")
    elif isinstance(node, str) and "${" in node:
        leftover = REFERENCE_PATTERN.sub("", node)
        if "${" in leftover:
            problems.append(_at(path, f"malformed reference; use {REFERENCE_FORMS}", lines))
        problems += [_at(path, message, lines) for message in manager_reference_problems(node)]
    return problems


def _at(path: str, message: str, lines: dict[str, int], fallback: str | None = None) -> str:
    line = lines.get(path) or (lines.get(fallback) if fallback else None)
    return f"{path}: {message}" + (f" (line {line})" if line else "")


def _line_of(problem: str) -> int:
    match = re.search(r"\(line (\d+)\)$", problem)
    return int(match[1]) if match else 0


def _did_you_mean(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def _managers_by_scope(data: dict[str, Any], lines: dict[str, int], file: Path) -> dict[str, dict[str, Any]]:
    """`secret_managers` of `defaults` (key "") and of each environment (defaults merged under it),
    its own references wrapped: what a reference in that scope resolves with."""
    defaults = (data.get("defaults") or {}).get("secret_managers") or {}
    scopes = {"": _wrap_references(defaults, "defaults.secret_managers", lines, file, {})}
    for name, env in (data.get("envs") or {}).items():
        own = (env or {}).get("secret_managers") or {}
        scopes[name] = _wrap_references(deep_merge(defaults, own), f"envs.{name}.secret_managers", lines, file, {})
    return scopes


def _wrap_references(node: Any, path: str, lines: dict[str, int], file: Path,
                     managers: dict[str, dict[str, Any]]) -> Any:
    if isinstance(node, dict):
        return {k: _wrap_references(v, f"{path}.{k}" if path else str(k), lines, file, managers)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_wrap_references(v, f"{path}.{i}", lines, file, managers) for i, v in enumerate(node)]
    key = path.rsplit(".", 1)[-1]
    if isinstance(node, str) and REFERENCE_PATTERN.search(node):
        line = lines.get(path)
        scope = path.split(".")[1] if path.startswith("envs.") else ""
        return Reference(node, path, f"{file.name}, line {line}" if line else file.name, managers.get(scope, {}))
    if isinstance(node, str) and ((key in SECRET_KEYS and _looks_secret(key, node)) or _MONITOR_URL.match(path)):
        return Secret(node)
    return node


def _looks_secret(key: str, value: str) -> bool:
    # A URL is only secret when it carries credentials or is a webhook (the URL is the credential).
    if key in {"url", "direct_url", "admin_url"}:
        return "@" in value or "hooks." in value or "/webhook" in value
    return True


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
