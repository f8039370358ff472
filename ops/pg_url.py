"""PostgreSQL connection URLs: one parser for psycopg and for child processes (no driver needed).

Connection details come from one parser (`connection_params`) so that psycopg and child processes
(pg_dump, pg_restore, psql) reach the same server with the same credentials. Child processes get them
through libpq environment variables, never on a command line, where `ps` would show the password.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from ops.errors import InventoryError
from ops.lazy_dataclasses import dataclass
from ops.secrets import Secret, reveal

DEFAULT_PORT = 5432
URL_SCHEMES = ("postgresql", "postgres")
URL_EXAMPLE = "postgresql://USER:PASSWORD@HOST:5432/DBNAME?sslmode=require"

# libpq keyword -> environment variable (libpq docs, "Environment Variables").
ENVIRONMENT_VARIABLES: dict[str, str] = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE",
    "user": "PGUSER", "password": "PGPASSWORD", "passfile": "PGPASSFILE",
    "require_auth": "PGREQUIREAUTH", "channel_binding": "PGCHANNELBINDING", "service": "PGSERVICE",
    "options": "PGOPTIONS", "application_name": "PGAPPNAME", "sslmode": "PGSSLMODE",
    "requiressl": "PGREQUIRESSL", "sslnegotiation": "PGSSLNEGOTIATION",
    "sslcompression": "PGSSLCOMPRESSION", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY",
    "sslcertmode": "PGSSLCERTMODE", "sslrootcert": "PGSSLROOTCERT", "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR", "sslsni": "PGSSLSNI", "requirepeer": "PGREQUIREPEER",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION", "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME", "gsslib": "PGGSSLIB", "gssdelegation": "PGGSSDELEGATION",
    "connect_timeout": "PGCONNECT_TIMEOUT", "client_encoding": "PGCLIENTENCODING",
    "target_session_attrs": "PGTARGETSESSIONATTRS", "load_balance_hosts": "PGLOADBALANCEHOSTS",
}
# libpq keywords with no environment variable: psycopg gets them, child processes do not.
CONNECTION_ONLY_KEYWORDS = frozenset({
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
    "tcp_user_timeout", "sslpassword", "fallback_application_name",
})
# pg_dump would otherwise wait forever on a black-holed address.
CHILD_DEFAULT_CONNECT_TIMEOUT = "10"
# Neon's connection pooler: the endpoint's first host label with this suffix (Neon docs, "Connection pooling").
NEON_POOLER_SUFFIX = "-pooler"


# --- URLs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseTarget:
    """Where a URL points, without its password: safe in messages and journals."""

    host: str
    port: int
    dbname: str
    user: str

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}/{self.dbname}"


def connection_params(url: Secret | str) -> dict[str, str]:
    """libpq keywords for `url`; host, port, user and dbname always present.

    Query parameters libpq does not know (Prisma's `schema`, `connection_limit`,
    `pgbouncer`...) are dropped: libpq would refuse the whole URL because of them.
    """
    text = reveal(url)
    parts = urlsplit(text)
    if parts.scheme not in URL_SCHEMES:
        raise InventoryError(
            f"database URL must start with postgresql:// (got scheme {parts.scheme or 'none'!r})",
            hint=f"write it as {URL_EXAMPLE}",
        )
    params = _netloc_params(parts.netloc)
    if parts.path.strip("/"):
        params["dbname"] = unquote(parts.path.lstrip("/"))
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ENVIRONMENT_VARIABLES or key in CONNECTION_ONLY_KEYWORDS:
            params[key] = value
    params.setdefault("host", "localhost")
    params.setdefault("port", str(DEFAULT_PORT))
    params.setdefault("user", getpass.getuser())
    params.setdefault("dbname", params["user"])
    _check_port(params["port"])
    return params


def _netloc_params(netloc: str) -> dict[str, str]:
    userinfo, _, hostport = netloc.rpartition("@")
    params: dict[str, str] = {}
    if userinfo:
        user, has_password, password = userinfo.partition(":")
        if user:
            params["user"] = unquote(user)
        if has_password:
            params["password"] = unquote(password)
    if "," in hostport:
        raise InventoryError(
            "database URL lists several hosts; opsbook needs the one primary to work on",
            hint="use the primary's (direct) URL for admin work",
        )
    if hostport.startswith("["):  # IPv6 literal: [::1]:5432
        host, _, rest = hostport[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = hostport.partition(":")
    if host:
        params["host"] = unquote(host)
    if port:
        params["port"] = port
    return params


def _check_port(port: str) -> None:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InventoryError(f"database URL has an invalid port {port!r}", hint=f"write it as {URL_EXAMPLE}")


def parse_url(url: Secret | str) -> DatabaseTarget:
    params = connection_params(url)
    return DatabaseTarget(
        host=params["host"], port=int(params["port"]), dbname=params["dbname"], user=params["user"]
    )


def with_database(url: Secret | str, dbname: str) -> Secret:
    """The same server and credentials, another database."""
    connection_params(url)  # validate before rebuilding
    parts = urlsplit(reveal(url))
    query = [(key, dbname if key == "dbname" else value)
             for key, value in parse_qsl(parts.query, keep_blank_values=True)]
    rebuilt = parts._replace(path="/" + quote(dbname, safe=""), query="&".join(
        f"{quote(key, safe='')}={quote(value, safe='')}" for key, value in query))
    return Secret(urlunsplit(rebuilt))


def with_credentials(url: str, password: str, *, user: str | None = None) -> str:
    """`url` with its password (and user, when given) replaced; both percent-encoded."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        hostport = parts.netloc
    current_user = userinfo.partition(":")[0] if at else ""
    name = quote(user, safe="") if user else current_user
    if not name:
        raise InventoryError("database.url has no user to go with the stored DATABASE_PASSWORD",
                             hint="put the role in the URL (postgresql://ROLE@host/db) or set database.role")
    netloc = f"{name}:{quote(password, safe='')}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def direct_from_pooled(url: Secret | str) -> Secret | None:
    """The direct URL behind a Neon pooled one (`ep-x-pooler.region.aws.neon.tech` -> `ep-x.region...`),
    or None when `url` is not a pooler's. Admin work needs the direct endpoint: a transaction pooler
    breaks advisory locks and session settings. Prisma's `pgbouncer` parameter is dropped with it."""
    connection_params(url)  # validate first
    parts = urlsplit(reveal(url))
    host = parts.hostname or ""
    label, dot, _ = host.partition(".")
    if not label.endswith(NEON_POOLER_SUFFIX) or label == NEON_POOLER_SUFFIX:
        return None
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo}{at}{hostport.replace(label + dot, label.removesuffix(NEON_POOLER_SUFFIX) + dot, 1)}"
    query = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if key != "pgbouncer"]
    rebuilt = parts._replace(netloc=netloc, query="&".join(
        f"{quote(key, safe='')}={quote(value, safe='')}" for key, value in query))
    return Secret(urlunsplit(rebuilt))


def libpq_environment(url: Secret | str) -> dict[str, str]:
    """PG* variables for a child process (pg_dump, psql...). Values include the password:
    give them to subprocess `env=`, never log them."""
    environment = {
        ENVIRONMENT_VARIABLES[key]: value
        for key, value in connection_params(url).items()
        if key in ENVIRONMENT_VARIABLES
    }
    environment.setdefault("PGCONNECT_TIMEOUT", CHILD_DEFAULT_CONNECT_TIMEOUT)
    environment.setdefault("PGAPPNAME", "opsbook")
    return environment


def child_environment(url: Secret | str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) without inherited PG* settings, plus those of `url`.

    An operator's own PGHOST/PGSSLMODE/PGSERVICE... must not redirect a child process."""
    inherited = os.environ if base is None else base
    clean = {key: value for key, value in inherited.items() if not key.startswith("PG")}
    return clean | libpq_environment(url)
