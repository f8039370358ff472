"""The wheel, installed: the `opsbook` console tool runs from an empty directory, templates from the package.

The wheel is built from a copy of the package's sources and installed, without its dependencies, into a
new virtualenv outside the checkout whose path holds this suite's installed packages (invoke, Jinja…) but
not the checkout: whatever `opsbook` finds of opsbook (code, templates) comes from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml

import ops
from tests.cli import REPOSITORY, CliResult

SOURCES = ("pyproject.toml", "README.md", "ops", "runbooks")
INVENTORY = {"project": "shop", "default_env": "prod",
             "envs": {"prod": {"notify": [{"kind": "file", "path": "status.md", "audience": "public"}]}}}


def build_wheel(base: Path) -> Path:
    source = base / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPOSITORY / name).is_dir():
            shutil.copytree(REPOSITORY / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPOSITORY / name, source / name)
    isolation = ["--no-build-isolation"] if builds_wheels_offline() else []  # else pip fetches setuptools
    pip(["wheel", "-q", "--no-deps", *isolation, "-w", str(base / "dist"), str(source)])
    [wheel] = (base / "dist").glob("opsbook-*.whl")
    return wheel


def builds_wheels_offline() -> bool:
    """This suite's setuptools builds wheels by itself from 70.1, before that with the wheel package."""
    major, minor = (int(part) for part in version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or find_spec("wheel") is not None


def install(wheel: Path, venv: Path) -> None:
    """A virtualenv without pip, the wheel installed into it by this suite's pip, the dependencies this suite's."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    # a plain path entry: the suite's .pth files (an editable opsbook among them) are not run from it
    (venv / "lib" / version / "site-packages" / "suite.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip(["--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", "--no-index", str(wheel)])


def pip(args: list[str]) -> None:
    completed = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, f"pip {' '.join(args)}: {completed.stdout}{completed.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("console-tool")
    install(build_wheel(base), base / "venv")
    return base / "venv"


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "here").mkdir()
    return tmp_path / "here"


def run(venv: Path, cwd: Path, *args: str, **environ: str) -> CliResult:
    base = {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith(("OPS_", "PG"))}
    env = {**base, "PATH": f"{venv / 'bin'}:{base.get('PATH', '/usr/bin:/bin')}", "OPS_OPERATOR": "tester",
           "OPS_HOME": str(cwd.parent / "state"), **environ}
    completed = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                               cwd=cwd, timeout=120)
    return CliResult(args, completed.returncode, completed.stdout, completed.stderr)


def test_opsbook_comes_from_the_wheel_with_its_templates(installed: Path, empty_dir: Path) -> None:
    found = run(installed, empty_dir, "python", "-c", "import ops, runbooks; print(ops.__file__, runbooks.__file__)")
    assert found.exit_code == 0, found
    for path in found.stdout.split():
        assert Path(path).is_relative_to(installed), found
    templates = next(installed.glob("lib/python*/site-packages/ops/templates"))
    assert (templates / "app.env.j2").is_file() and (templates / "incident" / "resolved").is_dir()

    version = run(installed, empty_dir, "opsbook", "--version")
    assert (version.exit_code, version.stdout.strip()) == (0, f"opsbook {ops.__version__}"), version


def test_opsbook_lists_and_checks_from_an_empty_directory(installed: Path, empty_dir: Path) -> None:
    listing = run(installed, empty_dir, "opsbook", "--list")
    assert listing.exit_code == 0, listing
    for task in ("backup.run (backup)", "incident.open", "inventory.check", "deploy.push-env"):
        assert f"  {task} " in listing.stdout, listing

    inventory = empty_dir.parent / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(INVENTORY))
    check = run(installed, empty_dir, "opsbook", "--inventory", str(inventory), "inventory.check")
    assert check.exit_code == 0 and "valid (1 environments: prod" in check.output, check
    after_task = run(installed, empty_dir, "opsbook", "inventory.check", "--inventory", str(inventory))
    assert after_task.exit_code == 0, after_task

    missing = run(installed, empty_dir, "opsbook", "inventory.check")  # no ./inventory.yaml here
    assert missing.exit_code == 2 and "inventory file inventory.yaml not found" in missing.stderr, missing


def test_opsbook_renders_incident_notices_from_the_package(installed: Path, empty_dir: Path) -> None:
    inventory = empty_dir.parent / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(INVENTORY))
    opened = run(installed, empty_dir, "opsbook", "incident.open", "--env", "prod", "--dry-run",
                 "--title", "Uploads failing", "--impact", "minor", "--components", "uploads",
                 OPS_INVENTORY=str(inventory))
    assert opened.exit_code == 0, opened
    assert "dry run: nothing recorded, nothing sent" in opened.output, opened
    assert "# Uploads failing" in opened.output and "**Investigating**" in opened.output, opened
    assert "- uploads: Degraded performance" in opened.output, opened
    assert not list(empty_dir.parent.rglob("status.md")), "a dry run wrote the status file"


def test_opsbook_command_line_errors_exit_2(installed: Path, empty_dir: Path) -> None:
    for args, message in [(("backup", "--jobs", "x"), "error: backup: unknown flag --jobs"),
                          (("nosuch",), "error: no task named 'nosuch'; see `opsbook --list`"),
                          (("inventory.check", "--inventory"), "--inventory needs a value")]:
        result = run(installed, empty_dir, "opsbook", *args)
        assert result.exit_code == 2 and message in result.stderr, result
        assert "Traceback" not in result.output, result
