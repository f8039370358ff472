"""Prometheus textfiles: parsed back by prometheus_client's own parser, merged per environment, atomic."""

from __future__ import annotations

import math
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops import metrics
from ops.errors import UsageError
from ops.metrics import MetricFamily


def parsed(text: str) -> dict[str, dict]:
    """{family name: {"type", "help", "samples": {(sample name, labels): value}}} as Prometheus reads it."""
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {"type": family.type, "help": family.documentation, "samples": {
            (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}}
    return families


def test_rendered_families_parse_with_their_types_labels_and_values():
    families = [
        MetricFamily("opsbook_database_size_bytes", "Bytes the database takes on disk.").add(123456789, env="prod"),
        MetricFamily("opsbook_database_deadlocks_total", "Deadlocks since stats reset.", "counter").add(3, env="prod"),
        MetricFamily("opsbook_database_connections", "Connections by state.")
        .add(2, env="prod", state="active").add(5, env="prod", state="idle in transaction"),
        MetricFamily("opsbook_odd_label", 'Help with a \\ backslash\nand a newline.')
        .add(0.25, env="prod", query='select "x"\nfrom t where a = \'\\\''),
    ]
    text = metrics.render(families)
    assert text.count("# HELP opsbook_database_connections ") == 1
    assert text.count("# TYPE opsbook_database_connections gauge") == 1
    result = parsed(text)
    assert result["opsbook_database_size_bytes"]["samples"] == {
        ("opsbook_database_size_bytes", (("env", "prod"),)): 123456789}
    # prometheus_client strips _total from a counter's family name, keeps it on the sample
    assert result["opsbook_database_deadlocks"]["type"] == "counter"
    assert ("opsbook_database_deadlocks_total", (("env", "prod"),)) in result["opsbook_database_deadlocks"]["samples"]
    assert result["opsbook_database_connections"]["samples"][
        ("opsbook_database_connections", (("env", "prod"), ("state", "idle in transaction")))] == 5
    odd = result["opsbook_odd_label"]
    assert odd["help"] == "Help with a \\ backslash\nand a newline."
    query = 'select "x"\nfrom t where a = \'\\\''
    assert list(odd["samples"]) == [("opsbook_odd_label", (("env", "prod"), ("query", query)))]


@pytest.mark.parametrize(("value", "text"), [
    (3, "3"), (1.5, "1.5"), (1e20, "1e+20"), (float("nan"), "NaN"), (float("inf"), "+Inf"),
    (-float("inf"), "-Inf"), (1700000000.25, "1700000000.25")])
def test_values_are_formatted_as_prometheus_reads_them(value, text):
    assert metrics.format_value(value) == text
    read = parsed(metrics.render([MetricFamily("x_seconds", "x").add(value)]))["x_seconds"]["samples"]
    read_value = next(iter(read.values()))
    assert (math.isnan(read_value) and math.isnan(value)) or read_value == value


@pytest.mark.parametrize(("name", "kind"), [
    ("opsbook_runs", "counter"),  # a counter without _total
    ("opsbook_backups_total", "gauge"),  # _total on a gauge
    ("9lives", "gauge"), ("with-dash", "gauge"), ("opsbook_x", "histogram")])
def test_unconventional_names_and_types_are_refused(name, kind):
    with pytest.raises(UsageError):
        MetricFamily(name, "help", kind)


def test_invalid_label_names_are_refused():
    with pytest.raises(UsageError):
        MetricFamily("x_bytes", "x").add(1, **{"__reserved": "a"})


def test_merge_replaces_only_this_environment_in_the_families_written():
    first = [MetricFamily("a_bytes", "A").add(1, env="prod"), MetricFamily("b_seconds", "B").add(2, env="prod")]
    second = [MetricFamily("a_bytes", "A").add(10, env="staging")]
    third = [MetricFamily("a_bytes", "A").add(100, env="prod")]
    text = metrics.render(first)
    text = metrics.render(metrics.merge(metrics.parse(text), second, {"env": "staging"}))
    text = metrics.render(metrics.merge(metrics.parse(text), third, {"env": "prod"}))
    samples = parsed(text)
    assert samples["a_bytes"]["samples"] == {("a_bytes", (("env", "prod"),)): 100,
                                             ("a_bytes", (("env", "staging"),)): 10}
    assert samples["b_seconds"]["samples"] == {("b_seconds", (("env", "prod"),)): 2}  # not rewritten: kept


def test_write_textfile_is_atomic_and_world_readable(tmp_path):
    path = tmp_path / "textfiles" / "opsbook.prom"
    metrics.write_textfile(path, [MetricFamily("a_bytes", "A").add(1, env="prod")])
    metrics.write_textfile(path, [MetricFamily("a_bytes", "A").add(2, env="staging")], replace={"env": "staging"})
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert sorted(os.listdir(path.parent)) == ["opsbook.prom"]  # no temporary left behind
    assert parsed(path.read_text())["a_bytes"]["samples"] == {("a_bytes", (("env", "prod"),)): 1,
                                                              ("a_bytes", (("env", "staging"),)): 2}
    metrics.write_textfile(path, [MetricFamily("c_bytes", "C").add(3)])  # no replace: exactly these families
    assert list(parsed(path.read_text())) == ["c_bytes"]
