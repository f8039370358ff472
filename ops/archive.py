"""Decommissioning: the end-of-life archive of an environment, and the marker that retires it.

The archive is one tarball with everything needed to understand the environment later:

    repository.bundle          `git bundle --all` of app.repository (when it is a git checkout)
    runbooks/<name>.md         every runbook as its numbered checklist, built from the steps that ran
    inventory.masked.yaml      the inventory with every secret masked
    drills/<id>/report.md|json the drill reports
    audit/<run>.jsonl          the run journals (local ones and the bucket's audit/ copies)
    LISTING.txt                each member's size and sha256 (also uploaded beside the tarball)

The marker `<state>/decommissioned/<env>.json` (and `decommissioned.json` in the environment's backups
storage) makes ops.cli.environment() refuse the environment. No third-party library at import time:
ops/cli.py reads the marker on every task. tarfile (costly to import) only inside the two functions
that write and read the tarball.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops import yaml_text
from ops.errors import StepFailed
from ops.inventory import mask_tree
from ops.lazy_dataclasses import dataclass
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.storage import Storage

MARKER_DIR = "decommissioned"
MARKER_KEY = "decommissioned.json"
ARCHIVE_DIR = "archive/"
LISTING_NAME = "LISTING.txt"
GIT_TIMEOUT_SECONDS = 300


# --- the marker -----------------------------------------------------------------------------------


def marker_path(state_dir: Path, env_name: str) -> Path:
    return state_dir / MARKER_DIR / f"{env_name}.json"


def decommission_marker(state_dir: Path, env_name: str) -> dict[str, Any] | None:
    """The marker's content when the environment was decommissioned from this state dir, else None."""
    path = marker_path(state_dir, env_name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"at": "?", "problem": f"{path} is unreadable"}  # present but damaged: still refuse
    return data if isinstance(data, dict) else {"at": "?"}


def write_marker(state_dir: Path, env_name: str, record: dict[str, Any]) -> Path:
    path = marker_path(state_dir, env_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(path)
    return path


# --- the archive's members ------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One file of the archive: its name in the tarball and its bytes."""

    name: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def runbook_members(checklists: Mapping[str, str]) -> list[Member]:
    """Each runbook's checklist (name -> text, as runbooks.checklists gives them) as a member."""
    return [Member(f"runbooks/{name}.md", checklists[name].encode()) for name in sorted(checklists)]


def inventory_member(env: Environment) -> Member:
    masked = mask_tree(env.inventory.data)
    header = f"# {env.inventory.file.name} of {env.inventory.project}, secrets masked (archived with {env.name})\n"
    return Member("inventory.masked.yaml", (header + yaml_text.dump(masked)).encode())


def repository_member(repository: Path, scratch: Path) -> Member | None:
    """A `git bundle` of every ref of `repository`; None when it is not a git checkout."""
    probe = _git(repository, "rev-parse", "--is-inside-work-tree")
    if probe.returncode != 0 or probe.stdout.strip() != "true":
        return None
    bundle = scratch / "repository.bundle"
    made = _git(repository, "bundle", "create", str(bundle), "--all")
    if made.returncode != 0:
        raise StepFailed(f"git bundle of {repository} failed: {redact(made.stderr.strip()[-500:])}",
                         hint="check that the repository has at least one commit and is readable")
    try:
        return Member("repository.bundle", bundle.read_bytes())
    finally:
        bundle.unlink(missing_ok=True)


def _git(repository: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", "-C", str(repository), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as error:
        return subprocess.CompletedProcess(["git"], 1, "", str(error))


def stored_members(storage: Storage, prefix: str, folder: str) -> dict[str, Member]:
    """Every object under `prefix` of the backups storage, as members under `folder`/."""
    members = {}
    for info in storage.list(prefix):
        name = f"{folder}/{info.key[len(prefix):]}"
        members[name] = Member(name, storage.get_bytes(info.key))
    return members


def local_members(directory: Path, folder: str, pattern: str, keep: Any = None) -> dict[str, Member]:
    members = {}
    for path in sorted(directory.glob(pattern)) if directory.exists() else []:
        if path.is_file() and (keep is None or keep(path)):
            name = f"{folder}/{path.relative_to(directory).as_posix()}"
            members[name] = Member(name, path.read_bytes())
    return members


def journal_of(env_name: str) -> Any:
    """A filter for local journals: those of runs on `env_name` (their header says so)."""
    def keep(path: Path) -> bool:
        try:
            first = path.read_text(encoding="utf-8").split("\n", 1)[0]
            return json.loads(first).get("env") == env_name
        except (OSError, ValueError, AttributeError):
            return False

    return keep


# --- the tarball ----------------------------------------------------------------------------------


def listing_text(members: list[Member]) -> str:
    """`sha256  size  name` per member, as `sha256sum -c` almost reads it."""
    return "".join(f"{m.sha256}  {len(m.data):>12}  {m.name}\n" for m in members)


def write_tarball(members: list[Member], path: Path) -> tuple[str, int]:
    """A gzip tarball of `members` plus LISTING.txt; (sha256, size) of the file written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    import tarfile

    everything = [*members, Member(LISTING_NAME, listing_text(members).encode())]
    with tarfile.open(temporary, "w:gz") as tar:
        for member in everything:
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime, info.mode = len(member.data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(member.data))
    temporary.replace(path)
    return file_sha256(path), path.stat().st_size


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_listing(tarball: Path) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of each member, recomputed from the tarball itself."""
    import tarfile

    listed = []
    with tarfile.open(tarball, "r:gz") as tar:
        for info in tar.getmembers():
            handle = tar.extractfile(info)
            data = handle.read() if handle else b""
            listed.append((info.name, len(data), hashlib.sha256(data).hexdigest()))
    return listed
