"""Publishing the status page: its three files written to the app bucket under a prefix, or to a folder.

The step's plan is what would be written (each file, its content type and size, new or changed); a file
that already holds the same bytes is left alone, so a publish with nothing new has nothing to do. Within an
incident run the step is tolerant: a page that cannot be rendered or written is a warning, never a failed
incident (the incident is recorded and its notices sent before the page is touched).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops.clock import utc_now
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import InventoryError, OpsError
from ops.incidents import BUCKET_DIR, IncidentStore
from ops.maintenance import BUCKET_DIR as MAINTENANCE_DIR
from ops.maintenance import MaintenanceStore
from ops.secrets import redact
from ops.status_page import FILES, StatusPageConfig, render_files, status_page_config
from ops.storage import ObjectNotFound, open_storage

if TYPE_CHECKING:
    from ops.incidents import Incident
    from ops.inventory import Environment
    from ops.maintenance import Window
    from ops.storage import Storage

CONTENT_TYPES = dict(FILES)


class FolderTarget:
    """A folder some web server serves (each file replaced atomically)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def describe(self) -> str:
        return str(self.folder)

    def where(self, name: str) -> str:
        return str(self.folder / name)

    def read(self, name: str) -> bytes | None:
        path = self.folder / name
        return path.read_bytes() if path.exists() else None

    def write(self, name: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.folder / f".{name}.tmp-{os.getpid()}"
        temporary.write_bytes(data)
        os.replace(temporary, self.folder / name)


class BucketTarget:
    """The app bucket under the page's prefix; R2 or a CDN serves it from the bucket's public URL."""

    def __init__(self, storage: Storage, prefix: str):
        self.storage = storage
        self.prefix = prefix

    def describe(self) -> str:
        return f"{self.storage.describe()} under {self.prefix or '/'}"

    def where(self, name: str) -> str:
        key = f"{self.prefix}{name}"
        return self.storage.public_url(key) or key

    def read(self, name: str) -> bytes | None:
        try:
            return self.storage.get_bytes(f"{self.prefix}{name}")
        except ObjectNotFound:
            return None

    def write(self, name: str, data: bytes) -> None:
        self.storage.put_bytes(f"{self.prefix}{name}", data, content_type=CONTENT_TYPES[name])


def publish_target(env: Environment, config: StatusPageConfig) -> FolderTarget | BucketTarget:
    if config.folder is not None:
        return FolderTarget(config.folder)
    return BucketTarget(open_storage(env.storage_config("storage")), config.prefix)


def recorded_incidents(env: Environment) -> list[Incident]:
    """The environment's incidents known here and, fetched, those only in the backups bucket (opened or last
    changed from another machine): a page published from here must not leave them out."""
    store = IncidentStore(env)
    known = {incident.id: incident for incident in store.list()}
    if env.has("backups"):
        for prefix in open_storage(env.storage_config("backups")).list_prefixes(BUCKET_DIR):
            incident_id = prefix.rstrip("/").rpartition("/")[2]
            if incident_id in known:
                continue
            try:
                known[incident_id] = store.load(incident_id)
            except (OpsError, ValueError, OSError):
                continue  # another environment's, or a damaged copy: not this page's business
    return list(known.values())


def windows_with(env: Environment, current: Window | None) -> list[Window]:
    """The environment's maintenance windows (here, and fetched from the backups bucket), `current` as it will be."""
    store = MaintenanceStore(env)
    known = {window.id: window for window in store.list()}
    if env.has("backups"):
        for info in open_storage(env.storage_config("backups")).list(MAINTENANCE_DIR):
            window_id = info.key.rpartition("/")[2].removesuffix(".json")
            if window_id not in known:
                try:
                    known[window_id] = store.load(window_id)
                except (OpsError, ValueError, TypeError, OSError):
                    continue
    if current is not None:
        known[current.id] = current
    return list(known.values())


def incidents_with(env: Environment, current: Incident | None) -> list[Incident]:
    """The environment's incidents, with `current` (the one a run is changing) as the run will leave it."""
    stored = [incident for incident in recorded_incidents(env) if current is None or incident.id != current.id]
    return [*stored, current] if current is not None else stored


class PublishStatusPage(Step):
    """Render the page from the incident and maintenance records and write what changed; `current` (`window`) is
    the incident (maintenance window) a run is changing, taken as the run will leave it, recorded or not yet;
    `tolerant`: problems warn, never fail."""

    name = "status-page"
    title = "publish the status page"

    def __init__(self, env: Environment, *, current: Callable[[], Incident] | None = None, tolerant: bool = False,
                 now: datetime | None = None, window: Callable[[], Window] | None = None):
        self.env = env
        self.current = current
        self.window = window
        self.tolerant = tolerant
        self.now = now or utc_now()  # one time for the run: the plan and the apply render the same bytes
        self._warned = False

    def _changes(self) -> tuple[FolderTarget | BucketTarget, dict[str, bytes], list[str]]:
        config = status_page_config(self.env)
        if config is None:
            raise InventoryError(f"envs.{self.env.name}.status_page: required for this task but not set",
                                 hint="add a status_page section (README: the status page)")
        target = publish_target(self.env, config)
        files = render_files(config, incidents_with(self.env, self.current() if self.current else None), self.now,
                             windows_with(self.env, self.window() if self.window else None))
        changed = {}
        details = []
        for name, _ in FILES:
            before = target.read(name)
            if before != files[name]:
                changed[name] = files[name]
                details.append(f"{target.where(name)} ({CONTENT_TYPES[name]}, {len(files[name])} bytes, "
                               f"{'new' if before is None else 'changed'})")
        return target, changed, details

    def _warn(self, ctx: RunContext, error: BaseException) -> None:
        if not self._warned:
            self._warned = True
            ctx.output.warn(f"the status page was not published: {redact(getattr(error, 'message', None) or error)}"
                            "; the incident is recorded — `inv status-page.publish` retries")

    def check(self, ctx: RunContext) -> Change | None:
        try:
            target, changed, details = self._changes()
        except Exception as error:  # within an incident, a page that cannot be made is a warning
            if not self.tolerant:
                raise
            self._warn(ctx, error)
            return None
        if not changed:
            return None
        return Change(f"write {len(changed)} file(s) of the status page to {target.describe()}", details,
                      data={"target": target, "files": changed})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        target = change.data["target"]
        try:
            for name, data in change.data["files"].items():
                target.write(name, data)
        except Exception as error:  # within an incident, the page never fails what is already recorded and sent
            if not self.tolerant:
                raise
            self._warn(ctx, error)
            return {"published": False}
        where = target.where("index.html")
        ctx.output.info(f"status page published: {where}")
        return {"published": True, "page": where, "files": sorted(change.data["files"])}

    def verify(self, ctx: RunContext) -> None:
        if self.tolerant and self._warned:
            return  # warned already: the incident's run goes on
        super().verify(ctx)


def publish_runbook(env: Environment, **arguments: Any) -> Runbook:
    """`inv status-page.publish`: the page rendered from the incident records, written where it is served."""
    if status_page_config(env) is None:
        raise InventoryError(f"envs.{env.name}.status_page: required for this task but not set",
                             where=env.inventory.location(f"envs.{env.name}"),
                             hint="add a status_page section with title and components (README: the status page)")
    return Runbook("status-page.publish", f"Publish the status page of {env.name}", [PublishStatusPage(env)],
                   locks=("status-page",),
                   confirm_exempt="it rewrites the public status page from the incident records; it changes "
                                  "nothing that serves users")
