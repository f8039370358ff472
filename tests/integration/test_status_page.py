"""The status page in a real browser: incident.open → update → resolve through the CLI publish it to the moto
bucket under its prefix; each stage is fetched back over HTTP and opened in headless Chromium (Debian's
`chromium`), its DOM checked, screenshots taken at phone and desktop widths; the page loads nothing from
anywhere (its HTML references no resource), axe-core (from the npm registry, injected into a copy of the page)
finds no serious violation in light or dark mode, the feed parses as Atom, index.json matches the shipped schema."""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from ops.render import templates_dir
from tests.cli import Opsbook
from tests.fixtures.browser import axe_violations, requires_chromium
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.shop import DEMO_MIGRATIONS

ATOM = "{http://www.w3.org/2005/Atom}"
PREFIX = "status/"

pytestmark = requires_chromium


class Page(HTMLParser):
    """What the tests read from a DOM: the overall state, the components' states, the incidents' updates,
    and every attribute that would make a browser fetch something."""

    def __init__(self, html: str):
        super().__init__()
        self.overall: str | None = None
        self.components: dict[str, str] = {}
        self.incidents: list[dict[str, Any]] = []
        self.fetches: list[str] = []
        self._message = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        classes = (values.get("class") or "").split()
        if values.get("id") == "overall":
            self.overall = values["data-status"]
        if "component" in classes:
            self.components[values["data-component"] or ""] = values["data-status"] or ""
        if tag == "article":
            self.incidents.append({"state": values["data-state"], "updates": [], "messages": []})
        if "update" in classes:
            self.incidents[-1]["updates"].append(values["data-state"])
        self._message = "message" in classes
        self.fetches += [f"{tag} {name}" for name in ("src", "srcset", "poster", "data", "background")
                         if values.get(name)]
        if tag == "script" or (tag == "link" and values.get("rel") != "alternate"):
            self.fetches.append(f"{tag} {values}")

    def handle_data(self, data: str) -> None:
        if self._message and data.strip():
            self.incidents[-1]["messages"].append(data.strip())
            self._message = False


@pytest.fixture
def shop(opsbook: Opsbook, s3_server: Any) -> dict[str, Any]:
    assets, backups = s3_server.make_bucket(), s3_server.make_bucket()
    # what serving it publicly takes: anyone may read the page's prefix (R2: a public bucket or custom domain)
    s3_server.client().put_bucket_policy(Bucket=assets.bucket, Policy=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                                                 "Resource": f"arn:aws:s3:::{assets.bucket}/{PREFIX}*"}]}))
    opsbook.environ["S3_SECRET"] = s3_server.secret_access_key.reveal()
    opsbook.write_inventory({"project": "shop", "default_env": "prod", "envs": {"prod": {
        "storage": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                    "bucket": assets.bucket, "access_key_id": s3_server.access_key_id,
                    "secret_access_key": "${env:S3_SECRET}"},
        "backups": {"bucket": backups.bucket, "prefix": "prod/"},
        "status_page": {"title": "Shop status", "prefix": PREFIX, "components": [
            {"name": "api", "description": "The public API", "group": "Core"},
            {"name": "uploads", "description": "Image uploads", "group": "Core"},
            {"name": "website", "description": "The shop's pages", "group": "Web"}]},
    }}})
    return {"base": f"{s3_server.endpoint}/{assets.bucket}/{PREFIX}", "secret": s3_server.secret_access_key.reveal()}


def fetched(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.headers["Content-Type"], response.read()


def ok(result: Any) -> Any:
    assert result.exit_code == 0, str(result)
    return result


def test_open_update_resolve_publish_the_page_a_browser_shows(opsbook, shop, tmp_path, axe_source, browser):
    stages = [("incident.open", "--title", "Uploads failing", "--impact", "major", "--components",
               "uploads,api=degraded_performance", "--message", f"Uploads fail with key {shop['secret']}",
               "--no-triage", "--json"),
              ("incident.update", "ID", "--status", "identified", "--message", "A storage key expired",
               "--components", "uploads=major_outage"),
              ("incident.resolve", "ID", "--message", "Uploads work again", "--cause", "an expired key")]
    expected = [("partial_outage", {"api": "degraded_performance", "uploads": "partial_outage"}),
                ("major_outage", {"api": "degraded_performance", "uploads": "major_outage"}),
                ("operational", {"api": "operational", "uploads": "operational"})]
    incident_id = None
    for number, (stage, (overall, components)) in enumerate(zip(stages, expected, strict=True), start=1):
        arguments = [incident_id if argument == "ID" else argument for argument in stage]
        result = ok(opsbook.run(*arguments))
        incident_id = incident_id or result.json()["incident"]["id"]
        assert "status page published: " in result.stderr, result.stderr
        kind, html = fetched(shop["base"] + "index.html")
        assert kind.startswith("text/html")
        (tmp_path / f"stage{number}.html").write_bytes(html)
        page = Page(browser.dom(shop["base"] + "index.html"))
        assert page.overall == overall
        assert page.components == {**components, "website": "operational"}
        assert page.fetches == []
        (incident,) = page.incidents
        assert incident["updates"] == ["investigating", "identified", "resolved"][:number]
        assert incident["messages"][0] == "Uploads fail with key ***"
        assert incident_id not in html.decode()
        for dark in (False, True) if number > 1 else ():  # an open incident, then a past one
            serious = [v for v in axe_violations(browser, tmp_path, html, axe_source, dark=dark)
                       if v["impact"] in {"serious", "critical"}]
            assert serious == [], serious

    for width, height in ((390, 844), (1280, 900)):
        shot = tmp_path / f"status-{width}.png"
        browser.screenshot(shop["base"] + "index.html", shot, (width, height))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    kind, feed = fetched(shop["base"] + "feed.atom")
    assert kind == "application/atom+xml"
    root = ElementTree.fromstring(feed)
    assert root.tag == f"{ATOM}feed" and all(root.find(f"{ATOM}{name}") is not None
                                             for name in ("id", "title", "updated", "author"))
    assert [entry.findtext(f"{ATOM}title") for entry in root.findall(f"{ATOM}entry")] == [
        "Resolved: Uploads failing", "Identified: Uploads failing", "Investigating: Uploads failing"]

    kind, index = fetched(shop["base"] + "index.json")
    assert kind == "application/json"
    schema = json.loads((templates_dir() / "status_page" / "index.schema.json").read_text())
    document = json.loads(index)
    jsonschema.Draft202012Validator(schema).validate(document)
    assert document["status"]["indicator"] == "operational" and document["recent_incidents"][0]["state"] == "resolved"
    assert_no_secret((html + feed + index).decode(), shop["secret"])

    # from another machine, which knows the incident only from the backups bucket: the same page
    shutil.rmtree(opsbook.state_dir / "incidents")
    assert "nothing to do" in ok(opsbook.run("status-page.publish")).stderr
    assert fetched(shop["base"] + "index.html")[1] == html
    assert_no_secret(opsbook, shop["secret"])


def test_publish_plans_then_writes_then_has_nothing_to_do(opsbook, shop):
    planned = ok(opsbook.run("status-page.publish", "--dry-run"))
    assert "would write 3 file(s) of the status page" in planned.stderr
    assert "index.html (text/html; charset=utf-8" in planned.stderr and "new)" in planned.stderr
    with pytest.raises(urllib.error.HTTPError) as missing:
        fetched(shop["base"] + "index.html")  # a dry run writes nothing
    assert missing.value.code == 404
    ok(opsbook.run("status-page.publish"))
    assert b"All systems operational" in fetched(shop["base"] + "index.html")[1]
    again = ok(opsbook.run("status-page.publish"))
    assert "nothing to do" in again.stderr


def test_a_page_that_cannot_be_published_never_fails_the_incident(opsbook, shop):
    inventory = opsbook.inventory.read_text().replace("bucket: ", "bucket: gone-", 1)  # the app bucket is wrong
    opsbook.write_inventory(inventory)
    opened = ok(opsbook.run("incident.open", "--title", "Slow pages", "--impact", "minor", "--components", "website",
                            "--no-triage"))
    assert "the status page was not published: " in opened.stderr
    assert ok(opsbook.run("incident.list", "--json")).json()["incidents"][0]["title"] == "Slow pages"


def test_a_folder_gets_the_page_and_a_section_without_storage_is_refused(opsbook):
    opsbook.write_inventory({"project": "shop", "default_env": "prod", "envs": {
        "prod": {"status_page": {"title": "Shop status", "folder": "public", "components": [{"name": "api"}]}},
        "bare": {"status_page": {"title": "Shop status", "components": [{"name": "api"}]}}}})
    published = ok(opsbook.run("status-page.publish", "--json")).json()["status_page"]
    assert published["files"] == ["feed.atom", "index.html", "index.json"]
    assert published["page"] == str(opsbook.root / "public" / "index.html")
    assert b"All systems operational" in (opsbook.root / "public" / "index.html").read_bytes()
    refused = opsbook.run("status-page.publish", "--env", "bare")
    assert refused.exit_code == 2 and "publishing to the app bucket needs `storage`" in refused.stderr, str(refused)


def test_a_maintenance_window_shows_on_the_page_and_in_the_notices(opsbook, tmp_path, axe_source, browser):
    opsbook.write_inventory({"project": "shop", "default_env": "prod", "envs": {"prod": {
        "notify": [{"kind": "file", "path": "public.md", "audience": "public"},
                   {"kind": "file", "path": "internal.md", "audience": "internal"}],
        "status_page": {"title": "Shop status", "folder": "public",
                        "components": [{"name": "api"}, {"name": "uploads"}]},
    }}})
    page, schema = opsbook.root / "public" / "index.html", json.loads(
        (templates_dir() / "status_page" / "index.schema.json").read_text())
    scheduled = ok(opsbook.run("maintenance.schedule", "--title", "Database upgrade", "--start", "2030-01-01T02:00Z",
                               "--duration", "2h", "--components", "api", "--message", "The API will be read-only",
                               "--json"))
    window_id = scheduled.json()["maintenance"]["id"]
    index = json.loads((opsbook.root / "public" / "index.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(index)
    assert [(w["state"], w["start"], w["components"]) for w in index["maintenance"]] == [
        ("scheduled", "2030-01-01T02:00:00Z", ["api"])]
    assert index["status"]["indicator"] == "operational"

    ok(opsbook.run("maintenance.start", window_id))
    dom = Page(browser.dom(page.as_uri()))
    assert dom.overall == "under_maintenance"
    assert dom.components == {"api": "under_maintenance", "uploads": "operational"}
    assert [i["state"] for i in dom.incidents] == ["in_progress"]
    assert [v for v in axe_violations(browser, tmp_path, page.read_bytes(), axe_source, dark=True)
            if v["impact"] in {"serious", "critical"}] == []

    ok(opsbook.run("maintenance.complete", window_id, "--message", "Upgraded to PostgreSQL 17"))
    index = json.loads((opsbook.root / "public" / "index.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(index)
    assert index["maintenance"] == [] and index["status"]["indicator"] == "operational"
    feed = ElementTree.fromstring((opsbook.root / "public" / "feed.atom").read_bytes())
    assert [entry.findtext(f"{ATOM}title") for entry in feed.findall(f"{ATOM}entry")] == [
        "Maintenance completed: Database upgrade", "Maintenance in progress: Database upgrade",
        "Maintenance scheduled: Database upgrade"]
    refused = opsbook.run("maintenance.cancel", window_id)
    assert refused.exit_code == 3 and "is completed: it cannot be cancelled" in refused.stderr, str(refused)

    public, internal = ((opsbook.root / name).read_text() for name in ("public.md", "internal.md"))
    assert re.findall(r"\*\*Maintenance: (.+)\*\*", public) == ["Scheduled", "In progress", "Completed"]
    assert "Upgraded to PostgreSQL 17" in public and window_id not in public + page.read_text()
    assert f"Internal: maintenance {window_id} on prod" in internal


def test_migrate_in_a_maintenance_window_and_a_failed_one_becomes_an_incident(opsbook, postgres_server, tmp_path):
    checkout = tmp_path / "app"
    migrations = Path(shutil.copytree(DEMO_MIGRATIONS, checkout / "prisma" / "migrations"))
    opsbook.environ["DB_URL"] = postgres_server.create_database().reveal()
    opsbook.write_inventory({"project": "shop", "default_env": "staging", "envs": {"staging": {
        "database": {"url": "${env:DB_URL}"}, "app": {"repository": str(checkout)},
        "notify": [{"kind": "file", "path": "public.md", "audience": "public"}],
        "status_page": {"title": "Shop status", "folder": "public", "components": [{"name": "api"}]}}}})
    migrated = ok(opsbook.run("migrate", "--maintenance", "Schema upgrade", "--json"))
    assert migrated.json()["applied"]  # the task's own result, not the window's
    notices = (opsbook.root / "public.md").read_text()
    assert re.findall(r"\*\*Maintenance: (.+)\*\*", notices) == ["In progress", "Completed"]
    windows = ok(opsbook.run("maintenance.list", "--json")).json()["maintenance"]
    assert [(w["title"], w["state"], w["components"]) for w in windows] == [("Schema upgrade", "completed", ["api"])]

    (migrations / "99999999999999_broken").mkdir()
    (migrations / "99999999999999_broken" / "migration.sql").write_text("ALTER TABLE no_such_table ADD x int;\n")
    failed_run = opsbook.run("migrate", "--maintenance", "Second upgrade")
    assert failed_run.exit_code == 1, str(failed_run)
    assert "opened for the failed maintenance" in failed_run.stderr
    (incident,) = ok(opsbook.run("incident.list", "--json")).json()["incidents"]
    assert (incident["title"], incident["state"], incident["components"]) == (
        "Second upgrade did not complete", "investigating", {"api": "partial_outage"})
    index = json.loads((opsbook.root / "public" / "index.json").read_text())
    assert index["status"]["indicator"] == "partial_outage" and index["maintenance"] == []
