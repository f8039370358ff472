"""Host keys: opsbook's own known-hosts file and the policy every SSH connection follows.

The default is what OpenSSH calls `StrictHostKeyChecking accept-new`: a host's key is recorded on first
contact in `known_hosts` under the state directory (OpenSSH format, `[address]:port` names), and a key
that differs from the one on record there or in ~/.ssh/known_hosts (checked first, as ssh does) is
refused, naming both fingerprints and how to accept a legitimate change (`inv hosts.forget`).
`strict_host_keys: true` refuses unknown keys too: the key must be in either file beforehand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops.errors import ConnectionFailed
from ops.lazy_dataclasses import dataclass
from ops.output import Output

if TYPE_CHECKING:
    from paramiko import PKey, SSHClient

    from ops.hosts import HostConfig

FILE_NAME = "known_hosts"
USER_FILE = "~/.ssh/known_hosts"
_WRITING = threading.Lock()  # rolling restarts connect to several hosts at once


@dataclass(frozen=True)
class KnownKey:
    """A host key: its type and its SHA256 fingerprint."""

    key_type: str
    fingerprint: str

    def describe(self) -> str:
        return f"{self.key_type} {self.fingerprint}"


def host_key_name(address: str, port: int) -> str:
    """The name known_hosts files (and paramiko) use for a host: `address`, or `[address]:port`."""
    return address if port == 22 else f"[{address}]:{port}"


def fingerprint(blob: bytes) -> str:
    """SHA256:… of a public key blob, as `ssh-keygen -l` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def describe_key(key: PKey) -> str:
    return KnownKey(key.get_name(), fingerprint(key.asbytes())).describe()


def user_file() -> Path:
    return Path(os.path.expanduser(USER_FILE))


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):  # a hashed name (HashKnownHosts)
        try:
            salt, digest = (base64.b64decode(part) for part in pattern[3:].split("|", 1))
        except ValueError:
            return False
        return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)
    return pattern == name


def _entry(line: str) -> tuple[list[str], str, str] | None:
    """(names, key type, base64 key) of a known_hosts line; None for comments, markers and junk."""
    fields = line.split()
    if len(fields) < 3 or fields[0].startswith(("#", "@")):
        return None
    return fields[0].split(","), fields[1], fields[2]


def keys_for(path: Path, name: str) -> list[KnownKey]:
    """The keys `path` holds for `name`."""
    try:
        lines = path.read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for line in lines:
        entry = _entry(line)
        if entry and any(_name_matches(pattern, name) for pattern in entry[0]):
            try:
                found.append(KnownKey(entry[1], fingerprint(base64.b64decode(entry[2]))))
            except ValueError:
                continue
    return found


def record(path: Path, name: str, key: PKey) -> bool:
    """Append `name`'s key to `path`; False when it was there already (another thread got there first)."""
    with _WRITING:
        recorded = keys_for(path, name)
        if any(known.fingerprint == fingerprint(key.asbytes()) for known in recorded):
            return False
        if recorded:
            raise _Changed(path, recorded[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{name} {key.get_name()} {key.get_base64()}\n")
        return True


def forget(path: Path, name: str) -> list[KnownKey]:
    """Remove `name`'s keys from `path` (other names and comments stay); the keys removed."""
    removed = keys_for(path, name)
    if not removed:
        return []
    kept = []
    for line in path.read_text().splitlines():
        entry = _entry(line)
        if entry is None or not any(_name_matches(pattern, name) for pattern in entry[0]):
            kept.append(line)
            continue
        others = [pattern for pattern in entry[0] if not _name_matches(pattern, name)]
        if others:
            kept.append(" ".join([",".join(others), *line.split()[1:]]))
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temporary.write_text("".join(f"{line}\n" for line in kept))
    os.replace(temporary, path)
    return removed


# --- the connection's policy ---------------------------------------------------


class _Changed(Exception):
    """A recorded key differs from the one offered (found while recording)."""

    def __init__(self, path: Path, recorded: KnownKey):
        super().__init__(str(path))
        self.path = path
        self.recorded = recorded


class HostKeyPolicy:
    """paramiko's MissingHostKeyPolicy for one host: record the key (accept-new), or refuse it (strict)."""

    def __init__(self, host: HostConfig):
        self.host = host

    def missing_host_key(self, client: SSHClient, hostname: str, key: PKey) -> None:
        path = Path(self.host.known_hosts) if self.host.known_hosts else None
        if self.host.strict_host_keys or path is None:
            raise unknown_key_error(self.host, key)
        try:
            recorded = record(path, hostname, key)
        except _Changed as changed:
            raise changed_key_error(self.host, changed.path, changed.recorded, key) from None
        except OSError as error:
            raise ConnectionFailed(f"cannot record the host key of {where(self.host)} in {path}: "
                                   f"{error.strerror or error}", where=self.host.name,
                                   hint="check that the state directory is writable") from None
        if recorded:
            Output().info(f"recorded the host key of {self.host.name} ({hostname}) in {path}: {describe_key(key)} "
                          "(first contact; a different key later is refused)")


def prepare(client: SSHClient, host: HostConfig) -> None:
    """Load ~/.ssh/known_hosts (checked first) and opsbook's file into `client`, and set the policy."""
    client.load_system_host_keys()
    if host.known_hosts and os.path.isfile(host.known_hosts):
        client.load_host_keys(host.known_hosts)
    client.set_missing_host_key_policy(HostKeyPolicy(host))


def where(host: HostConfig) -> str:
    return f"host {host.name} ({host.target})"


def unknown_key_error(host: HostConfig, key: PKey) -> ConnectionFailed:
    known = f"is in neither {USER_FILE} nor {host.known_hosts}" if host.known_hosts else f"is not in {USER_FILE}"
    why = "strict_host_keys" if host.strict_host_keys else "and there is no known-hosts file to record it in"
    return ConnectionFailed(
        f"the host key of {where(host)} {known} ({why}); it offers {describe_key(key)}",
        where=host.name,
        hint=f"check that fingerprint on the host ({key_file_command(key.get_name())}), "
             f"then add it: ssh-keyscan -p {host.port} {host.address} >> {host.known_hosts or USER_FILE}")


def changed_key_error(host: HostConfig, path: Path, recorded: KnownKey, offered: PKey) -> ConnectionFailed:
    name = host_key_name(host.address, host.port)
    if host.known_hosts and path == Path(host.known_hosts):
        accept = (f"`inv hosts.forget --env {host.env or 'ENV'} --host {host.name}` (or delete the line for {name} "
                  f"from {path})")
    else:
        accept = f"`ssh-keygen -R '{name}'` (it edits {path})"
    return ConnectionFailed(
        f"the host key of {where(host)} has changed: {path} has {recorded.describe()} for {name}, "
        f"the host now offers {describe_key(offered)}; nothing was done on it",
        where=host.name,
        hint=f"if the host was rebuilt or its key regenerated, check the new fingerprint on the host "
             f"({key_file_command(offered.get_name())}), then accept it with {accept} "
             "and run again; otherwise someone may be intercepting the connection: do not go on")


def bad_key_error(host: HostConfig, error: Any) -> ConnectionFailed:
    """From paramiko's BadHostKeyException: which file holds the old key, and both fingerprints."""
    name = host_key_name(host.address, host.port)
    expected = KnownKey(error.expected_key.get_name(), fingerprint(error.expected_key.asbytes()))
    holder = user_file()
    if not keys_for(holder, name) and host.known_hosts:
        holder = Path(host.known_hosts)
    return changed_key_error(host, holder, expected, error.key)


def key_file_command(key_type: str) -> str:
    """The command that prints, on the host, the fingerprint of its key of this type."""
    short = "ed25519" if "ed25519" in key_type else "ecdsa" if "ecdsa" in key_type else "rsa"
    return f"ssh-keygen -lf /etc/ssh/ssh_host_{short}_key.pub"
