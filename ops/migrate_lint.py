"""Both linters on a set of migrations, judged: what `migrate.lint` reports and the deploy's lint step checks.

A review holds the backward-compatibility findings (ops/migrations/lint.py) and the lock
findings (ops/migrations/locks.py), each a refusal or a warning. A statement the parser
cannot read is always a refusal; a breaking change is one where the running app would
break (a protected environment, or any app's CI); a lock hazard is one on a large table,
or on any table when there is no database to ask. The live facts come from the target
database's catalog: sizes (`pg_class.reltuples`, `pg_total_relation_size`), column types
and validated NOT NULL checks, read without locking anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ops.inventory import plain
from ops.lazy_dataclasses import dataclass
from ops.migrations.lint import lint_migrations
from ops.migrations.locks import (
    DEFAULT_LOCK_BYTES,
    DEFAULT_LOCK_ROWS,
    REFUSE,
    WARN,
    Hazard,
    LiveFacts,
    LockFinding,
    TableSize,
    Thresholds,
    judge,
    lock_hazards,
)

if TYPE_CHECKING:
    import psycopg

    from ops.inventory import Environment
    from ops.migrations.drift import Difference
    from ops.migrations.lint import Finding
    from ops.migrations.state import LocalMigration


@dataclass(frozen=True)
class Review:
    """Both linters' findings, judged; with an environment, also the removals a live release still uses
    (refusals) and how the live schema differs from what the applied migrations build (warnings)."""

    breaking: list[tuple[Finding, str]]  # (finding, severity)
    locks: list[LockFinding]
    contract: tuple[str, ...] = ()
    drift: tuple[Difference, ...] = ()

    def _lines(self, severity: str) -> list[str]:
        found = [(finding.migration, finding.line, str(finding)) for finding, judged in self.breaking
                 if judged == severity]
        found += [(finding.hazard.migration, finding.hazard.line, str(finding)) for finding in self.locks
                  if finding.severity == severity]
        return [text for _migration, _line, text in sorted(found)]

    @property
    def refusals(self) -> list[str]:
        return self._lines(REFUSE) + list(self.contract)

    @property
    def warnings(self) -> list[str]:
        return self._lines(WARN) + [f"drift: {difference}" for difference in self.drift]

    def to_json(self) -> dict[str, Any]:
        return {"refusals": len(self.refusals), "warnings": len(self.warnings),
                "breaking": [{**finding.to_json(), "severity": severity} for finding, severity in self.breaking],
                "locks": [finding.to_json() for finding in self.locks], "contract": list(self.contract),
                "drift": [difference.to_json() for difference in self.drift]}


def review(migrations: list[LocalMigration], facts: LiveFacts | None, thresholds: Thresholds, *,
           refuse_breaking: bool, since: str | None = None) -> Review:
    """Both linters' findings, each judged a refusal or a warning. With `since`, only the migrations after
    that one are judged; the earlier ones still tell which tables exist and which checks are validated."""
    judged = [migration for migration in migrations if since is None or migration.name > since]
    breaking = [(finding, REFUSE if finding.rule == "cannot-parse" or refuse_breaking else WARN)
                for finding in lint_migrations(judged)]
    hazards = [hazard for hazard in lock_hazards(migrations) if since is None or hazard.migration > since]
    return Review(breaking, judge(hazards, facts, thresholds))


def thresholds(env: Environment) -> Thresholds:
    """app.migrations.lock_rows / lock_bytes: from which size a lock hazard is refused."""
    settings = plain(env.value("app.migrations", {})) or {}
    return Thresholds(rows=int(settings.get("lock_rows", DEFAULT_LOCK_ROWS)),
                      bytes=int(settings.get("lock_bytes", DEFAULT_LOCK_BYTES)))


# ---------------------------------------------------------------- live facts


SIZE = "SELECT c.reltuples::bigint, pg_total_relation_size(c.oid) FROM pg_class c WHERE c.oid = to_regclass(%s)"
COLUMN_TYPE = ("SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
               "WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped")
NOT_NULL_CHECK = ("SELECT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = to_regclass(%s) "
                  "AND c.contype = 'c' AND c.convalidated "
                  "AND pg_get_constraintdef(c.oid) = 'CHECK ((' || quote_ident(%s) || ' IS NOT NULL))')")


def read_facts(connection: psycopg.Connection, migrations: Iterable[LocalMigration]) -> LiveFacts:
    """What the database says about each table and column the migrations' lock hazards name."""
    hazards = lock_hazards(migrations)
    facts = LiveFacts()
    for table in {hazard.table for hazard in hazards if hazard.table is not None}:
        row = connection.execute(SIZE, (table.quoted(),)).fetchone()
        facts.sizes[table] = TableSize(row[0] if row[0] >= 0 else None, row[1]) if row else None
    for hazard in hazards:
        _column_facts(connection, hazard, facts)
    return facts


def _column_facts(connection: psycopg.Connection, hazard: Hazard, facts: LiveFacts) -> None:
    if hazard.table is None or hazard.column is None:
        return
    key = (hazard.table, hazard.column)
    if hazard.rule == "alter-type-rewrites":
        row = connection.execute(COLUMN_TYPE, (hazard.table.quoted(), hazard.column)).fetchone()
        if row:
            facts.column_types[key] = row[0]
    elif hazard.rule == "set-not-null-scans" and \
            connection.execute(NOT_NULL_CHECK, (hazard.table.quoted(), hazard.column)).fetchone()[0]:
        facts.not_null_checks.add(key)
