"""The task collection: every task documented, every flag explained, start-up stays light."""

import subprocess
import sys

from tests.cli import REPOSITORY


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


def test_listing_tasks_imports_no_heavy_library():
    code = (f"import sys; sys.path.insert(0, {str(REPOSITORY)!r}); import tasks; "
            "heavy = [m for m in ('boto3', 'botocore', 'fabric', 'paramiko', 'psycopg', 'jsonschema', 'zstandard')"
            " if m in sys.modules]; print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
