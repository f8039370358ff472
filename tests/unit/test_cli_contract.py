"""The task collection: every task documented, every flag explained, start-up stays light."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import REPOSITORY, Opsbook, task_arguments


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


def test_each_shared_flag_has_one_short_letter_in_every_task():
    """`-d` is --dry-run wherever a task has --dry-run, and so on; an opsbook task's own flags leave those letters."""
    from ops.cli import SHORT_FLAGS, OpsTask

    letters: dict[str, set[tuple[str, ...]]] = {name: set() for name in SHORT_FLAGS}
    for name, task in all_tasks():
        for argument in task_arguments(task):
            flag = argument.attr_name or argument.name  # attr_name is set only for names with an underscore
            if flag in SHORT_FLAGS:
                letters[flag].add(tuple(argument.names[1:]))
            elif isinstance(task, OpsTask):
                taken = set(argument.names[1:]) & set(SHORT_FLAGS.values())
                assert not taken, f"inv -h {name}: --{argument.names[0]} takes the shared letter {taken}"
    assert letters == {name: {(letter,)} for name, letter in SHORT_FLAGS.items()}


def test_every_required_argument_is_given_first_or_as_its_flag():
    """`inv incident.update ID` and `inv incident.update --id ID` alike, as `inv runs.show ID`."""
    from invoke.parser import Parser, ParserContext

    import tasks

    parser = Parser(contexts=[ParserContext(name=name, aliases=aliases, args=task_arguments(tasks.ns[name]))
                              for name, aliases in tasks.ns.task_names.items()])
    seen = set()
    for name, task in all_tasks():
        for argument in (a for a in task_arguments(task) if a.positional):
            seen.add(name)
            for argv in ([name, "THE-ID"], [name, f"--{argument.names[0]}", "THE-ID"]):
                (parsed,) = [context for context in parser.parse_argv(argv) if context.name == name]
                assert parsed.args[argument.name].value == "THE-ID", argv
    assert {"incident.update", "incident.resolve", "incident.show", "incident.rollback", "runs.show",
            "runs.resume"} <= seen


def test_listing_tasks_imports_no_heavy_library():
    code = (f"import sys; sys.path.insert(0, {str(REPOSITORY)!r}); import tasks; "
            "heavy = [m for m in ('boto3', 'botocore', 'fabric', 'paramiko', 'psycopg', 'jsonschema', 'zstandard',"
            " 'rich')"
            " if m in sys.modules]; print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_listing_tasks_builds_none_of_the_dataclasses():
    """Building them was half of opsbook's import time (ops/lazy_dataclasses.py): a module that makes an
    instance when imported pays for its class there."""
    code = (f"import sys; sys.path.insert(0, {str(REPOSITORY)!r}); import tasks; "
            "from ops.lazy_dataclasses import built_on_demand; "
            "built = [c.__qualname__ for c in built_on_demand() if type(vars(c)['__dataclass_fields__']).__name__"
            " != '_Unbuilt']; print(len(built_on_demand()), ','.join(built))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    declared, built = result.stdout.split(" ", 1)
    assert int(declared) > 100 and built.strip() == ""


def test_the_heap_is_frozen_at_exit_so_the_last_collections_skip_it():
    """The interpreter's final collections traverse everything imported (botocore's models): 0.3 s and more of a
    command's wall time. The probe, registered first, runs last (atexit is last in, first out)."""
    code = ("import atexit, gc, sys; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
            f"from invoke.main import program; program.run(['inv', '--search-root', {str(REPOSITORY)!r}, '--list'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "frozen True"



@pytest.mark.parametrize("told_not_to", [False, True])
def test_inv_keeps_the_bytecode_of_opsbook_modules_unless_python_is_told_not_to(tmp_path, told_not_to):
    """invoke turns bytecode writing off before it loads tasks.py: without tasks.py turning Python's own setting
    back on, every `inv` in a checkout compiles every opsbook module again."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("tasks.py", "ops", "runbooks"):
        source = REPOSITORY / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, checkout / name)
    environ = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    if told_not_to:
        environ["PYTHONDONTWRITEBYTECODE"] = "1"
    subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(checkout), "--list"], env=environ,
                   capture_output=True, check=True)
    compiled = sorted(path.name for path in (checkout / "ops").glob("__pycache__/cli.*.pyc"))
    assert compiled == ([] if told_not_to else [f"cli.{sys.implementation.cache_tag}.pyc"])


# --- command-line errors: exit 2, one line, where to look; never a traceback ---------------------


# Many command lines, one process: invoke's own `inv` program object, run on each in turn.
MANY_COMMAND_LINES = """
import contextlib, io, json, sys
from invoke.main import program
results = []
for argv in json.load(sys.stdin):
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
        try:
            program.run(["inv", "--search-root", sys.argv[1], *argv])
            code = 0
        except SystemExit as exited:
            code = exited.code
    results.append([argv, code, printed.getvalue()])
json.dump(results, sys.__stdout__)
"""


def inv_many(command_lines: list[list[str]], tmp_path: Path) -> list[tuple[list[str], int, str]]:
    """Exit code and output of each; should a task run after all, it finds no inventory and changes nothing."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPS_")}
    environ.update(OPS_INVENTORY=str(tmp_path / "no-inventory.yaml"), OPS_HOME=str(tmp_path / ".ops"))
    result = subprocess.run([sys.executable, "-c", MANY_COMMAND_LINES, str(REPOSITORY)], cwd=tmp_path, env=environ,
                            input=json.dumps(command_lines), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr  # a traceback ends the loop
    return json.loads(result.stdout)


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


def test_every_task_answers_a_bad_flag_with_exit_2(tmp_path):
    """Every flag of every task: unknown, without its value, a value of the wrong type."""
    import tasks

    command_lines, shown = [], {}
    for name, task in all_tasks():
        shown[name] = min([name, *tasks.ns.task_names[name]], key=len)  # `backup`, not `backup.run`
        command_lines.append([name, "--no-such-flag"])
        for argument in task_arguments(task):
            if argument.positional or not argument.takes_value:
                continue
            flag = f"--{argument.names[0]}"
            command_lines.append([name, flag])  # the value is missing
            if argument.kind is int:
                command_lines.append([name, flag, "many"])
    for argv, code, printed in inv_many(command_lines, tmp_path):
        assert_usage_error(code, printed, argv, f"see `inv -h {shown[argv[0]]}`")
        assert re.search(f"{argv[1]}\\b(?!-)", printed), f"the message does not name the flag as typed: {printed}"
    assert len(command_lines) > 100


def test_the_inv_program_itself_exits_2(tmp_path):
    """`inv` as the README runs it, in its own process."""
    inv_program = Path(sys.executable).with_name("inv")
    if not inv_program.exists():
        pytest.skip(f"no inv program beside {sys.executable}")
    result = subprocess.run([str(inv_program), "--search-root", str(REPOSITORY), "restore", "--jobs", "x"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_listing_cut_short_by_its_reader_is_quiet(tmp_path):
    """`inv --list | head`: the reader goes away early; no traceback, no error."""
    listing = subprocess.run(f"{sys.executable} -m invoke --search-root {REPOSITORY} --list | head -n 1",
                             shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert listing.stdout == "Available tasks:\n"
    assert listing.stderr == "", listing.stderr
