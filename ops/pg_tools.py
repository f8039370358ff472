"""PostgreSQL client tools (pg_dump, pg_restore, psql): found by version on this machine, and the pure
builders of their command lines (connection details go through the environment, ops/pg_url.py)."""

from __future__ import annotations

import glob
import os
import subprocess
from collections.abc import Sequence
from functools import lru_cache

from ops.errors import CheckFailed
from ops.lazy_dataclasses import dataclass
from ops.patterns import Pattern

CLIENT_TOOL_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu (postgresql-client-N)
    "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew, Apple silicon
    "/usr/local/opt/postgresql@*/bin",  # Homebrew, Intel
    "/opt/homebrew/opt/libpq/bin",
    "/usr/local/opt/libpq/bin",
    "/usr/pgsql-*/bin",  # PGDG RPMs
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)
DEBIAN_VERSION_DIRS = CLIENT_TOOL_GLOBS[0]
# Debian's /usr/bin/pg_dump & co.: a Perl script that runs one of /usr/lib/postgresql/*/bin's tools;
# probing it costs a Perl start-up (0.1-0.4 s) per tool and finds nothing those dirs lack.
DEBIAN_WRAPPER = "pg_wrapper"
_TOOL_VERSION = Pattern(r"\(PostgreSQL\)\s+(?P<major>\d+)(?P<rest>(?:\.\d+)*[A-Za-z0-9]*)")



# --- client tools ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTool:
    """A PostgreSQL client tool found on this machine, with its version."""

    name: str
    path: str
    major: int
    version: str


def parse_tool_version(text: str) -> tuple[int, str] | None:
    """(major, version) from `pg_dump --version` output: 'pg_dump (PostgreSQL) 15.14 (Debian…)'."""
    match = _TOOL_VERSION.search(text)
    if match is None:
        return None
    return int(match["major"]), match["major"] + match["rest"]


def client_search_dirs() -> list[str]:
    """Where find_client_tool looks by default, in order: OPS_PG_BIN, known install dirs, PATH."""
    dirs = _operator_dirs()
    for pattern in CLIENT_TOOL_GLOBS:
        dirs += sorted(glob.glob(pattern))
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    return dirs


def _operator_dirs() -> list[str]:
    value = os.environ.get("OPS_PG_BIN", "")
    return [os.path.normpath(directory) for directory in value.split(os.pathsep) if directory]


def find_client_tool(name: str, server_major: int, search_dirs: list[str] | None = None) -> ClientTool:
    """The newest `name` (pg_dump, pg_restore, psql) whose major version >= server_major.

    A tool in OPS_PG_BIN that fits wins: the operator chose it. `search_dirs`, when
    given, replaces the whole default search (OPS_PG_BIN included).
    """
    preferred = _operator_dirs() if search_dirs is None else []
    found = _installed_tools(name, client_search_dirs() if search_dirs is None else search_dirs)
    fitting = [tool for tool in found if tool.major >= server_major]
    chosen = [tool for tool in fitting if os.path.dirname(tool.path) in preferred] or fitting
    if chosen:
        return max(chosen, key=lambda tool: tool.major)  # max keeps the first of equals: search order
    raise _no_fitting_tool(name, server_major, found)


def _installed_tools(name: str, dirs: list[str]) -> list[ClientTool]:
    tools: list[ClientTool] = []
    seen: set[str] = set()
    wrapped = set(glob.glob(DEBIAN_VERSION_DIRS))
    versioned = bool(wrapped) and wrapped <= set(dirs)  # every dir the wrapper could pick is searched
    for directory in dirs:
        path = os.path.join(directory, name)
        real = os.path.realpath(path)
        if real in seen or not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        if versioned and os.path.basename(real) == DEBIAN_WRAPPER:
            continue
        seen.add(real)
        probed = _probe_version(path, os.stat(path).st_mtime)
        if probed is not None:
            tools.append(ClientTool(name=name, path=path, major=probed[0], version=probed[1]))
    return tools


@lru_cache(maxsize=64)
def _probe_version(path: str, mtime: float) -> tuple[int, str] | None:
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_tool_version(result.stdout) if result.returncode == 0 else None


def _no_fitting_tool(name: str, server_major: int, found: list[ClientTool]) -> CheckFailed:
    listing = ", ".join(f"{tool.name} {tool.version} at {tool.path}" for tool in found)
    seen = f"found only: {listing}" if found else f"no {name} found at all"
    return CheckFailed(
        f"the server runs PostgreSQL {server_major} and {name} needs a client of version "
        f"{server_major} or newer; {seen}",
        hint=(f"install the PostgreSQL {server_major} client: Debian/Ubuntu: add the PGDG apt "
              f"repository (https://wiki.postgresql.org/wiki/Apt), then apt-get install "
              f"postgresql-client-{server_major}; macOS: brew install postgresql@{server_major}; "
              f"or set OPS_PG_BIN to a directory holding {name} {server_major} or newer"),
    )


# --- command builders (pure) -----------------------------------------------------------------


def _tool_path(tool: ClientTool | str) -> str:
    return tool.path if isinstance(tool, ClientTool) else tool


def table_pattern(qualified: str) -> str:
    """A pg_dump pattern matching exactly the table "schema.table": each part double-quoted, so case,
    dots and the pattern characters * ? inside a name are taken literally."""
    schema, _, table = qualified.partition(".")
    return ".".join('"' + part.replace('"', '""') + '"' for part in (schema, table))


def dump_command(tool: ClientTool | str, *, snapshot: str | None = None, compress: int = 0,
                 jobs: int | None = None, output: str | None = None,
                 exclude_table_data: Sequence[str] = ()) -> list[str]:
    """pg_dump argv; the connection comes from libpq_environment().

    Custom format on stdout by default (for streaming). `jobs` needs the directory
    format, so it needs `output` (a directory). `exclude_table_data` ("schema.table" names):
    those tables' definitions are kept, their rows left out.
    """
    if not 0 <= compress <= 9:
        raise ValueError(f"compress must be 0-9, got {compress}")
    if jobs is not None and output is None:
        raise ValueError("pg_dump --jobs needs the directory format: pass output=DIRECTORY")
    command = [_tool_path(tool), "--no-password", f"--compress={compress}"]
    if jobs is not None:
        command += ["--format=directory", f"--jobs={jobs}"]
    else:
        command.append("--format=custom")
    if snapshot is not None:
        command.append(f"--snapshot={snapshot}")
    if output is not None:
        command.append(f"--file={output}")
    command += [f"--exclude-table-data={table_pattern(name)}" for name in exclude_table_data]
    return command


def restore_command(tool: ClientTool | str, *, dbname: str, archive: str | None = None,
                    jobs: int | None = None, no_owner: bool = False) -> list[str]:
    """pg_restore argv into `dbname` (on the server of libpq_environment()).

    Reads stdin without `archive`; `jobs` needs a seekable archive file.
    """
    if jobs is not None and archive is None:
        raise ValueError("pg_restore --jobs cannot read stdin: pass archive=PATH")
    command = [_tool_path(tool), "--no-password", "--exit-on-error", f"--dbname={dbname}"]
    if jobs is not None:
        command.append(f"--jobs={jobs}")
    if no_owner:
        command += ["--no-owner", "--no-acl"]
    if archive is not None:
        command.append(archive)
    return command
