"""Inventory checks the JSON Schema cannot express: URLs that parse, host names unique per environment.

A URL written in the file is checked by `inv inventory.check` (and every load); one that comes from a
${env:…}/${file:…} reference is checked when the reference is resolved. Messages never quote the value:
database URLs and webhook URLs carry credentials.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ops.patterns import Pattern
from ops.pg_url import URL_SCHEMES as DATABASE_SCHEMES

_HTTP = ("https", "http")
# `section.key` (an environment's, the defaults', a host's `app`, a `notify` item's) -> accepted schemes
URL_KEYS: dict[str, tuple[str, ...]] = {
    "database.url": DATABASE_SCHEMES, "database.direct_url": DATABASE_SCHEMES,
    "database.admin_url": DATABASE_SCHEMES,
    "storage.endpoint": _HTTP, "storage.public_base": _HTTP, "backups.endpoint": _HTTP,
    "app.health_url": _HTTP, "app.ready_url": _HTTP, "app.public_url": _HTTP,
    "notify.url": _HTTP, "keys.endpoint": _HTTP, "keys.api_base": _HTTP, "monitor.url": _HTTP,
    "status_page.public_base": _HTTP,
    "database.api_base": _HTTP,
}
_SETTING = Pattern(r"^(?:defaults|envs\.[^.]+)\.(?:hosts\.\d+\.)?(?P<section>\w+)(?:\.\d+)?\.(?P<key>\w+)$")


def url_schemes(path: str) -> tuple[str, ...] | None:
    """The schemes the setting at dotted `path` accepts, or None when it holds no URL."""
    match = _SETTING.match(path)
    return URL_KEYS.get(f"{match['section']}.{match['key']}") if match else None


def url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    """Why `value` is not a usable URL of one of `schemes`, without quoting it; None when it is."""
    example = f"{schemes[0]}://USER@HOST/DB" if schemes == DATABASE_SCHEMES else f"{schemes[0]}://HOST/…"
    parts = urlsplit(value)
    if not parts.scheme or (not parts.netloc and not value.startswith(f"{parts.scheme}://")):
        return f"not a URL: no scheme (expected {example})"
    if any(character.isspace() for character in value):
        return f"not a URL: contains spaces (expected {example})"
    if parts.scheme.lower() not in schemes:
        return f"the scheme must be {' or '.join(f'{s}://' for s in schemes)} (expected {example})"
    if schemes == DATABASE_SCHEMES:
        return _database_host_problem(parts.netloc, parts.query, example)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname:
        return f"not a URL: no host (expected {example})"
    if port == -1 or port == 0:
        return f"the port must be a number from 1 to 65535 (expected {example})"
    return None


def _database_host_problem(netloc: str, query: str, example: str) -> str | None:
    hostport = netloc.rpartition("@")[2]
    if "," in hostport:
        return "lists several hosts; opsbook works on one server: give the primary's URL"
    host, port = hostport, ""
    if hostport.startswith("["):
        host, _, rest = hostport.partition("]")
        port = rest.removeprefix(":")
    elif ":" in hostport:
        host, _, port = hostport.partition(":")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        return f"the port must be a number from 1 to 65535 (expected {example})"
    if not host.strip("[]") and not dict(parse_qsl(query)).get("host"):
        return f"not a URL: no host (expected {example}, or ?host=/run/postgresql for a local socket)"
    return None


def literal_url_problems(data: Any) -> Iterator[tuple[str, str]]:
    """(dotted path, problem) for each URL written literally; values holding references wait until resolved."""
    for path, value in _leaves(data, ""):
        schemes = url_schemes(path)
        if schemes and isinstance(value, str) and "${" not in value:
            problem = url_problem(value, schemes)
            if problem:
                yield path, problem


def duplicate_host_names(data: Any) -> Iterator[tuple[str, str]]:
    """(dotted path, problem) for each host whose name an earlier host of the same list already has."""
    envs = data.get("envs") if isinstance(data.get("envs"), dict) else {}
    sections = [("defaults", data.get("defaults")), *((f"envs.{name}", env) for name, env in envs.items())]
    for prefix, section in sections:
        hosts = section.get("hosts") if isinstance(section, dict) else None
        seen: dict[str, int] = {}
        for index, host in enumerate(hosts if isinstance(hosts, list) else []):
            name = host.get("name") if isinstance(host, dict) else None
            if not isinstance(name, str):
                continue
            if name in seen:
                yield (f"{prefix}.hosts.{index}.name",
                       f"{name!r} is also the name of {prefix}.hosts.{seen[name]}; host names must be unique")
            else:
                seen[name] = index


def _leaves(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{path}.{index}")
    else:
        yield path, node
