"""The reports' SVG charts: one mark per point with its title, axes up to a round number, the target line."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

import pytest

from ops.svg_chart import SECONDS, Axes, Point, bar_chart, line_chart, nice_ceiling, y_axis

SVG = "{http://www.w3.org/2000/svg}"


def parsed(figure: str) -> ElementTree.Element:
    return ElementTree.fromstring(figure.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1))


def seconds(value: float) -> str:
    return f"{value:g}s"


PLAIN = Axes(seconds)


@pytest.mark.parametrize(("value", "top"), [(0, 1), (0.7, 1), (1, 1), (1.2, 2), (2.1, 2.5), (3, 5), (7, 10),
                                            (430, 500), (1800, 2000)])
def test_the_axis_ends_at_a_round_number(value, top):
    assert nice_ceiling(value) == top


@pytest.mark.parametrize(("largest", "scales", "axis"), [
    (0, (1.0,), (1, 1)), (9, (1.0,), (10, 2.5)), (430, (1.0,), (600, 200)),
    (1000, SECONDS, (1200, 300)),  # 16m 40s: up to 20 minutes in steps of 5
    (97200, SECONDS, (108000, 36000)),  # 27 hours: up to 30 in steps of 10
    (50, SECONDS, (60, 20))])
def test_the_y_axis_steps_in_round_numbers_of_its_unit(largest, scales, axis):
    assert y_axis(largest, scales) == axis


def test_a_line_chart_has_a_titled_dot_per_point_a_gap_where_one_is_missing_and_the_target():
    points = [Point("a", 10, kind="passed"), Point("b", None, kind="failed"), Point("c", 30), Point("d", 40)]
    figure = parsed(line_chart("rto", "RTO <of> drills", points, PLAIN, target=60, target_label="RTO target"))
    assert figure.get("data-points") == "4"
    svg = figure.find(f"{SVG}svg")
    assert svg.get("role") == "img" and svg.findtext(f"{SVG}title") == "RTO <of> drills"  # escaped, read back
    dots = svg.findall(f"{SVG}circle")
    assert [d.get("data-value") for d in dots] == ["10", "", "30", "40"]
    assert [d.findtext(f"{SVG}title") for d in dots] == ["a: 10s", "b: not measured", "c: 30s", "d: 40s"]
    assert "missing" in dots[1].get("class") and "passed" in dots[0].get("class")
    assert len(svg.findall(f"{SVG}polyline")) == 1  # c–d; a stands alone
    (target,) = svg.findall(f"{SVG}line[@class='target']")
    assert target.findtext(f"{SVG}title") == "RTO target: 60s"
    top = 220 - 36 - 14  # the plot's height: 60 * 1.05 → axis up to 80 in steps of 20
    assert float(target.get("y1")) == pytest.approx(14 + top - 60 / 80 * top, abs=0.1)
    assert [t.text for t in svg.findall(f"{SVG}text") if t.get("text-anchor") == "end"][:4] == [
        "0s", "20s", "40s", "60s"]
    assert svg.findtext(f"{SVG}desc") == "3 of 4 measured; RTO target 60s"


def test_a_bar_chart_draws_each_point_and_places_them_on_a_time_axis():
    points = [Point(f"day {n}", n * 100.0, x=n / 89, kind="verified" if n % 2 else "unverified")
              for n in range(0, 90, 3)]
    svg = parsed(bar_chart("sizes", "Backup sizes", points, PLAIN)).find(f"{SVG}svg")
    bars = svg.findall(f"{SVG}rect")
    assert len(bars) == 30 and not svg.findall(f"{SVG}line[@class='target']")
    lefts = [float(bar.get("x")) + float(bar.get("width")) / 2 for bar in bars]
    assert lefts == sorted(lefts) and lefts[0] == pytest.approx(84 + 46, abs=0.1)
    assert lefts[-1] == pytest.approx(84 + 46 + (480 - 8 - 84 - 92) * 87 / 89, abs=0.1)
    assert float(bars[0].get("height")) == 0 and float(bars[-1].get("height")) > 0
    labels = [text.text for text in svg.findall(f"{SVG}text") if "x-tick" in text.get("class")]
    assert labels == ["day 0", "day 30", "day 87"]  # never closer than a label's width


def test_an_empty_chart_still_has_axes_and_says_nothing_was_measured():
    svg = parsed(line_chart("none", "Nothing yet", [], PLAIN)).find(f"{SVG}svg")
    assert svg.findtext(f"{SVG}desc") == "0 of 0 measured" and len(svg.findall(f"{SVG}line[@class='axis']")) == 2


def test_a_time_axis_takes_its_own_labels():
    axes = Axes(seconds, x_ticks=[(0.0, "Sep 2"), (0.5, "Oct 17"), (1.0, "Dec 1")])
    svg = parsed(bar_chart("t", "Backups", [Point("b1", 5, x=1.0)], axes)).find(f"{SVG}svg")
    ticks = [(t.text, t.get("x")) for t in svg.findall(f"{SVG}text") if "x-tick" in t.get("class")]
    assert ticks == [("Sep 2", "130.0"), ("Oct 17", "278.0"), ("Dec 1", "426.0")]  # under the points' places
