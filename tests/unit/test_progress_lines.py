from ops.output import ProgressLines


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
