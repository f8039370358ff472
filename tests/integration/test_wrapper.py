"""./opsbook run by a user without root: it installs only what the command needs, names what it cannot.

The wrapper runs from a copy of the repository whose .venv is already made (its stamp matches
pyproject.toml; its programs are this suite's), with a PATH from which some tools are missing and
where `apt-get` (and, in some tests, `sudo`) are fakes that record what they were asked. As root
(CI) the user is `nobody`; as anyone else, that user.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.sandbox import find_server_bindir
from tests.cli import REPOSITORY

BREAK_GLASS = {"aws", "age", "jq", "zstd"}
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
FAKE_APT_GET = """#!/bin/sh
# records what it was asked; installs nothing (as apt-get without root would)
echo "apt-get $*" >> "$APT_LOG"
case "$1" in update) exit 0 ;; *) exit 100 ;; esac
"""
FAKE_SUDO = '#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n'


def unprivileged() -> tuple[int, int]:
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    nobody = pwd.getpwnam("nobody")
    return nobody.pw_uid, nobody.pw_gid


def as_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    uid, gid = unprivileged()
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *command]


def give_away(path: Path) -> None:
    uid, gid = unprivileged()
    for item in [path, *path.rglob("*")]:
        os.lchown(item, uid, gid)


def make_checkout(base: Path, *, venv: bool = True) -> Path:
    """The wrapper and pyproject.toml copied, the rest linked; .venv made already, with this suite's programs."""
    checkout = base / "opsbook"
    checkout.mkdir()
    for name in ("opsbook", "pyproject.toml", "inventory.yaml"):  # the inventory's state dir is next to it
        shutil.copy2(REPOSITORY / name, checkout / name)
    for name in ("tasks.py", "ops", "runbooks"):
        (checkout / name).symlink_to(REPOSITORY / name)
    if venv:
        make_venv(checkout / ".venv")
        stamp = hashlib.sha256((REPOSITORY / "pyproject.toml").read_bytes()).hexdigest()[:16]
        (checkout / ".venv" / ".opsbook-installed").write_text(stamp + "\n")
    give_away(checkout)
    return checkout


def make_venv(venv: Path) -> None:
    """A virtualenv over this suite's packages, on an interpreter that user may run.

    The suite's own may live where only root can reach it (pyenv under /root): then the system's
    python of the same version, with the suite's site-packages on its path.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    interpreter = next((candidate for candidate in (sys.executable, shutil.which(version, path="/usr/bin:/bin"))
                        if candidate and runs_as_user([candidate, "-c", "import sys"])), None)
    assert interpreter, f"{sys.executable} cannot be run by an unprivileged user: put it where others can run it"
    site_packages = venv / "lib" / version / "site-packages"
    site_packages.mkdir(parents=True)
    (site_packages / "suite.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (venv / "pyvenv.cfg").write_text(f"home = {Path(interpreter).parent}\ninclude-system-site-packages = false\n")
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to(interpreter)
    inv = venv / "bin" / "inv"
    inv.write_text(f"#!{venv}/bin/python\nimport sys\nfrom invoke.main import program\nsys.exit(program.run())\n")
    inv.chmod(0o755)
    assert runs_as_user([str(venv / "bin" / "python"), "-c", "import invoke, psycopg, ops"], cwd=REPOSITORY), \
        f"an unprivileged user cannot read this suite's packages ({sysconfig.get_paths()['purelib']})"


def runs_as_user(command: list[str], cwd: Path | None = None) -> bool:
    # through a shell: setpriv may resolve its own program's path before it gives up root's rights
    return subprocess.run(as_user(["/bin/sh", "-c", 'exec "$@"', "sh", *command]), capture_output=True,
                          env={"PATH": "/usr/bin:/bin"}, cwd=cwd, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    # Not under pytest's tmp_path: its parents are 0700 to anyone but root.
    made = Path(tempfile.mkdtemp(prefix="opsbook-wrapper-"))
    made.chmod(0o755)
    try:
        yield made
    finally:
        for data_dir in made.glob("*/.ops/sandbox/pgdata"):  # that user's cluster: only it can stop it
            subprocess.run(as_user([str(find_server_bindir() / "pg_ctl"), "stop", "-D", str(data_dir),
                                    "-m", "immediate"]), capture_output=True, timeout=60)
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="module")
def checkout(base: Path) -> Path:
    return make_checkout(base)


def tool_dir(base: Path, name: str, hidden: set[str], fakes: dict[str, str]) -> Path:
    """Every program of the system directories except `hidden` and the real apt-get and sudo, plus `fakes`."""
    path = base / name
    path.mkdir()
    for directory in SYSTEM_DIRS:
        for program in Path(directory).iterdir() if Path(directory).is_dir() else []:
            if program.name in hidden | set(fakes) | {"apt-get", "sudo"} or (path / program.name).exists():
                continue
            if os.access(program, os.X_OK) and not program.is_dir():
                (path / program.name).symlink_to(program)
    for program, text in fakes.items():  # files of their own, never written through a link to the real one
        fake = path / program
        assert not fake.is_symlink()
        fake.write_text(text)
        fake.chmod(0o755)
    (path / "apt.log").touch(mode=0o666)  # the fakes write it as that user
    (path / "apt.log").chmod(0o666)
    return path


def run_wrapper(checkout: Path, path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": str(path), "HOME": str(checkout), "LANG": "C.UTF-8", "APT_LOG": str(path / "apt.log"),
                   "OPS_OPERATOR": "tester"}
    return subprocess.run(as_user([str(checkout / "opsbook"), *args]), capture_output=True, text=True,
                          env=environment, cwd=checkout.parent, timeout=timeout, stdin=subprocess.DEVNULL)


def apt_calls(path: Path) -> list[str]:
    return (path / "apt.log").read_text().splitlines()


def wrapper_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("opsbook:")]


def test_the_quickstart_runs_without_root_and_without_the_tools_it_does_not_need(base, checkout):
    path = tool_dir(base, "no-sudo", BREAK_GLASS | {"git"}, {"apt-get": FAKE_APT_GET})
    result = run_wrapper(checkout, path, "inv", "backup", "--env", "local")
    assert result.returncode == 0, result
    assert apt_calls(path) == []  # without root or sudo, not even tried
    assert wrapper_lines(result) == [  # nothing about the break-glass or test tools
        "opsbook: cannot install packages: not root, and no sudo that can run here",
        "opsbook: going on without git (runs record the git revision; decommission bundles the repository);"
        " to have it: sudo apt-get install git (or, as root, apt-get install git)"], result.stderr
    assert "succeeded (run " in result.stderr and "Traceback" not in result.stderr
    # the sandbox runs as that user: its cluster and its backup belong to it
    sandbox = checkout / ".ops" / "sandbox"
    assert (sandbox / "pgdata").stat().st_uid == unprivileged()[0]
    assert list((sandbox / "storage").rglob("manifest.json")), result.stderr


def test_with_sudo_it_installs_only_what_the_command_needs_and_goes_on_without_optional_ones(base, checkout):
    path = tool_dir(base, "sudo", BREAK_GLASS | {"git"}, {"apt-get": FAKE_APT_GET, "sudo": FAKE_SUDO})
    result = run_wrapper(checkout, path, "inv", "--list")
    assert result.returncode == 0, result
    assert apt_calls(path) == ["apt-get update -qq",
                                         "apt-get install -y -qq --no-install-recommends git"]
    assert "opsbook: apt-get could not install git" in result.stderr
    assert "going on without git" in result.stderr and "backup.verify" in result.stdout


def test_a_missing_required_package_is_named_and_stops_before_the_command(base, checkout):
    path = tool_dir(base, "tests-no-sudo", {"aws", "jq"}, {"apt-get": FAKE_APT_GET})
    result = run_wrapper(checkout, path, "pytest", "--version")
    assert result.returncode == 3, result
    assert apt_calls(path) == []
    assert "opsbook: the test suite needs awscli: the break-glass restore downloads with aws" in result.stderr
    assert "opsbook: the test suite needs jq" in result.stderr
    assert "opsbook: install it, then run again: sudo apt-get install awscli jq" in result.stderr
    assert "pytest" not in result.stdout

    path = tool_dir(base, "break-glass", BREAK_GLASS, {"apt-get": FAKE_APT_GET, "sudo": FAKE_SUDO})
    result = run_wrapper(checkout, path, "--break-glass-tools")
    assert result.returncode == 3, result
    assert apt_calls(path)[-1] == "apt-get install -y -qq --no-install-recommends awscli zstd age jq"
    assert "install it, then run again: sudo apt-get install awscli zstd age jq" in result.stderr


def test_the_test_suite_needs_systemd_analyze(base, checkout):
    path = tool_dir(base, "no-systemd", {"systemd-analyze"}, {"apt-get": FAKE_APT_GET})
    result = run_wrapper(checkout, path, "pytest", "--version")
    assert result.returncode == 3, result
    assert ("opsbook: the test suite needs systemd: the tests check the generated systemd units with "
            "systemd-analyze verify") in result.stderr
    assert "opsbook: install it, then run again: sudo apt-get install systemd" in result.stderr


def test_a_checkout_without_venv_needs_python3_venv(base):
    (base / "fresh").mkdir()
    fresh = make_checkout(base / "fresh", venv=False)
    no_venv = "#!/bin/sh\necho 'No module named ensurepip' >&2\nexit 1\n"  # python3 without python3-venv
    path = tool_dir(base, "no-venv", BREAK_GLASS, {"apt-get": FAKE_APT_GET, "python3": no_venv})
    result = run_wrapper(fresh, path, "inv", "--list")
    assert result.returncode == 3, result
    assert "opsbook: inv needs python3-venv" in result.stderr
    assert "sudo apt-get install python3-venv" in result.stderr
    assert not (fresh / ".venv").exists()
