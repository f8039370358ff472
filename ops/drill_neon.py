"""The DR drill into a fresh Neon branch of the source (`drill.target: neon-branch`).

branch    a branch of the source's branch created at the time of the backup drilled (inside the project's
          history window), with a read-write endpoint;
restore   the backup restored into it, as into any target (checksum, new database, row counts, swap) or,
          with --provider-pitr, the branch itself taken as the restore: its row counts against the backup's
          manifest (Neon's own point-in-time recovery, tested);
...       migrations, staging, images, RTO and RPO as in every drill (runbooks/drill.py composes them);
cleanup   the branch deleted, unless --keep.

The target is the source's settings with the branch's URL: no app hosts, never protected, named
SOURCE-neon-branch in the journal and the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ops import neon, restore_db
from ops.clock import iso_z, utc_now
from ops.drill_checks import DrillCheck, Session
from ops.drills import NotApplicable
from ops.engine import RunContext
from ops.errors import UsageError
from ops.inventory import Environment
from ops.pg_url import parse_url

if TYPE_CHECKING:
    from ops.neon import Branch

TARGET = "neon-branch"


def target_environment(source: Environment) -> Environment:
    """The drill's target before the branch exists: the source's settings, its database still the source's
    (plans read the server's version there), no hosts; the branch step points it at the branch."""
    if not neon.is_neon(source):
        raise UsageError(f"drill.target {TARGET} needs envs.{source.name}.database.provider: neon",
                         where=source.inventory.location(f"envs.{source.name}.database"),
                         hint="set database.provider: neon with project_id and api_key, or choose a staging target")
    neon.client(source)  # project_id and api_key are there: exit 2 now rather than a failed check later
    database = {key: value for key, value in source.data["database"].items() if key not in ("direct_url", "admin_url")}
    database.update(url=source.database_url(direct=True), name=source.database_name())
    data = {key: value for key, value in source.data.items() if key not in ("hosts", "drill", "protected")}
    data.update(database=database, drill_target_of=source.name,
                description=f"the DR drill's target for {source.name}: a fresh Neon branch")
    return Environment(name=f"{source.name}-{TARGET}", data=data, inventory=source.inventory)


class NeonSession(Session):
    def __init__(self, source: Environment, target: Environment, backup: str, *, keep: bool):
        super().__init__(source, target, backup)
        self.keep = keep
        self.branch: Branch | None = None
        self.branch_name = f"drill-{source.name}-{utc_now().strftime('%Y%m%d%H%M%S')}"


class BranchStep(DrillCheck):
    name = "branch"

    def __init__(self, session: NeonSession):
        super().__init__(session)
        self.session: NeonSession = session
        self.title = (f"a fresh Neon branch of {session.source.name}'s {neon.branch_name(session.source)} "
                      "at the time of the backup drilled")
        self.summary = f"create Neon branch {session.branch_name} at the backup's time"

    def plan(self, ctx: RunContext) -> list[str]:
        api = neon.client(self.session.source)
        return [f"project {api.project_id}: branch {self.session.branch_name} from "
                f"{neon.branch_name(self.session.source)}, with a read-write endpoint"]

    def run(self, ctx: RunContext) -> str:
        session = self.session
        plan = session.restore_plan
        manifest = session.manifest = plan.manifest(ctx)
        api = neon.client(session.source)
        parent = api.require_branch(neon.branch_name(session.source))
        neon.refuse_outside_window(manifest.finished, utc_now(), api.history_retention_seconds(), api.project_id)
        created = api.create_branch(parent.id, session.branch_name, at=manifest.finished)
        session.branch = created.branch
        if created.connection_uri is None:
            raise UsageError(f"Neon created branch {created.branch.id} without a connection URI")
        self._point_target(created.connection_uri)
        where = parse_url(created.connection_uri).describe()
        return (f"branch {created.branch.name} ({created.branch.id}) of {parent.name} at "
                f"{iso_z(manifest.finished)}, the end of backup {manifest.id}: {where}")

    def _point_target(self, uri: Any) -> None:
        """The target's database is the branch's from now on: its URL and database name, the restore's names."""
        session = self.session
        database = parse_url(uri).dbname
        session.target.data["database"].update(url=uri, name=database)
        plan, stamp = session.restore_plan, utc_now()
        plan.database = database
        plan.scratch = restore_db.side_name(database, "restore", stamp)
        plan.old = restore_db.side_name(database, "old", stamp)


class BranchRestoreCheck(DrillCheck):
    """--provider-pitr: the branch at the backup's time is the restore; its row counts prove it."""

    name = "restore"
    needs = ("branch",)

    def __init__(self, session: NeonSession):
        super().__init__(session)
        self.title = ("the branch itself as the restore (Neon's point-in-time recovery): its row counts "
                      "against the backup's manifest")
        self.summary = "compare the branch's row counts with the backup's manifest"

    def run(self, ctx: RunContext) -> str:
        session = self.session
        manifest, database = session.manifest, session.restore_plan.database
        counts = restore_db.check_row_counts(manifest, session.target.database_url(direct=True), database, ctx.label)
        return (f"the branch at {iso_z(manifest.finished)} holds backup {manifest.id}'s {len(counts)} tables, "
                f"{sum(counts.values())} rows, as in its manifest")


class CleanupStep(DrillCheck):
    name = "cleanup"

    def __init__(self, session: NeonSession):
        super().__init__(session)
        self.session: NeonSession = session
        self.title = "the drill's branch kept (--keep)" if session.keep else "the drill's branch deleted"
        self.summary = "keep the branch" if session.keep else f"delete Neon branch {session.branch_name}"

    def run(self, ctx: RunContext) -> str:
        branch = self.session.branch
        if branch is None:
            raise NotApplicable("no branch was created: nothing to delete")
        if self.session.keep:
            return f"kept branch {branch.name} ({branch.id}) as asked (--keep); delete it in the Neon console"
        neon.client(self.session.source).delete_branch(branch.id)
        return f"deleted branch {branch.name} ({branch.id})"
