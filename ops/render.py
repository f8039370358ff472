"""The one Jinja environment: the package's templates (ops/templates/), StrictUndefined, operator overrides.

A template that reads a field the context does not have is an error naming the
template and the field, never a blank in a notice sent to customers. Operators
override any template by putting a file with the same relative name in the
folder named by the inventory (`incidents.templates_dir`): it is searched first.
The one module that imports jinja2, inside the functions that use it (importlib.resources likewise).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops.clock import parse_time
from ops.errors import InventoryError
from ops.notify import Notice
from ops.secrets import redact

if TYPE_CHECKING:
    from collections.abc import Callable

    import jinja2

    from ops.incidents import Incident
    from ops.notify import Notice

@functools.cache
def templates_dir() -> Path:
    """The package data, wherever the package is installed (a checkout, a wheel): Jinja and the drill report
    read it as files. importlib.resources (it pulls in zipfile) is imported on first use."""
    from importlib import resources

    return Path(str(resources.files("ops") / "templates"))


class TemplateError(InventoryError):
    """A template is missing, malformed, or reads a field the context lacks (exit 2: fix the template)."""


def template_environment(override_dir: str | Path | None = None, *, trim_blocks: bool = True,
                         filters: dict[str, Callable[..., Any]] | None = None,
                         autoescape: bool = False) -> jinja2.Environment:
    """Templates from the override folder first, then the package's; `trim_blocks=False` for templates
    written without block trimming (the env file, the drill report), whose output must stay byte for byte;
    `autoescape=True` for HTML and XML (the status page), where every value is escaped."""
    import jinja2

    search = [str(override_dir)] if override_dir else []
    jinja = jinja2.Environment(
        loader=jinja2.FileSystemLoader([*search, str(templates_dir())]),
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,  # off for Markdown, JSON, env files and plain text: JSON strings go through |tojson
        keep_trailing_newline=True,
        trim_blocks=trim_blocks,
        lstrip_blocks=trim_blocks,
    )
    jinja.filters.update(filters or {})
    return jinja


def render_template(name: str, context: dict[str, Any], override_dir: str | Path | None = None, *,
                    autoescape: bool = False) -> str:
    """`name` (relative to ops/templates/, e.g. "incident/resolved/email.public.txt.j2") rendered with `context`."""
    import jinja2

    where = f"template {name}" + (f" (overrides searched first in {override_dir})" if override_dir else "")
    try:
        template = template_environment(override_dir, autoescape=autoescape).get_template(name)
        return template.render(**context)
    except jinja2.TemplateNotFound as error:
        raise TemplateError(f"{where}: not found ({error.name})",
                            hint=f"restore it under {templates_dir()} or add it to the override folder") from None
    except jinja2.TemplateSyntaxError as error:
        raise TemplateError(f"{where}: syntax error at {error.filename or error.name}, line {error.lineno}: "
                            f"{redact(error.message)}", hint="fix the template at that line") from None
    except jinja2.UndefinedError as error:
        raise TemplateError(f"{where}: a field it uses is missing: {redact(error.message)}",
                            hint="pass that field in the context, or fix the template (a field is never "
                                 "left blank)") from None


def render_markup(name: str, context: dict[str, Any]) -> str:
    """An HTML or XML template (the status page, its feed): every value escaped, no operator overrides."""
    return render_template(name, context, autoescape=True)


def render_json(name: str, context: dict[str, Any], override_dir: str | Path | None = None) -> dict[str, Any]:
    """A template that must produce a JSON object (webhook payloads): parsed, so a broken one fails here."""
    text = render_template(name, context, override_dir)
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise TemplateError(f"template {name} did not render valid JSON: {error.msg} at line {error.lineno}",
                            hint="strings in JSON templates must go through |tojson") from None
    if not isinstance(payload, dict):
        raise TemplateError(f"template {name} must render a JSON object, got {type(payload).__name__}")
    return payload


# --- incident notices -----------------------------------------------------------------------------

NOTICE_FORMATS = {"status_page": "md", "webhook": "json", "email": "txt"}
NOTICE_AUDIENCES = ("public", "internal")
STATE_LABELS = {"investigating": "Investigating", "identified": "Identified", "monitoring": "Monitoring",
                "resolved": "Resolved"}
STATUS_LABELS = {"operational": "Operational", "degraded_performance": "Degraded performance",
                 "partial_outage": "Partial outage", "major_outage": "Major outage"}


def notice_template(state: str, notice_format: str, audience: str) -> str:
    return f"incident/{state}/{notice_format}.{audience}.{NOTICE_FORMATS[notice_format]}.j2"


def human_time(text: str | None) -> str | None:
    """"2026-11-23T02:30:00Z" → "2026-11-23 02:30 UTC": what a reader in any time zone can act on."""
    if not text:
        return None
    return parse_time(text).strftime("%Y-%m-%d %H:%M UTC")


def notice_context(incident: Incident, triage: str | None = None) -> dict[str, Any]:
    """The curated context of a notice: only fields meant for readers, every text redacted."""
    last = next((e for e in reversed(incident.timeline) if e.kind in {"opened", "update", "resolved"}), None)
    duration = None
    if incident.resolved_at:
        minutes = int((parse_time(incident.resolved_at) - parse_time(incident.opened_at)).total_seconds() // 60)
        duration = f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
    context = {
        "incident": {"id": incident.id, "env": incident.env, "project": incident.project, "title": incident.title,
                     "impact": incident.impact, "operator": incident.operator,
                     "opened_at": human_time(incident.opened_at), "resolved_at": human_time(incident.resolved_at),
                     "duration": duration},
        "update": {"state": incident.state, "state_label": STATE_LABELS[incident.state],
                   "at": human_time(last.at if last else incident.opened_at),
                   "operator": last.operator if last else incident.operator, "message": incident.message,
                   "next_update": human_time(incident.next_update), "cause": incident.cause,
                   "postmortem": incident.postmortem},
        "components": [{"name": name, "status": status, "status_label": STATUS_LABELS[status]}
                       for name, status in incident.components.items()],
        "triage": triage or None,
    }
    return _redacted(context)


def _redacted(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _redacted(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_redacted(value) for value in node]
    return redact(node) if isinstance(node, str) else node


def render_notice(state: str, notice_format: str, audience: str, context: dict[str, Any],
                  override_dir: str | Path | None = None) -> Notice:
    name = notice_template(state, notice_format, audience)
    if notice_format == "webhook":
        payload = render_json(name, context, override_dir)
        if not isinstance(payload.get("text"), str) or not isinstance(payload.get("blocks", []), list):
            raise TemplateError(f"template {name}: a webhook payload needs \"text\" (a string) and \"blocks\"")
        return Notice(notice_format, audience, payload["text"].split("\n")[0], redact(json.dumps(payload)), state)
    text = redact(render_template(name, context, override_dir))
    if notice_format == "email":
        first, _, body = text.lstrip("\n").partition("\n")
        if not first.startswith("Subject:") or not first[len("Subject:"):].strip():
            raise TemplateError(f"template {name}: the first line must be \"Subject: …\"")
        return Notice(notice_format, audience, first[len("Subject:"):].strip(), body.strip("\n") + "\n", state)
    return Notice(notice_format, audience, context["incident"]["title"], text.strip("\n") + "\n", state)


def incident_notices(incident: Incident, *, triage: str | None = None, override_dir: str | Path | None = None,
                     formats: tuple[str, ...] = tuple(NOTICE_FORMATS),
                     audiences: tuple[str, ...] = NOTICE_AUDIENCES) -> list[Notice]:
    """Every format for every audience for the incident's current state (a broken template fails them all)."""
    context = notice_context(incident, triage)
    return [render_notice(incident.state, notice_format, audience, context, override_dir)
            for notice_format in formats for audience in audiences]
