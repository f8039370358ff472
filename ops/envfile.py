"""The app's env file (KEY=VALUE): rendered from ops/templates/app.env.j2, parsed, diffed with secrets masked.

Values come from the inventory and, where present, from the environment's secret
store (`<state>/secrets/<env>.env`), which wins: after provisioning or a rotation
the store holds the current database password, storage key and app secrets.
Rendering reads everything at call time, so a value changed a moment ago is the
value written.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ops.errors import InventoryError
from ops.hosts import is_loopback
from ops.inventory import resolve
from ops.patterns import Pattern
from ops.pg_url import direct_from_pooled, with_credentials
from ops.render import template_environment, templates_dir
from ops.secrets import MASK, Secret, mask_url_passwords, redact, reveal

if TYPE_CHECKING:
    from ops.inventory import Environment

TEMPLATE_NAME = "app.env.j2"

# Secret store keys that override the inventory (contract A).
DATABASE_PASSWORD = "DATABASE_PASSWORD"
STORAGE_ACCESS_KEY_ID = "STORAGE_ACCESS_KEY_ID"
STORAGE_SECRET_ACCESS_KEY = "STORAGE_SECRET_ACCESS_KEY"
AUTH_SECRET = "AUTH_SECRET"
ADMIN_PASSWORD_HASH = "ADMIN_PASSWORD_HASH"

KEY_NAME = Pattern(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_NAME = Pattern(r"SECRET|PASSWORD|PASSWD|TOKEN|KEY|HASH|PRIVATE|CREDENTIAL|SALT", re.IGNORECASE)
# Written bare: no spaces, quotes, `#` (comment), `$` (dotenv-expand) or backslashes.
_BARE_VALUE = Pattern(r"[A-Za-z0-9_@%+=:,./~^!?*&<>()\[\]{}|-]*")
_DOUBLE_QUOTED_ESCAPE = Pattern(r"\\(.)", re.DOTALL)
_DOUBLE_QUOTED_MEANING = {"n": "\n", "r": "\r", "t": "\t"}
SHOWN_LENGTH_LIMIT = 200  # longer values are described, not shown: a plan is read by people


# --- rendering -----------------------------------------------------------------------------


def render_env_file(env: Environment, host_name: str | None = None) -> str:
    """The env file for `host_name` (its own `app.env` keys merged over the environment's)."""
    return render_template_text(_template_source(), env_file_context(env, host_name))


def render_template_text(source: str, context: dict[str, Any]) -> str:
    """Render `source` with StrictUndefined, tidied (see _tidy); the file ends with a newline."""
    jinja = template_environment(trim_blocks=False, filters={"dotenv": quote_value})
    text = jinja.from_string(source).render(**context)
    return _tidy(text)


def _template_source() -> str:
    return (templates_dir() / TEMPLATE_NAME).read_text(encoding="utf-8")


def _tidy(text: str) -> str:
    """Lines without trailing spaces; blank lines only before a comment block (skipped values leave gaps)."""
    lines: list[str] = []
    for line in (raw.rstrip() for raw in text.splitlines()):
        if not line:
            continue
        if line.startswith("#") and lines and not lines[-1].startswith("#"):
            lines.append("")
        lines.append(line)
    return "\n".join(lines) + "\n"


def env_file_context(env: Environment, host_name: str | None = None) -> dict[str, Any]:
    """What the template sees: plain strings (real values) or None for what is not configured."""
    stored = env.secret_store().read()
    app = env.app_settings(host_name)
    return {
        "project": env.inventory.project,
        "env_name": env.name,
        "host": host_name,
        "database": _database_values(env, stored),
        "storage": _storage_values(env, stored),
        "auth_secret": _stored(stored, AUTH_SECRET),
        "admin_password_hash": _stored(stored, ADMIN_PASSWORD_HASH),
        "app_env": _app_env(env, app.get("env") or {}, host_name),
    }


def _stored(stored: dict[str, Secret], key: str) -> str | None:
    value = stored.get(key)
    return value.reveal() if value else None


def _database_values(env: Environment, stored: dict[str, Secret]) -> dict[str, str | None]:
    """DATABASE_URL (pooled when there is a pooler) and DIRECT_URL: the written one, else the one behind a Neon
    pooler's URL (ops.pg_url.direct_from_pooled), as opsbook's own admin work uses."""
    if not env.has("database.url"):
        return {"url": None, "direct_url": None}
    password = stored.get(DATABASE_PASSWORD)
    role = env.raw("database.role", None)
    written = str(reveal(env.value("database.url")))
    derived = direct_from_pooled(written)
    direct = str(reveal(env.value("database.direct_url"))) if env.has("database.direct_url") \
        else derived.reveal() if derived else None
    pooled = direct is not None and direct != written

    def url(value: str | None, *, pool: bool) -> str | None:
        if value is None:
            return None
        if password:
            value = with_credentials(value, password.reveal(), user=role)
        value = with_connection_parameters(value, require_tls=not env.sandbox, pooled=pool)
        Secret(value)  # the assembled URL is a secret too: register it for redaction
        return value

    return {"url": url(written, pool=pooled), "direct_url": url(direct, pool=False)}


def with_connection_parameters(url: str, *, require_tls: bool, pooled: bool) -> str:
    """The app's URL as the runbook wants it: `sslmode=require` off the machine (a loopback or
    socket connection has nothing to encrypt), `pgbouncer=true` on the pooled URL (Prisma then
    avoids the prepared statements a transaction pooler breaks). Parameters already written win."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    written = dict(query)
    if require_tls and not is_loopback(parts.hostname):
        query.setdefault("sslmode", "require")
    if pooled:
        query.setdefault("pgbouncer", "true")
    if query == written:
        return url  # as written, byte for byte
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def _storage_values(env: Environment, stored: dict[str, Secret]) -> dict[str, str | None] | None:
    """S3_* values; None when there is no S3-compatible storage (a local folder bucket has no endpoint)."""
    if not env.has("storage"):
        return None
    config = env.storage_config("storage")
    if config.provider == "local":
        return None
    key_id = stored.get(STORAGE_ACCESS_KEY_ID) or config.access_key_id
    secret = stored.get(STORAGE_SECRET_ACCESS_KEY) or config.secret_access_key
    region = config.region or ("auto" if config.provider == "r2" else None)
    return {
        "endpoint": config.endpoint, "region": region, "bucket": config.bucket,
        "access_key_id": reveal(key_id) if key_id else None,
        "secret_access_key": reveal(secret) if secret else None,
        "public_base": config.public_base,
    }


def _app_env(env: Environment, values: dict[str, Any], host_name: str | None) -> dict[str, str]:
    where = f"envs.{env.name}" + (f".hosts[{host_name}]" if host_name else "") + ".app.env"
    rendered: dict[str, str] = {}
    for key, value in resolve(values).items():
        if not KEY_NAME.fullmatch(str(key)):
            raise InventoryError(f"{where}.{key}: not a valid variable name",
                                 where=env.inventory.location(f"envs.{env.name}.app.env"),
                                 hint="use letters, digits and underscores, not starting with a digit")
        rendered[str(key)] = _as_text(value)
    return rendered


def _as_text(value: Any) -> str:
    if isinstance(value, bool):  # YAML true/false → the spelling apps expect
        return "true" if value else "false"
    return str(reveal(value))


def quote_value(value: Any) -> str:
    """A value as the right-hand side of KEY=VALUE that dotenv and our parser read back unchanged."""
    text = _as_text(value)
    if _BARE_VALUE.fullmatch(text):
        return text
    if "'" not in text and "\n" not in text and "\r" not in text:
        return f"'{text}'"  # single quotes: literal, no escapes, no expansion
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


# --- parsing -------------------------------------------------------------------------------


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines; blank lines, comments, `export ` and quotes as dotenv reads them. Later keys win."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = _parse_value(value.strip())
    return values


def _parse_value(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return _DOUBLE_QUOTED_ESCAPE.sub(lambda m: _DOUBLE_QUOTED_MEANING.get(m[1], m[1]), value[1:-1])
    comment = value.find(" #")
    return value[:comment].rstrip() if comment >= 0 else value


# --- diff ----------------------------------------------------------------------------------


def is_secret_key(key: str) -> bool:
    return bool(SECRET_NAME.search(key))


def masked_diff(old: str | None, new: str) -> list[str]:
    """What changes between two env files, one line per key; secret values never shown.

    `+ KEY=value` added, `- KEY` removed, `~ KEY: old → new` changed; a secret-looking
    key shows `***` or just "changed", a URL shows with its password masked.
    """
    before = parse_env_file(old) if old is not None else {}
    after = parse_env_file(new)
    lines = [] if old is not None else ["(new file)"]
    for key, value in after.items():
        if key not in before:
            lines.append(f"+ {key}={_shown(key, value)}")
        elif before[key] != value:
            lines.append(f"~ {key}: {_changed(key, before[key], value)}")
    lines += [f"- {key}" for key in before if key not in after]
    if old is not None and len(lines) == 0 and old != new:
        lines.append("(comments or formatting only)")
    return lines


def _shown(key: str, value: str) -> str:
    if is_secret_key(key):
        return MASK if value else ""
    if len(value) > SHOWN_LENGTH_LIMIT:
        return f"<{len(value)} characters>"
    # Mask a URL's password ourselves first: the whole URL may be a known secret, and then
    # redact() would hide the user, host and database that the operator needs to see.
    value = mask_url_passwords(value)
    return redact(value).replace("\n", "\\n")


def _changed(key: str, old: str, new: str) -> str:
    if is_secret_key(key):
        return "changed"
    shown_old, shown_new = _shown(key, old), _shown(key, new)
    if shown_old == shown_new:
        return "changed (credentials)"
    return f"{shown_old} → {shown_new}"
