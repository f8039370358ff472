"""The order of exit codes a run over several environments ends with, and what counts as several."""

from __future__ import annotations

import pytest

from ops.multi_env import requested, worst


@pytest.mark.parametrize(("codes", "expected"), [
    ([], 0), ([0, 0], 0), ([0, 3], 3), ([3, 75], 3), ([75, 0], 75), ([3, 1], 1), ([1, 2, 3], 2),
    ([2, 130], 130), ([3, 42], 42), ([42, 1], 42),
])
def test_the_worst_exit_code(codes, expected):
    assert worst(codes) == expected


@pytest.mark.parametrize(("env", "several"), [
    (None, False), ("prod", False), ("prod,staging", True), ("all", True), (" all ", True), ("allies", False),
    ("prod,", True),
])
def test_what_names_several_environments(env, several):
    assert requested(env) is several
