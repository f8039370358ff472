"""A command-line run ends without Python's teardown of its modules, yet as Python's exit would: its code, its
atexit handlers, its output (ops/quick_exit.py)."""

from __future__ import annotations

from pathlib import Path

from tests.cli import Opsbook

# Loaded by every Python started with this folder on PYTHONPATH: tells whether the interpreter tore its modules
# down (the object's __del__ runs then) and whether the atexit handlers ran.
WITNESS = """
import atexit, os
atexit.register(lambda: os.write(2, b"atexit handlers ran\\n"))
class Witness:
    def __del__(self, write=os.write):
        write(2, b"modules torn down\\n")
witness = Witness()
"""


def workspace(tmp_path: Path) -> Opsbook:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(WITNESS)
    opsbook = Opsbook(tmp_path, environ={"PYTHONPATH": str(tmp_path / "site")})
    opsbook.write_inventory("project: acme\nenvs:\n  prod:\n"
                            "    backups: {provider: local, path: buckets, bucket: backups, prefix: prod/}\n")
    (tmp_path / "buckets" / "backups").mkdir(parents=True)
    return opsbook


def test_a_run_ends_without_the_teardown_with_its_code_its_atexit_handlers_and_its_output(tmp_path):
    opsbook = workspace(tmp_path)
    listed = opsbook.run("backup.list", "--env", "prod", "--json", timeout=60)
    assert listed.exit_code == 0, listed
    assert listed.json() is not None  # the whole result reached the pipe
    failed = opsbook.run("backup.list", "--env", "nope", timeout=60)
    assert failed.exit_code == 2 and "no environment named 'nope'" in failed.output
    for result in (listed, failed):
        assert "atexit handlers ran" in result.stderr
        assert "modules torn down" not in result.stderr
