"""ops.remote_commands: the wrappers sent to sshd are plain POSIX sh (run here with the local sh)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ops.remote_commands import build_command, build_signal_command


def test_command_wrappers_are_plain_sh(tmp_path: Path) -> None:
    """The wrapper reports its process group first, loads variables from stdin, and runs the command."""
    command = build_command('printf "%s|%s" "$GREETING" "$(pwd)"; exit 3', with_environment=True)
    ran = subprocess.run(["sh", "-c", command], input="export GREETING='it'\"'\"'s me'\n", capture_output=True,
                         text=True, cwd=tmp_path)
    first, _, rest = ran.stdout.partition("\n")
    assert first.startswith("opsbook-pgid ") and first.split()[1].isdigit(), ran
    assert (rest, ran.returncode) == (f"it's me|{tmp_path}", 3)
    assert build_signal_command(1234, "TERM") == (
        "sh -c 'kill -TERM -1234 2>/dev/null || kill -TERM 1234 2>/dev/null; exit 0'")
