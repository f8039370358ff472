"""A local child started by a run never outlives it, even when the interrupt lands while it is started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ops import cli, processes


def _children_named(name: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        state, parent = fields[1].split()[:2]
        if int(parent) == os.getpid() and state not in ("Z", "X") and fields[0].endswith(f"({name}"):
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def opsbook_signal_handler():
    previous = signal.signal(signal.SIGINT, cli._interrupt)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_while_the_child_starts_is_raised_once_it_is_owned_and_the_child_stopped(
        opsbook_signal_handler) -> None:
    # The child signals us between its fork and its exec: the parent is still inside Popen then.
    def interrupt_parent() -> None:
        os.kill(os.getppid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt), processes.child_process(
            ["sleep", "30"], preexec_fn=interrupt_parent, stdout=subprocess.DEVNULL):
        time.sleep(5)  # not reached: the held interrupt is raised as the start completes
    assert _children_named("sleep") == []


def test_an_interrupt_in_the_block_stops_and_reaps_the_child(opsbook_signal_handler) -> None:
    with pytest.raises(KeyboardInterrupt), processes.child_process(["sleep", "30"]) as process:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert process.returncode is not None and _children_named("sleep") == []


def test_a_command_that_cannot_start_says_so() -> None:
    with pytest.raises(processes.CannotStart, match="No such file"), processes.child_process(["/nonexistent/x"]):
        pass


def test_interrupts_held_raises_at_the_end_of_the_section_only(opsbook_signal_handler) -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt), processes.interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        reached.append(True)
    assert reached == [True]
