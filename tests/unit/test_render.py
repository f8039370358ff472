"""Incident notices: every state × format × audience rendered from the real templates, and their failures."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from ops import incidents
from ops.render import (
    NOTICE_AUDIENCES,
    NOTICE_FORMATS,
    TemplateError,
    incident_notices,
    notice_context,
    notice_template,
    render_notice,
    render_template,
    templates_dir,
)
from ops.secrets import Secret

OPENED = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
ENV = SimpleNamespace(name="prod", inventory=SimpleNamespace(project="acme-shop"))
TRIAGE = "triage of prod: 1 failing: storage bucket (HeadBucket: 403)\n- storage bucket: HeadBucket: 403"


def incident_in(state: str) -> incidents.Incident:
    incident = incidents.new_incident(ENV, title="Uploads failing", impact="major", components="api,uploads",
                                      message="Image uploads return errors", operator="ann", now=OPENED)
    if state in {"identified", "monitoring"}:
        incidents.apply_update(incident, state=state, message="Storage keys expired",
                               components="uploads=major_outage", next_update="45m", operator="bob",
                               now=OPENED + timedelta(minutes=20))
    if state == "resolved":
        incidents.apply_resolve(incident, message="Keys rotated; uploads work again", cause="an expired R2 key",
                                postmortem="https://wiki.example/pm/42", operator="bob",
                                now=OPENED + timedelta(minutes=95))
    return incident


CASES = [(state, notice_format, audience) for state in incidents.STATES for notice_format in NOTICE_FORMATS
         for audience in NOTICE_AUDIENCES]


def test_one_template_per_state_format_and_audience() -> None:
    for state, notice_format, audience in CASES:
        assert (templates_dir() / notice_template(state, notice_format, audience)).is_file()


@pytest.mark.parametrize(("state", "notice_format", "audience"), CASES)
def test_every_notice_says_what_a_reader_needs(state: str, notice_format: str, audience: str) -> None:
    incident = incident_in(state)
    notice = render_notice(state, notice_format, audience, notice_context(incident, TRIAGE))
    text = notice.body
    if notice_format == "webhook":
        payload = json.loads(text)
        assert isinstance(payload["text"], str) and payload["blocks"][0]["type"] == "header"
        assert all(block["type"] in {"header", "section", "context"} for block in payload["blocks"])
        text = json.dumps(payload, ensure_ascii=False)
    if notice_format == "email":
        assert notice.subject.startswith(f"[{state.capitalize()}] Uploads failing")
        assert ("prod" in notice.subject) == (audience == "internal")
    assert "Uploads failing" in text and state.capitalize() in text
    assert "uploads" in text and "api" in text
    if state == "resolved":
        assert "Keys rotated; uploads work again" in text and "an expired R2 key" in text
        assert "https://wiki.example/pm/42" in text and "1 h 35 min" in text
        assert "Operational" in text and "Next update" not in text
    else:
        assert "Next update by 2026-11-23" in text and "UTC" in text
        assert "Many customers are affected" in text
    if state in {"identified", "monitoring"}:
        assert "Storage keys expired" in text and "Major outage" in text and "03:05 UTC" in text
    internal_only = [incident.id, "HeadBucket: 403", "by ann"]
    for fragment in internal_only:
        assert (fragment in text) == (audience == "internal"), (fragment, notice_format, audience)


@pytest.mark.parametrize(("state", "notice_format"), [(s, f) for s in incidents.STATES for f in NOTICE_FORMATS])
def test_a_missing_field_is_a_clear_error_never_a_blank(state: str, notice_format: str) -> None:
    context = notice_context(incident_in(state))
    del context["incident"]["title"]
    with pytest.raises(TemplateError) as caught:
        render_notice(state, notice_format, "public", context)
    message = str(caught.value)
    assert notice_template(state, notice_format, "public") in message and "'title'" in message
    assert caught.value.exit_code == 2


def test_a_missing_top_level_field_names_it() -> None:
    context = notice_context(incident_in("investigating"))
    del context["components"]
    with pytest.raises(TemplateError, match="'components' is undefined"):
        render_notice("investigating", "status_page", "internal", context)


def test_secrets_in_the_context_are_masked_in_every_notice() -> None:
    planted = Secret("sk-live-9d8f7a6b5c4d3e2f")
    incident = incident_in("investigating")
    incident.message = f"error from postgresql://app:{'hunter2hunter2'}@db/app and key {planted.reveal()}"
    for notice in incident_notices(incident, triage=f"log: token={planted.reveal()}"):
        assert planted.reveal() not in notice.body + notice.subject
        assert "hunter2hunter2" not in notice.body


def test_an_operator_template_overrides_the_shipped_one(tmp_path: Path) -> None:
    override = tmp_path / "incident" / "investigating"
    override.mkdir(parents=True)
    (override / "status_page.public.md.j2").write_text(
        '{% extends "incident/_status_page.md.j2" %}{% set audience = "public" %}'
        "{% block body %}ACME is on it. {{ update.next_update }}{% endblock %}")
    notices = incident_notices(incident_in("investigating"), override_dir=tmp_path)
    public = next(n for n in notices if n.format == "status_page" and n.audience == "public")
    internal = next(n for n in notices if n.format == "status_page" and n.audience == "internal")
    assert "ACME is on it. 2026-11-23 02:30 UTC" in public.body and "What we know" not in public.body
    assert "What we know" in internal.body  # the other templates still come from ops/templates/


def test_broken_templates_are_named(tmp_path: Path) -> None:
    (tmp_path / "incident" / "identified").mkdir(parents=True)
    (tmp_path / "incident" / "identified" / "webhook.public.json.j2").write_text('{"text": {{ incident.title }}}')
    (tmp_path / "incident" / "identified" / "email.public.txt.j2").write_text("{% if %}")
    context = notice_context(incident_in("identified"))
    with pytest.raises(TemplateError, match="did not render valid JSON"):
        render_notice("identified", "webhook", "public", context, tmp_path)
    with pytest.raises(TemplateError, match=r"syntax error .* line 1"):
        render_notice("identified", "email", "public", context, tmp_path)
    with pytest.raises(TemplateError, match="not found"):
        render_template("incident/nope.j2", {})
