"""ops.known_hosts: names, fingerprints and editing of a known-hosts file (OpenSSH format)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
from pathlib import Path

from ops import known_hosts

BLOB = base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519" + bytes(range(36))).decode()


def hashed(name: str, salt: bytes = b"0123456789abcdefghij") -> str:
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def test_names_and_fingerprints_are_those_of_openssh(tmp_path: Path) -> None:
    assert known_hosts.host_key_name("10.0.0.5", 22) == "10.0.0.5"
    assert known_hosts.host_key_name("web1.example.com", 2222) == "[web1.example.com]:2222"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "key")], check=True)
    _type, blob = (tmp_path / "key.pub").read_text().split()[:2]
    listed = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "key.pub")], check=True, capture_output=True,
                            text=True).stdout.split()[1]
    assert known_hosts.fingerprint(base64.b64decode(blob)) == listed


def test_forget_removes_only_that_name_and_understands_hashed_names(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text("\n".join([
        "# kept as written",
        f"[10.0.0.5]:2222 ssh-ed25519 {BLOB}",
        f"[10.0.0.6]:2222,[10.0.0.5]:2222 ssh-ed25519 {BLOB}",
        f"{hashed('[10.0.0.5]:2222')} ssh-ed25519 {BLOB}",
        f"10.0.0.5 ssh-ed25519 {BLOB}",
        "@revoked * ssh-ed25519 AAAA",
    ]) + "\n")
    name = "[10.0.0.5]:2222"
    assert len(known_hosts.keys_for(path, name)) == 3
    removed = known_hosts.forget(path, name)
    assert [key.key_type for key in removed] == ["ssh-ed25519"] * 3
    assert path.read_text().splitlines() == [
        "# kept as written", f"[10.0.0.6]:2222 ssh-ed25519 {BLOB}", f"10.0.0.5 ssh-ed25519 {BLOB}",
        "@revoked * ssh-ed25519 AAAA"]
    assert known_hosts.forget(path, name) == [] and known_hosts.keys_for(tmp_path / "missing", name) == []

