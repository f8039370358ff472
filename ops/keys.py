"""Storage keys: the provider, the key in use, probing a key, key age, rotation records; admin password hashes.

The key in use is the one in the environment's secret store (STORAGE_ACCESS_KEY_ID /
STORAGE_SECRET_ACCESS_KEY, written by `inv provision` with a key provider and by
`inv keys.rotate`), else the inventory's storage credentials. A rotation in progress keeps
the new key as STORAGE_NEXT_* until it is switched in, then the old one as
STORAGE_PREVIOUS_* until it is revoked; provision keeps the inventory's key there the same
way, so that it is revoked once the apps serve with the key provision made.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import secrets as random_tokens
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ops import aws
from ops.clock import iso_z_or_none, parse_time_or_none
from ops.errors import CheckFailed, ConnectionFailed, InventoryError, OpsError
from ops.key_providers import (
    CLOUDFLARE_API,
    AwsIamProvider,
    CloudflareProvider,
    KeyInfo,
    KeyProvider,
    NewKey,
    StaticProvider,
)
from ops.lazy_dataclasses import dataclass
from ops.secrets import Secret, mask_identifier, redact, reveal
from ops.storage import open_storage
from ops.storage.s3 import S3Storage

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from ops.inventory import Environment
    from ops.output import Output
    from ops.secret_store import Store
    from ops.storage import Storage

__all__ = ["KeyInfo", "KeyProvider", "KeyStatus", "KnownKey", "NewKey", "current_key_id", "key_status", "known_keys",
           "probe_key", "provider_for", "store_admin_password_hash", "verify_admin_password"]

KEY_ID, SECRET = "STORAGE_ACCESS_KEY_ID", "STORAGE_SECRET_ACCESS_KEY"
NEXT_KEY_ID, NEXT_SECRET = "STORAGE_NEXT_ACCESS_KEY_ID", "STORAGE_NEXT_SECRET_ACCESS_KEY"
PREVIOUS_KEY_ID, PREVIOUS_SECRET = "STORAGE_PREVIOUS_ACCESS_KEY_ID", "STORAGE_PREVIOUS_SECRET_ACCESS_KEY"
DEFAULT_MAX_AGE_DAYS = 90
DEFAULT_PROBE_TIMEOUT_SECONDS = 30.0
PROBE_RETRY_SECONDS = 1.0
PROBE_PREFIX = ".opsbook-probe/"
HISTORY_OBJECT = "keys/rotations.json"
REFUSED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "403", "401",
                 "Forbidden", "Unauthorized"}
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LENGTH = 16384, 8, 1, 32
# Testing a key: few retries, since a refusal is the expected answer for a revoked one.
PROBE_SETTINGS = {"retries": {"max_attempts": 2}, "connect_timeout": 10, "read_timeout": 30,
                  "s3": {"addressing_style": "path"}}


# --- the secret store -------------------------------------------------------------


def secret_store(env: Environment) -> Store:
    """The store the environment's `secrets.store` names (ops/secret_stores.py)."""
    return env.secret_store()


def stored(env: Environment, name: str) -> Secret | None:
    """A secret store value; an empty one (as older rotations left) counts as unset."""
    value = secret_store(env).get(name)
    return value if value else None


def clear(env: Environment, *names: str) -> None:
    secret_store(env).delete(*names)


# --- the provider and the current key ----------------------------------------------


def provider_name(env: Environment) -> str:
    return str(env.raw("keys.provider", None) or "static")


def provider_for(env: Environment, *, log: Callable[[str], None] | None = None,
                 prompt: Callable[[str], str] | None = None,
                 credentials: Callable[[], tuple[str, Secret | None]] | None = None) -> KeyProvider:
    """The environment's key provider; aws-iam signs with `credentials` (default: the key in use)."""
    name = provider_name(env)
    if name == "cloudflare":
        missing = [path for path in ("keys.account_id", "keys.api_token") if not env.has(path)]
        if missing:
            raise env.missing(missing[0])
        return CloudflareProvider(str(reveal(env.value("keys.account_id"))), Secret(env.value("keys.api_token")),
                                  lambda: current_key_id(env),
                                  api_base=str(env.raw("keys.api_base", None) or CLOUDFLARE_API))
    if name == "aws-iam":
        if not env.has("keys.iam_user"):
            raise env.missing("keys.iam_user")
        return AwsIamProvider(str(reveal(env.value("keys.iam_user"))),
                              credentials or (lambda: current_credentials(env)), lambda: current_key_id(env),
                              endpoint=iam_endpoint(env), log=log, retired=lambda: retired_keys(env))
    return StaticProvider(env.storage_config("storage").bucket, prompt=prompt)


def iam_endpoint(env: Environment) -> str | None:
    """keys.endpoint, else the storage endpoint (S3-compatible services serving IAM there), else AWS."""
    if env.has("keys.endpoint"):
        return str(reveal(env.value("keys.endpoint")))
    return env.storage_config("storage").endpoint


def current_credentials(env: Environment) -> tuple[str, Secret | None]:
    config = env.storage_config("storage")  # the secret store's pair wins over the inventory's
    if not config.access_key_id:
        raise InventoryError(f"envs.{env.name}.storage.access_key_id: required to manage storage keys",
                             where=env.inventory.location(f"envs.{env.name}.storage"),
                             hint="set storage.access_key_id and storage.secret_access_key")
    return str(reveal(config.access_key_id)), config.secret_access_key


def current_key_id(env: Environment) -> str:
    """The key the environment uses now: secret store STORAGE_ACCESS_KEY_ID, else the inventory's."""
    return current_credentials(env)[0]


def inventory_credentials(env: Environment, section: str = "storage") -> tuple[str, Secret] | None:
    """The key pair the inventory itself gives `section`, or None: none given, or references that no
    longer resolve (a bootstrap key's ${env:…} may be gone once the secret store has the key)."""
    paths = (f"{section}.access_key_id", f"{section}.secret_access_key")
    if not all(env.has(path) for path in paths):
        return None
    try:
        key_id, secret = (env.value(path) for path in paths)
    except InventoryError:
        return None
    return str(reveal(key_id)), secret if isinstance(secret, Secret) else Secret(str(secret))


@dataclass(frozen=True)
class KnownKey:
    """A key pair of the environment: where it is kept, and the bucket (section) it opens."""

    key_id: str
    secret: Secret
    kept: str
    section: str = "storage"


def known_keys(env: Environment) -> list[KnownKey]:
    """Every key pair the environment has, each once: the secret store's (the key in use, then a rotation's
    new and old keys), then the inventory's own (storage, and backups when it has its own)."""
    store = secret_store(env).read()
    found = [KnownKey(store[id_name].reveal(), store[secret_name], f"the secret store's {what}")
             for id_name, secret_name, what in ((KEY_ID, SECRET, "key in use"), (NEXT_KEY_ID, NEXT_SECRET, "new key"),
                                                (PREVIOUS_KEY_ID, PREVIOUS_SECRET, "old key"))
             if store.get(id_name) and store.get(secret_name)]
    for section in ("storage", "backups"):
        pair = inventory_credentials(env, section) if env.has(section) else None
        if pair:
            found.append(KnownKey(pair[0], pair[1], f"the inventory's {section} key", section))
    unique: dict[str, KnownKey] = {}
    for key in found:
        unique.setdefault(key.key_id, key)
    return list(unique.values())


def retired_keys(env: Environment) -> set[str]:
    """Keys of this environment nothing uses any more: the inventory's storage key once the secret store's
    key replaced it (opsbook and every env file it writes use the store's), outside a rotation in progress."""
    if not env.stored_storage_keys() or stored(env, NEXT_KEY_ID) or stored(env, PREVIOUS_KEY_ID):
        return set()
    if not all(env.app_settings(host.name).get("env_file") for host in env.host_configs()):
        return set()  # an app opsbook does not write the env file of may still use the inventory's key
    bootstrap = inventory_credentials(env)
    return {bootstrap[0]} if bootstrap and bootstrap[0] != current_key_id(env) else set()


def label_prefix(env: Environment) -> str:
    return f"opsbook {env.inventory.project}/{env.name} storage"


def new_label(env: Environment) -> str:
    return f"{label_prefix(env)} {datetime.now(UTC).strftime('%Y-%m-%dT%H%M%SZ')}"


def fingerprint(key_id: str) -> str:
    return hashlib.sha256(key_id.encode()).hexdigest()[:16]


# --- probing ----------------------------------------------------------------------


def _storage_with(env: Environment, key_id: str, secret: Secret) -> Storage:
    config = dataclasses.replace(env.storage_config("storage"), access_key_id=key_id, secret_access_key=secret)
    return open_storage(config)


def probe_key(env: Environment, key_id: str, secret: Secret, *, timeout: float | None = None) -> None:
    """Head the bucket, then put, get and delete a probe object with this key; CheckFailed when it cannot.

    A new key can take a few seconds to reach every edge: refusals are retried until `timeout`
    (keys.probe_timeout, default 30 s).
    """
    storage = _storage_with(env, key_id, secret)
    if timeout is None:
        timeout = float(env.raw("keys.probe_timeout", DEFAULT_PROBE_TIMEOUT_SECONDS))
    deadline = time.monotonic() + timeout
    while True:
        try:
            _probe_once(storage)
            return
        except ConnectionFailed as error:
            if time.monotonic() + PROBE_RETRY_SECONDS > deadline:
                raise _probe_failed(key_id, error, timeout) from None
            time.sleep(PROBE_RETRY_SECONDS)  # retry interval while the new key propagates
        except OpsError as error:
            raise _probe_failed(key_id, error, None) from None


def _probe_failed(key_id: str, error: OpsError, waited: float | None) -> CheckFailed:
    after = f" (still after {waited:g} s)" if waited else ""
    return CheckFailed(f"the key {mask_identifier(key_id)} failed its probe{after}: {redact(error.message)}",
                       where=error.where, hint=error.hint)


def _probe_once(storage: Storage) -> None:
    if not storage.bucket_exists():
        raise CheckFailed(f"{storage.describe()}: the bucket does not exist", hint="fix storage.bucket")
    key = f"{PROBE_PREFIX}{random_tokens.token_hex(8)}"
    body = random_tokens.token_bytes(64)
    storage.put_bytes(key, body, content_type="application/octet-stream")
    try:
        if storage.get_bytes(key) != body:
            raise CheckFailed(f"{storage.describe()}: the probe object read back differs from what was written")
    finally:
        storage.delete(key)


def key_refused(env: Environment, key_id: str, secret: Secret, section: str = "storage") -> bool:
    """Whether the `section` bucket refuses this key (revoked or unknown); errors other than a refusal raise."""
    config = env.storage_config(section)
    client = aws.client("s3", endpoint=config.endpoint, region=S3Storage(config).region, access_key_id=key_id,
                        secret_access_key=secret.reveal(), settings=PROBE_SETTINGS)
    try:
        client.head_bucket(Bucket=config.bucket)
    except aws.ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in REFUSED_CODES:
            return True
        raise CheckFailed(f"bucket {config.bucket}: {code} while testing the key {mask_identifier(key_id)}",
                          hint=f"check {section}.bucket") from None
    except aws.BotoCoreError as error:
        raise ConnectionFailed(f"cannot reach {config.endpoint or 'S3'}: {redact(error)}",
                               hint="check storage.endpoint and the network") from None
    return False


# --- rotation records ----------------------------------------------------------------


def history_path(env: Environment) -> Path:
    return env.inventory.state_dir / "keys" / f"{env.name}.json"


def _entry_id(entry: dict[str, Any]) -> tuple[Any, ...]:
    return entry.get("kind"), entry.get("name"), entry.get("rotation_id"), entry.get("fingerprint")


def _merge(*lists: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for entries in lists:
        for entry in entries:
            merged[_entry_id(entry)] = entry
    return sorted(merged.values(), key=lambda e: str(e.get("at", "")))


def _read_local(env: Environment) -> list[dict[str, Any]] | None:
    try:
        return json.loads(history_path(env).read_text()).get("rotations", [])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return []


def _read_remote(storage: Storage) -> list[dict[str, Any]]:
    if storage.head(HISTORY_OBJECT) is None:
        return []
    try:
        return json.loads(storage.get_bytes(HISTORY_OBJECT)).get("rotations", [])
    except (ValueError, AttributeError):
        return []


def read_history(env: Environment) -> list[dict[str, Any]]:
    """Rotations recorded here, or (on another machine) in the backup bucket; oldest first."""
    local = _read_local(env)
    if local is not None or not env.has("backups"):
        return local or []

    with contextlib.suppress(OpsError):
        return _read_remote(open_storage(env.storage_config("backups")))
    return []


def record_rotation(env: Environment, entry: dict[str, Any]) -> None:
    """Adds `entry` to the local record and to the backup bucket's copy (both merged)."""
    remote: Storage | None = open_storage(env.storage_config("backups")) if env.has("backups") else None
    entries = _merge(_read_local(env) or [], _read_remote(remote) if remote else [], [entry])
    payload = json.dumps({"env": env.name, "rotations": entries}, indent=2).encode()
    path = history_path(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp-{os.getpid()}")
    temporary.write_bytes(payload)
    os.replace(temporary, path)
    if remote is not None:
        remote.put_bytes(HISTORY_OBJECT, payload, content_type="application/json")


def rotation_entry(env: Environment, key_id: str, previous_key_id: str | None, rotation_id: str | None,
                   operator: str) -> dict[str, Any]:
    return {"kind": "storage-key", "name": "storage", "rotation_id": rotation_id, "provider": provider_name(env),
            "key_id": mask_identifier(key_id), "fingerprint": fingerprint(key_id),
            "previous_key_id": mask_identifier(previous_key_id) if previous_key_id else None,
            "at": iso_z_or_none(datetime.now(UTC)), "operator": operator}




# --- status -----------------------------------------------------------------------


@dataclass
class KeyStatus:
    """How old an environment's storage key is and when it is due for rotation."""

    env: str
    provider: str
    key_id_masked: str
    created_at: datetime | None
    age_days: float | None
    max_age_days: int
    due_at: datetime | None
    last_rotation: datetime | None
    overdue: bool
    rotation_in_progress: bool
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"env": self.env, "provider": self.provider, "key_id": self.key_id_masked,
                "created_at": iso_z_or_none(self.created_at),
                "age_days": round(self.age_days, 1) if self.age_days is not None else None,
                "max_age_days": self.max_age_days, "due_at": iso_z_or_none(self.due_at),
                "last_rotation": iso_z_or_none(self.last_rotation), "overdue": self.overdue,
                "rotation_in_progress": self.rotation_in_progress, "notes": self.notes}

    def lines(self) -> list[str]:
        age = f"{self.age_days:.0f} days" if self.age_days is not None else "unknown"
        return [f"key {self.key_id_masked} ({self.provider}) on {self.env}",
                f"  created:       {iso_z_or_none(self.created_at) or 'unknown'}",
                f"  age:           {age} (rotate every {self.max_age_days} days)",
                f"  due:           {iso_z_or_none(self.due_at) or 'now (age unknown)'}"
                + ("  OVERDUE" if self.overdue else ""),
                f"  last rotation: {iso_z_or_none(self.last_rotation) or 'never recorded'}",
                *([f"  rotation in progress: `inv keys.rotate --env {self.env}` finishes it"]
                  if self.rotation_in_progress else []),
                *(f"  note: {note}" for note in self.notes)]


def key_status(env: Environment, now: datetime | None = None) -> KeyStatus:
    now = now or datetime.now(UTC)
    key_id = current_key_id(env)
    max_age = int(env.raw("keys.max_age_days", DEFAULT_MAX_AGE_DAYS))
    rotations = [e for e in read_history(env) if e.get("kind") == "storage-key"]
    last = parse_time_or_none(rotations[-1]["at"]) if rotations else None
    created, notes = _created_at(env, key_id)
    if created is None:  # the provider does not say: the rotation that installed this key does
        mine = [e for e in rotations if e.get("fingerprint") == fingerprint(key_id)]
        created = parse_time_or_none(mine[-1]["at"]) if mine else None
    if created is None:
        notes.append("the key's age is unknown: rotate it to start the clock")
    age = (now - created).total_seconds() / 86400 if created else None
    due = created + timedelta(days=max_age) if created else None
    in_progress = bool(stored(env, NEXT_KEY_ID) or stored(env, PREVIOUS_KEY_ID))
    return KeyStatus(env.name, provider_name(env), mask_identifier(key_id), created, age, max_age, due, last,
                     due is None or now >= due, in_progress, notes)


def _created_at(env: Environment, key_id: str) -> tuple[datetime | None, list[str]]:
    provider = provider_for(env)
    if provider.manual:
        return None, []
    try:
        info = provider.info(key_id)
    except OpsError as error:
        return None, [f"could not ask {provider.name} about the key: {redact(error.message)}"]
    if info is None:
        return None, [f"{provider.name} does not list the key in use {mask_identifier(key_id)}"]
    return info.created_at, []


# --- the admin password ------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


ADMIN_PASSWORD_HASH = "ADMIN_PASSWORD_HASH"
ADMIN_PASSWORD_BYTES = 18  # 24 characters


def store_admin_password_hash(password: Secret) -> str:
    """A salted scrypt hash: `scrypt$n=16384,r=8,p=1$<salt b64>$<hash b64>` (what the app verifies)."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.reveal().encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=SCRYPT_LENGTH)
    return f"scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def issue_admin_password(env: Environment, output: Output, heading: str) -> None:
    """A generated admin password, shown once on the terminal and kept only as its salted scrypt hash.

    Shown before the hash is stored: a password that takes effect has always been seen."""
    password = Secret(random_tokens.token_urlsafe(ADMIN_PASSWORD_BYTES))
    hashed = store_admin_password_hash(password)
    output.reveal_once(f"{heading} (shown once; put it in the team's password manager):", password)
    secret_store(env).set(ADMIN_PASSWORD_HASH, Secret(hashed))


def verify_admin_password(password: Secret, stored_hash: str) -> bool:
    try:
        scheme, parameters, salt, expected = stored_hash.split("$")
        settings = dict(part.split("=") for part in parameters.split(","))
        n, r, p = int(settings["n"]), int(settings["r"]), int(settings["p"])
        salt_bytes, expected_bytes = _unb64(salt), _unb64(expected)
    except (ValueError, KeyError):
        return False
    if scheme != "scrypt" or not expected_bytes:
        return False
    try:
        digest = hashlib.scrypt(reveal(password).encode(), salt=salt_bytes, n=n, r=r, p=p,
                                dklen=len(expected_bytes), maxmem=256 * 1024 * 1024)
    except (ValueError, MemoryError):  # parameters no scrypt accepts: not a hash we made
        return False
    return hmac.compare_digest(digest, expected_bytes)
