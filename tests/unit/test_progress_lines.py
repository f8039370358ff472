import io
import os

from ops.output import Output, ProgressLines
from ops.progress_bar import ProgressBar


def test_counts_report_once_per_tenth_and_bytes_at_most_every_interval():
    lines: list[str] = []
    counted = ProgressLines(lines.append, "objects copied")
    for done in range(1, 41):
        counted(done, 40)
    assert lines[0] == "4/40 objects copied" and lines[-1] == "40/40 objects copied" and len(lines) == 10
    lines.clear()
    ProgressLines(lines.append, "uploaded", every=0.0)(2 * 1024 * 1024)
    assert lines[0].startswith("uploaded 2.0 MiB (")
    small = ProgressLines(lines.append, "objects copied")
    small(5, 5)
    assert len(lines) == 1  # fewer than 20 items: no lines


def test_a_terminal_gets_the_bar_json_runs_and_pipes_the_plain_lines():
    controller, terminal = os.openpty()
    try:
        with open(terminal, "w", closefd=False) as stream:
            assert isinstance(Output(stream=stream).progress(print, "uploaded"), ProgressBar)
            assert isinstance(Output(stream=stream, json_mode=True).progress(print, "uploaded"), ProgressLines)
    finally:
        os.close(terminal)
        os.close(controller)
    assert isinstance(Output(stream=io.StringIO()).progress(print, "uploaded"), ProgressLines)


def test_the_plain_lines_ignore_the_bytes_of_a_count():
    lines: list[str] = []
    counted = ProgressLines(lines.append, "objects copied")
    counted(40, 40, size=4096)
    counted.close()
    assert lines == ["40/40 objects copied"]
