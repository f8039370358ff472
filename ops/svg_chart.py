"""Small inline SVG charts for the HTML reports (the drill report, `status --html`): pure, no JavaScript.

A chart is a line (points joined in order) or bars, one mark per point, each with a <title> a screen reader
and a hovering mouse both read; the y axis starts at zero and ends at a round number above the largest value
and the target; an optional target line is drawn dashed with its own <title>. Colours come from CSS classes
(`point`, `bar`, `target`, `axis`, and each point's `kind`), so one stylesheet covers light and dark.

Every mark carries `data-value` (the number, or "" when not measured) so tests can read the chart back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

from ops.lazy_dataclasses import dataclass

WIDTH, HEIGHT = 480, 220
LEFT, RIGHT, TOP, BOTTOM = 84, 8, 14, 36
LABEL_WIDTH = 92  # room one x label takes (14px text): closer ones would overlap
INSET = LABEL_WIDTH / 2  # points start and end this far inside the plot, so their labels fit under them
Y_TICKS = 4  # about this many steps up the y axis
SECONDS = (1.0, 60.0, 3600.0, 86400.0)  # scales whose round numbers a y axis of durations shows
BYTES = tuple(float(1024 ** power) for power in range(5))


@dataclass(frozen=True)
class Point:
    """One value: `label` names it under the axis and in its title; `x` in [0, 1] places it on a time axis
    (None: points spread evenly); `kind` is a CSS class (passed, failed, verified…); `note` ends its title."""

    label: str
    value: float | None
    x: float | None = None
    kind: str = ""
    note: str = ""


def nice_ceiling(value: float) -> float:
    """The round number (1, 2, 2.5, 5 × 10ⁿ) at or above `value`."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value * (1 - 1e-9))


def y_axis(largest: float, scales: Sequence[float] = (1.0,)) -> tuple[float, float]:
    """(top, step) of a y axis holding `largest`: about Y_TICKS round steps in the largest of `scales` (minutes,
    hours; KiB, MiB) that `largest` holds twice, so ticks read "10m", "20m" rather than "16m 40s"."""
    scale = max((s for s in scales if largest >= 2 * s), default=min(scales))
    step = nice_ceiling(largest / scale / Y_TICKS) * scale if largest > 0 else scale
    return max(math.ceil(largest / step - 1e-9), 1) * step, step


@dataclass(frozen=True)
class Axes:
    """How values read: `unit` formats one (titles, ticks); `scales` are the units ticks are round in; `x_ticks`
    (position in [0, 1], label) replace the points' own labels under a time axis."""

    unit: Callable[[float], str]
    scales: Sequence[float] = (1.0,)
    x_ticks: Sequence[tuple[float, str]] | None = None


def line_chart(chart_id: str, title: str, points: Sequence[Point], axes: Axes, *, target: float | None = None,
               target_label: str = "target") -> str:
    """Points joined by a line (gaps where a value is missing), dots with titles, axes, the target line."""
    return _chart(chart_id, title, points, axes, target, target_label, bars=False)


def bar_chart(chart_id: str, title: str, points: Sequence[Point], axes: Axes, *, target: float | None = None,
              target_label: str = "target") -> str:
    """One bar per point (a missing value: an empty slot), with titles, axes and the target line."""
    return _chart(chart_id, title, points, axes, target, target_label, bars=True)


def _chart(chart_id: str, title: str, points: Sequence[Point], axes: Axes, target: float | None,
           target_label: str, *, bars: bool) -> str:
    unit = axes.unit
    values = [p.value for p in points if p.value is not None]
    top, step = y_axis(max([*values, target or 0.0, 0.0]) * 1.05, axes.scales)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    xs = [_x(point, index, len(points), plot_w) for index, point in enumerate(points)]

    def y(value: float) -> float:
        return TOP + plot_h - value / top * plot_h

    summary = f"{len(values)} of {len(points)} measured" + (f"; {target_label} {unit(target)}" if target else "")
    parts = [f'<svg class="chart-svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-labelledby="{chart_id}-title {chart_id}-desc" preserveAspectRatio="xMidYMid meet">',
             f'<title id="{chart_id}-title">{escape(title)}</title>',
             f'<desc id="{chart_id}-desc">{escape(summary)}</desc>',
             *_axes(top, step, unit, y, plot_w, plot_h),
             *(_x_ticks(axes.x_ticks, plot_w) if axes.x_ticks is not None else _x_labels(points, xs, plot_w))]
    if bars:
        parts += _bars(points, xs, y, unit, plot_w)
    else:
        parts += _line(points, xs, y, unit)
    if target is not None:
        parts.append(f'<line class="target" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(target):.1f}" '
                     f'y2="{y(target):.1f}"><title>{escape(target_label)}: {escape(unit(target))}</title></line>')
        parts.append(f'<text class="target-label" x="{LEFT + plot_w - 4}" y="{y(target) - 4:.1f}" '
                     f'text-anchor="end">{escape(target_label)} {escape(unit(target))}</text>')
    parts.append("</svg>")
    return (f'<figure class="chart" id="{chart_id}" data-points="{len(points)}">' + "\n".join(parts)
            + f"<figcaption>{escape(title)}</figcaption></figure>")


def _x(point: Point, index: int, count: int, plot_w: float) -> float:
    if point.x is not None:
        return _at(min(max(point.x, 0.0), 1.0), plot_w)
    if count <= 1:
        return _at(0.5, plot_w)
    return _at(index / (count - 1), plot_w)


def _at(position: float, plot_w: float) -> float:
    """Where a point at `position` in [0, 1] sits on the x axis."""
    return LEFT + INSET + position * (plot_w - 2 * INSET)


def _axes(top: float, step: float, unit: Callable[[float], str], y: Callable[[float], float], plot_w: float,
          plot_h: float) -> list[str]:
    out = [f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}"/>',
           f'<line class="axis" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{TOP + plot_h}" y2="{TOP + plot_h}"/>']
    for tick in range(round(top / step) + 1):
        value = step * tick
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>')
        out.append(f'<text class="tick" x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                   f"{escape(unit(value))}</text>")
    return out


def _x_labels(points: Sequence[Point], xs: list[float], plot_w: float) -> list[str]:
    """The first point's label, then every few so none overlap, and the last one's."""
    if not points:
        return []
    spacing = (plot_w - 2 * INSET) / max(len(points) - 1, 1)
    gap = max(math.ceil(LABEL_WIDTH / spacing), 1)
    chosen = list(range(0, len(points), gap))
    if chosen[-1] != len(points) - 1:
        if len(chosen) > 1 and (len(points) - 1 - chosen[-1]) * spacing < LABEL_WIDTH:
            chosen.pop()
        chosen.append(len(points) - 1)
    return [_tick_text(xs[i], points[i].label) for i in chosen]


def _x_ticks(ticks: Sequence[tuple[float, str]], plot_w: float) -> list[str]:
    return [_tick_text(_at(position, plot_w), label) for position, label in ticks]


def _tick_text(x: float, label: str) -> str:
    return (f'<text class="tick x-tick" x="{x:.1f}" y="{HEIGHT - BOTTOM + 20}" text-anchor="middle">'
            f"{escape(label)}</text>")


def _title(point: Point, unit: Callable[[float], str]) -> str:
    value = unit(point.value) if point.value is not None else "not measured"
    return escape(f"{point.label}: {value}" + (f", {point.note}" if point.note else ""))


def _data(point: Point) -> str:
    return "" if point.value is None else f"{point.value:g}"


def _bars(points: Sequence[Point], xs: list[float], y: Callable[[float], float], unit: Callable[[float], str],
          plot_w: float) -> list[str]:
    width = max(min((plot_w - 2 * INSET) / max(len(points), 1) * 0.7, 36.0), 2.0)
    base = y(0)
    return [f'<rect class="bar point {escape(point.kind)}" data-value="{_data(point)}" x="{x - width / 2:.1f}" '
            f'y="{y(point.value or 0):.1f}" width="{width:.1f}" height="{base - y(point.value or 0):.1f}">'
            f"<title>{_title(point, unit)}</title></rect>" for point, x in zip(points, xs, strict=True)]


def _line(points: Sequence[Point], xs: list[float], y: Callable[[float], float],
          unit: Callable[[float], str]) -> list[str]:
    out, run = [], []
    for point, x in zip(points, xs, strict=True):
        if point.value is None:
            out += [_polyline(run)] if len(run) > 1 else []
            run = []
        else:
            run.append(f"{x:.1f},{y(point.value):.1f}")
    out += [_polyline(run)] if len(run) > 1 else []
    for point, x in zip(points, xs, strict=True):
        cy = y(point.value if point.value is not None else 0)
        missing = "" if point.value is not None else " missing"
        out.append(f'<circle class="point {escape(point.kind)}{missing}" data-value="{_data(point)}" '
                   f'cx="{x:.1f}" cy="{cy:.1f}" r="5"><title>{_title(point, unit)}</title></circle>')
    return out


def _polyline(run: list[str]) -> str:
    return f'<polyline class="line" points="{" ".join(run)}"/>'
