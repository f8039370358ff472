"""The task collection: every task documented, every flag explained, start-up stays light."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import REPOSITORY, Opsbook


def all_tasks():
    sys.path.insert(0, str(REPOSITORY))
    import tasks

    collection = tasks.ns
    for name in collection.task_names:
        yield name, collection[name]


def test_every_task_has_a_docstring_and_help_for_every_flag():
    for name, task in all_tasks():
        assert (task.__doc__ or task.body.__doc__ or "").strip(), f"{name} has no docstring"
        arguments = [a for a in task.get_arguments() if a.name not in ("c",)]
        missing = [a.name for a in arguments if not a.help]
        assert not missing, f"inv -h {name}: no help for {missing}"


def test_every_required_argument_is_given_first_or_as_its_flag():
    """`inv incident.update ID` and `inv incident.update --id ID` alike, as `inv runs.show ID`."""
    from invoke.parser import Parser

    import tasks

    parser = Parser(contexts=tasks.ns.to_contexts())
    seen = set()
    for name, task in all_tasks():
        for argument in (a for a in task.get_arguments() if a.positional):
            seen.add(name)
            for argv in ([name, "THE-ID"], [name, f"--{argument.names[0]}", "THE-ID"]):
                (parsed,) = [context for context in parser.parse_argv(argv) if context.name == name]
                assert parsed.args[argument.name].value == "THE-ID", argv
    assert {"incident.update", "incident.resolve", "incident.show", "incident.rollback", "runs.show",
            "runs.resume"} <= seen


def test_listing_tasks_imports_no_heavy_library():
    code = (f"import sys; sys.path.insert(0, {str(REPOSITORY)!r}); import tasks; "
            "heavy = [m for m in ('boto3', 'botocore', 'fabric', 'paramiko', 'psycopg', 'jsonschema', 'zstandard')"
            " if m in sys.modules]; print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# --- command-line errors: exit 2, one line, where to look; never a traceback ---------------------


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """Should a task run after all, it finds no inventory and changes nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPS_INVENTORY", str(tmp_path / "no-inventory.yaml"))
    monkeypatch.setenv("OPS_HOME", str(tmp_path / ".ops"))


def inv(argv: list[str], capsys) -> tuple[int, str]:
    """The `inv` program itself (invoke's own Program object), in this process: its exit code and stderr."""
    from invoke.main import program

    with pytest.raises(SystemExit) as exited:
        program.run(["inv", "--search-root", str(REPOSITORY), *argv])
    captured = capsys.readouterr()
    return exited.value.code, captured.err + captured.out


def assert_usage_error(code: int, printed: str, argv: list[str], where: str) -> None:
    lines = printed.strip().splitlines()
    assert code == 2, f"inv {' '.join(argv)} -> {code}: {printed}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"inv {' '.join(argv)}: {printed}"
    assert where in lines[0], f"inv {' '.join(argv)}: {printed}"


@pytest.mark.parametrize(("argv", "named", "where"), [
    (["backup", "--bogus"], "--bogus", "see `inv -h backup`"),
    (["restore", "--jobs", "x"], "--jobs", "see `inv -h restore`"),
    (["restore", "--jobs=x"], "'x'", "see `inv -h restore`"),
    (["restore", "--env"], "--env", "see `inv -h restore`"),
    (["runs.show"], "RUN_ID", "see `inv -h runs.show`"),
    (["backup.verfy", "--latest"], "backup.verify", "see `inv --list`"),
    (["-h", "nosuch"], "nosuch", "see `inv --list`"),
    (["backup", "--tag"], "--tag", "see `inv -h backup`"),
    (["runs.show", "--bogus"], "--bogus", "see `inv -h runs.show`"),
    (["backup", "surplus"], "surplus", "see `inv -h backup`"),
])
def test_a_command_line_error_is_exit_2_with_one_line(argv, named, where, tmp_path):
    result = Opsbook(tmp_path).run(*argv, timeout=60)
    assert_usage_error(result.exit_code, result.output, argv, where)
    assert named in result.output and "Traceback" not in result.output


def test_every_task_answers_a_bad_flag_with_exit_2(capsys, nowhere):
    """Every flag of every task: unknown, without its value, a value of the wrong type. In this process
    (invoke's own `inv` program object) because it is hundreds of command lines."""
    import tasks

    for name, task in all_tasks():
        shown = min([name, *tasks.ns.task_names[name]], key=len)  # `backup`, not `backup.run`
        cases = [[name, "--no-such-flag"]]
        for argument in task.get_arguments():
            if argument.positional or not argument.takes_value:
                continue
            flag = f"--{argument.name}"
            cases.append([name, flag])  # the value is missing
            if argument.kind is int:
                cases.append([name, flag, "many"])
        for argv in cases:
            code, printed = inv(argv, capsys)
            assert_usage_error(code, printed, argv, f"see `inv -h {shown}`")


def test_the_inv_program_itself_exits_2(tmp_path):
    """`inv` as the README runs it, in its own process."""
    inv_program = Path(sys.executable).with_name("inv")
    if not inv_program.exists():
        pytest.skip(f"no inv program beside {sys.executable}")
    result = subprocess.run([str(inv_program), "--search-root", str(REPOSITORY), "restore", "--jobs", "x"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
