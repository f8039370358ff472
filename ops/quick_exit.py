"""The end of a command-line run without Python's teardown of the modules it loaded.

A run loads some 800 modules (boto3's service models, psycopg, paramiko, …); freeing them one by one at
interpreter exit costs 0.3–0.6 s of CPU after the work is done: the last thing every `inv backup` or
`inv restore` waits for. The run ends instead the way Python's own exit does, minus that teardown: threads
joined (executors' workers, non-daemon threads), the atexit handlers run (logging's flush among them), the
standard streams flushed, then os._exit with the run's code. Only for the process's own command line: a
Program run in-process with its own argv (the tests' many command lines in one process) keeps its interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from invoke.exceptions import Exit


def ending_at_once(execute: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wraps Program.execute (the tasks' run, after parsing): once the tasks are done, the process ends."""
    if getattr(execute, "opsbook_quick_exit", False):
        return execute

    @functools.wraps(execute)
    def wrapper(program: Any) -> None:
        if program.argv is not sys.argv:  # Program.run(argv): in-process, not the process's command line
            execute(program)
            return
        try:
            execute(program)
        except Exit as error:
            if error.message:  # invoke prints it, then exits as usual
                raise
            exit_now(error.code)
        exit_now(0)

    wrapper.opsbook_quick_exit = True  # type: ignore[attr-defined]
    return wrapper


def exit_now(code: int) -> None:
    """Python's exit sequence without the teardown of modules and objects."""
    # Both are what Python's own exit calls first; a Python without them gets the ordinary exit.
    shutdown, run_exit_functions = getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exit_functions is None:
        sys.exit(code)
    shutdown()
    run_exit_functions()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a reader gone (`| head`): nothing left to tell it
            stream.flush()
    os._exit(code)
