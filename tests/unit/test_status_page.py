"""The status page renderer: incidents + the inventory's section + now → index.html, index.json, feed.atom.
Only the public audience's text reaches them (an incident planted with internal text and a secret proves it)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest

from ops import incidents, inventory, maintenance
from ops.errors import CheckFailed, InventoryError
from ops.render import templates_dir
from ops.secrets import Secret
from ops.status_page import page_model, render_files, status_page_config

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ATOM = "{http://www.w3.org/2005/Atom}"
SECTION = """
    status_page:
      title: Shop status
      public_base: https://status.shop.example/
      components:
        - {name: api, description: The public API, group: Core}
        - {name: uploads, description: Image uploads, group: Core}
        - {name: website}
"""


@pytest.fixture
def env(tmp_path: Path):
    file = tmp_path / "inventory.yaml"
    file.write_text("project: acme\nstate_dir: state\nenvs:\n  prod:\n    storage: {bucket: assets}\n" + SECTION)
    return inventory.load(file).environment("prod")


def story(env, *, resolved: bool = True, at: datetime = NOW - timedelta(hours=3)) -> incidents.Incident:
    incident = incidents.new_incident(env, title="Uploads failing", impact="major", components="uploads",
                                      message="Image uploads return errors", operator="ann", now=at)
    incidents.apply_update(incident, state="identified", message="A storage key expired",
                           components="api=degraded_performance", next_update="30m", operator="ann",
                           now=at + timedelta(minutes=10))
    if resolved:
        incidents.apply_resolve(incident, message="Uploads work again", cause="an expired key", postmortem=None,
                                operator="ann", now=at + timedelta(minutes=40))
    return incident


def test_the_section_is_read_and_checked(env, tmp_path: Path) -> None:
    config = status_page_config(env)
    assert [c.name for c in config.components] == ["api", "uploads", "website"]
    assert config.prefix == "status/" and config.folder is None and config.history_days == 90
    file = tmp_path / "both.yaml"
    file.write_text("project: acme\nenvs:\n  prod:\n    status_page: {title: t, prefix: s/, folder: out, "
                    "components: [{name: api}]}\n")
    with pytest.raises(InventoryError, match="not both"):
        status_page_config(inventory.load(file).environment("prod"))
    file.write_text("project: acme\nenvs:\n  prod:\n    status_page: {title: t, components: [], colour: red}\n")
    with pytest.raises(InventoryError) as error:
        inventory.load(file)
    assert "status_page.colour: unknown key" in str(error.value.message) + str(error.value)


def test_components_take_the_worst_status_of_the_open_incidents(env) -> None:
    model = page_model(status_page_config(env), [story(env, resolved=False)], NOW)
    assert model["status"] == "partial_outage" and model["status_label"] == "Partial outage"
    assert {c["name"]: c["status"] for c in model["components"]} == {
        "api": "degraded_performance", "uploads": "partial_outage", "website": "operational"}
    (open_incident,) = model["open_incidents"]
    assert [u["state"] for u in open_incident["updates"]] == ["investigating", "identified"]
    uploads = model["components"][1]["history"]
    assert len(uploads) == 90 and uploads[-1] == {"date": "2026-11-23", "status": "partial_outage",
                                                  "status_label": "Partial outage"}
    assert all(day["status"] == "operational" for day in uploads[:-1])


def test_a_resolved_incident_is_history_until_it_is_older_than_the_window(env) -> None:
    config = status_page_config(env)
    model = page_model(config, [story(env)], NOW)
    assert model["status"] == "operational" and not model["open_incidents"]
    assert [u["state"] for u in model["past_incidents"][0]["updates"]] == ["investigating", "identified", "resolved"]
    old = page_model(config, [story(env, at=NOW - timedelta(days=91))], NOW)
    assert not old["past_incidents"] and old["updated_at"] is None


def test_the_same_state_renders_the_same_bytes_all_day(env) -> None:
    config, incident = status_page_config(env), story(env)
    assert render_files(config, [incident], NOW) == render_files(config, [incident], NOW + timedelta(hours=11))


def test_only_public_text_reaches_the_three_files(env) -> None:
    planted = Secret("sk_live_status_5f4e3d2c1b0a")
    incident = story(env, resolved=False)
    incident.operator = "operator-internal-ann"
    incident.timeline[0].operator = "operator-internal-ann"
    incident.message = f"key {planted.reveal()} rejected"
    incidents.add_entry(incident, "triage", "ann", message="INTERNAL-TRIAGE web1 10.0.0.7 failing",
                        detail={"failing": ["INTERNAL-HOST-web1"]})
    incidents.add_entry(incident, "notice", "ann", detail={"deliveries": [
        {"channel": "notify[0] webhook (https://hooks.example/INTERNAL-HOOK)", "ok": True, "detail": "sent"}]})
    incidents.add_entry(incident, "rollback", "ann", message="INTERNAL-ROLLBACK to r1", detail={"run_id": "r-1"})
    incidents.apply_update(incident, state="monitoring", message=f"Fixed; the old key {planted.reveal()} is revoked",
                           components=None, next_update=None, operator="ann", now=NOW)
    files = render_files(status_page_config(env), [incident], NOW)
    assert set(files) == {"index.html", "index.json", "feed.atom"}
    for name, data in files.items():
        text = data.decode()
        for internal in ("INTERNAL-", "operator-internal-ann", incident.id, "acme", "prod", planted.reveal(),
                         "hooks.example"):
            assert internal not in text, f"{internal!r} reached {name}"
        assert "Fixed; the old key *** is revoked" in text, name


def test_index_json_matches_the_shipped_schema(env) -> None:
    schema = json.loads((templates_dir() / "status_page" / "index.schema.json").read_text())
    for incident in (story(env), story(env, resolved=False)):
        document = json.loads(render_files(status_page_config(env), [incident], NOW)["index.json"])
        jsonschema.Draft202012Validator(schema).validate(document)
    document["status"]["indicator"] = "down"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(document)


def test_the_feed_is_atom_newest_first(env) -> None:
    feed = ElementTree.fromstring(render_files(status_page_config(env), [story(env)], NOW)["feed.atom"])
    assert feed.tag == f"{ATOM}feed"
    for element in ("id", "title", "updated", "author"):
        assert feed.find(f"{ATOM}{element}") is not None, element
    entries = feed.findall(f"{ATOM}entry")
    assert [e.findtext(f"{ATOM}title") for e in entries] == [
        "Resolved: Uploads failing", "Identified: Uploads failing", "Investigating: Uploads failing"]
    assert all(e.findtext(f"{ATOM}id").startswith("tag:status.shop.example,2026:status/incident-") for e in entries)
    assert entries[0].find(f"{ATOM}link").get("href").startswith("https://status.shop.example/index.html#incident-")


class Resources(HTMLParser):
    """Every attribute of the page that would make a browser fetch something."""

    def __init__(self) -> None:
        super().__init__()
        self.fetched: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.scripts += tag == "script"
        for name in ("src", "srcset", "poster", "data"):
            if values.get(name):
                self.fetched.append(f"{tag} {name}={values[name]}")
        if tag == "link" and "alternate" not in (values.get("rel") or ""):
            self.fetched.append(f"link {values}")


def test_the_page_is_self_contained_and_escapes_what_it_shows(env) -> None:
    incident = story(env, resolved=False)
    incident.title = "<script>alert(1)</script> Uploads"
    html = render_files(status_page_config(env), [incident], NOW)["index.html"].decode()
    parser = Resources()
    parser.feed(html)
    assert parser.fetched == [] and parser.scripts == 0
    assert "url(" not in html and "@import" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Uploads" in html
    assert "prefers-color-scheme: dark" in html and 'name="viewport"' in html


def test_a_running_window_puts_its_components_under_maintenance_unless_an_incident_is_worse(env) -> None:
    window = maintenance.new_window(env, title="Database upgrade", start="2026-11-23T11:00Z", duration="2h",
                                    components="api,uploads", message=None, operator="ann", now=NOW)
    config = status_page_config(env)
    upcoming = page_model(config, [], NOW - timedelta(hours=2), [window])
    assert upcoming["status"] == "operational" and [w["state"] for w in upcoming["maintenance"]] == ["scheduled"]
    maintenance.transition(window, "in_progress", message=None, operator="ann", now=NOW)
    running = page_model(config, [story(env, resolved=False)], NOW, [window])
    assert {c["name"]: c["status"] for c in running["components"]} == {
        "api": "degraded_performance", "uploads": "partial_outage", "website": "operational"}
    alone = page_model(config, [], NOW, [window])
    assert alone["status"] == "under_maintenance" and alone["status_label"] == "Under maintenance"
    maintenance.transition(window, "completed", message="Done", operator="ann", now=NOW)
    assert page_model(config, [], NOW, [window])["maintenance"] == []
    with pytest.raises(CheckFailed):
        maintenance.transition(window, "cancelled", message=None, operator="ann", now=NOW)


def test_updates_made_within_one_second_stay_newest_first_in_the_feed(env) -> None:
    window = maintenance.new_window(env, title="Database upgrade", start="2026-11-23T11:00Z", duration="2h",
                                    components="api", message=None, operator="ann", now=NOW)
    maintenance.transition(window, "in_progress", message=None, operator="ann", now=NOW)
    maintenance.transition(window, "completed", message="Done", operator="ann", now=NOW)
    feed = ElementTree.fromstring(render_files(status_page_config(env), [], NOW, [window])["feed.atom"])
    assert [e.findtext(f"{ATOM}title") for e in feed.findall(f"{ATOM}entry")] == [
        "Maintenance completed: Database upgrade", "Maintenance in progress: Database upgrade",
        "Maintenance scheduled: Database upgrade"]
