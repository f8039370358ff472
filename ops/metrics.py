"""Prometheus textfiles (node_exporter's textfile collector): conventional names, atomic writes.

A textfile holds metric families, each with one HELP and one TYPE line and its
samples. Several writers (backup, status) and several environments may share a
file: `write_textfile(..., replace={"env": "prod"})` replaces only the samples
carrying those labels in the families being written and keeps everything else.
The file is written to a temporary name and renamed, so a scrape never reads half.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import field
from pathlib import Path

from ops.errors import UsageError
from ops.lazy_dataclasses import dataclass
from ops.patterns import Pattern

TYPES = ("gauge", "counter")
_NAME = Pattern(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = Pattern(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LABEL = Pattern(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')
_SAMPLE = Pattern(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?\s*$")


@dataclass(frozen=True)
class Sample:
    """One sample of a Prometheus metric: its value and labels."""

    value: float
    labels: tuple[tuple[str, str], ...] = ()

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


@dataclass
class MetricFamily:
    """One metric: counters end in `_total`, gauges never do; units in the name (`_bytes`, `_seconds`)."""

    name: str
    help: str
    type: str = "gauge"
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_family(self.name, self.type)

    def add(self, value: float, **labels: str) -> MetricFamily:
        for name in labels:
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
                raise UsageError(f"metric {self.name}: invalid label name {name!r}")
        self.samples.append(Sample(float(value), tuple(sorted((k, str(v)) for k, v in labels.items()))))
        return self


def check_family(name: str, kind: str) -> None:
    if not _NAME.fullmatch(name):
        raise UsageError(f"invalid metric name {name!r}", hint="letters, digits, _ and :, not starting with a digit")
    if kind not in TYPES:
        raise UsageError(f"metric {name}: type {kind!r} is not one of {', '.join(TYPES)}")
    if (kind == "counter") != name.endswith("_total"):
        raise UsageError(f"metric {name}: only counters end in _total (it is a {kind})",
                         hint="name counters x_total and gauges without the suffix")


# --- rendering ---------------------------------------------------------------------------------


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return f"{value:.15g}"


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _unescape_label_value(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def sample_line(name: str, sample: Sample) -> str:
    labels = ",".join(f'{key}="{escape_label_value(value)}"' for key, value in sample.labels)
    return f"{name}{{{labels}}} {format_value(sample.value)}" if labels else f"{name} {format_value(sample.value)}"


def render(families: Iterable[MetricFamily]) -> str:
    """The text exposition format, families sorted by name, samples by labels."""
    lines: list[str] = []
    for family in sorted(families, key=lambda f: f.name):
        lines += [f"# HELP {family.name} {escape_help(family.help)}", f"# TYPE {family.name} {family.type}"]
        lines += [sample_line(family.name, s) for s in sorted(family.samples, key=lambda s: s.labels)]
    return "\n".join(lines) + "\n" if lines else ""


# --- reading our own files back (to merge) -----------------------------------------------------


def parse(text: str) -> list[MetricFamily]:
    """Families of a textfile this module wrote; lines it does not understand are dropped."""
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples: dict[str, list[Sample]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            helps[name] = help_text.replace("\\n", "\n").replace("\\\\", "\\")
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            types[name] = kind.strip()
        elif line.strip() and not line.startswith("#"):
            parsed = _parse_sample(line)
            if parsed:
                samples.setdefault(parsed[0], []).append(parsed[1])
    families = []
    for name, kind in types.items():
        try:
            families.append(MetricFamily(name, helps.get(name, name), kind, samples.get(name, [])))
        except UsageError:
            continue  # not ours (another type or naming): dropped rather than rewritten wrong
    return families


def _parse_sample(line: str) -> tuple[str, Sample] | None:
    match = _SAMPLE.match(line.strip())
    if not match:
        return None
    try:
        value = float(match["value"])
    except ValueError:
        return None
    labels = tuple(sorted((key, _unescape_label_value(raw)) for key, raw in _LABEL.findall(match["labels"] or "")))
    return match["name"], Sample(value, labels)


def merge(existing: list[MetricFamily], new: list[MetricFamily], replace: dict[str, str]) -> list[MetricFamily]:
    """`new` families plus what `existing` holds that they do not replace.

    In a family being written, old samples whose labels include every `replace` pair
    are dropped (they are being rewritten); other samples and other families stay.
    """
    wanted = set(replace.items())
    merged = {family.name: MetricFamily(family.name, family.help, family.type, list(family.samples))
              for family in existing}
    for family in new:
        old = merged.get(family.name)
        kept = [s for s in old.samples if not wanted <= set(s.labels)] if old and old.type == family.type else []
        merged[family.name] = MetricFamily(family.name, family.help, family.type, kept + list(family.samples))
    return list(merged.values())


# --- writing -----------------------------------------------------------------------------------


def write_textfile(path: Path | str, families: list[MetricFamily], *, replace: dict[str, str] | None = None) -> None:
    """Write `families` to `path` atomically (temp file + rename), mode 0644.

    Without `replace` the file holds exactly `families`; with it, the file's other
    samples are kept (see `merge`).
    """
    path = Path(path)
    if replace is not None:
        existing = parse(path.read_text()) if path.exists() else []
        families = merge(existing, families, replace)
    text = render(families)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.chmod(0o644)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def gauges(values: dict[str, float], helps: dict[str, str], **labels: str) -> list[MetricFamily]:
    """One gauge family per value, each with one sample carrying `labels`."""
    return [MetricFamily(name, helps[name]).add(value, **labels) for name, value in values.items()]
