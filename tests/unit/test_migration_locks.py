"""The lock linter, table-driven on Prisma's own SQL: each heavy lock on an existing table, judged by size."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.migrate_lint import review
from ops.migrations.locks import (
    REFUSE,
    WARN,
    Hazard,
    LiveFacts,
    TableSize,
    Thresholds,
    binary_coercible,
    hazards_in,
    judge,
    lock_hazards,
)
from ops.migrations.script import Script, Table, outside_transaction
from ops.migrations.state import LocalMigration, checksum_of
from tests.fixtures.prisma_sql import PRISMA_ENUM_DROP

# A new model with an index and a relation to an existing one, as `prisma migrate dev` writes it.
PRISMA_NEW_MODEL = """\
-- CreateTable
CREATE TABLE "Tag" (
    "id" SERIAL NOT NULL,
    "imageId" INTEGER NOT NULL,
    "label" TEXT NOT NULL,

    CONSTRAINT "Tag_pkey" PRIMARY KEY ("id")
);

-- CreateIndex
CREATE UNIQUE INDEX "Tag_label_key" ON "Tag"("label");

-- AddForeignKey
ALTER TABLE "Tag" ADD CONSTRAINT "Tag_imageId_fkey" FOREIGN KEY ("imageId") REFERENCES "Image"("id") ON DELETE RESTRICT ON UPDATE CASCADE;
"""  # noqa: E501 (Prisma writes the statement on one line)

CASES = [
    # (id, sql, [(line, rule), ...])
    ("@@index on an existing model", '-- CreateIndex\nCREATE INDEX "Image_brandId_idx" ON "Image"("brandId");\n',
     [(2, "create-index")]),
    ("@unique on an existing model", '-- CreateIndex\nCREATE UNIQUE INDEX "User_email_key" ON "User"("email");',
     [(2, "create-index")]),
    ("schema-qualified (multiSchema)", 'CREATE INDEX "Image_x_idx" ON "shop"."Image"("x");', [(1, "create-index")]),
    ("concurrently is the safe form", 'CREATE INDEX CONCURRENTLY "Image_x_idx" ON "Image"("x");', []),
    ("a new model: its index and foreign key lock nothing busy", PRISMA_NEW_MODEL, []),
    ("a relation added to an existing model",
     '-- AddForeignKey\nALTER TABLE "Image" ADD CONSTRAINT "Image_brandId_fkey" FOREIGN KEY ("brandId") '
     'REFERENCES "Brand"("id") ON DELETE CASCADE ON UPDATE CASCADE;', [(2, "constraint-validates")]),
    ("a check constraint", 'ALTER TABLE "Image" ADD CONSTRAINT "Image_size_check" CHECK ("sizeBytes" > 0);',
     [(1, "constraint-validates")]),
    ("NOT VALID, then VALIDATE: the safe form",
     'ALTER TABLE "Image" ADD CONSTRAINT "fk" FOREIGN KEY ("brandId") REFERENCES "Brand"("id") NOT VALID;\n'
     'ALTER TABLE "Image" VALIDATE CONSTRAINT "fk";', []),
    ("a primary key changed (Prisma): its index is built under the lock",
     '-- AlterTable\nALTER TABLE "Image" DROP CONSTRAINT "Image_pkey",\nADD CONSTRAINT "Image_pkey" PRIMARY KEY '
     '("uuid");', [(3, "constraint-builds-index")]),
    ("a unique constraint on an index built concurrently is the safe form",
     'CREATE UNIQUE INDEX CONCURRENTLY "Image_key_idx" ON "Image"("key");\n'
     'ALTER TABLE "Image" ADD CONSTRAINT "Image_key" UNIQUE USING INDEX "Image_key_idx";', []),
    ("@db.VarChar(200): a type change", 'ALTER TABLE "Image" ALTER COLUMN "alt" SET DATA TYPE VARCHAR(200);',
     [(1, "alter-type-rewrites")]),
    ("an enum value dropped: the column is rewritten to the new enum", PRISMA_ENUM_DROP,
     [(12, "alter-type-rewrites")]),
    ("a required field", '-- AlterTable\nALTER TABLE "Brand" ALTER COLUMN "domain" SET NOT NULL;',
     [(2, "set-not-null-scans")]),
    ("SET NOT NULL after a validated check in the same migration",
     'ALTER TABLE "Brand" ADD CONSTRAINT "c" CHECK ("domain" IS NOT NULL) NOT VALID;\n'
     'ALTER TABLE "Brand" VALIDATE CONSTRAINT "c";\nALTER TABLE "Brand" ALTER COLUMN "domain" SET NOT NULL;', []),
    ("dbgenerated(gen_random_uuid()) on an existing model",
     '-- AlterTable\nALTER TABLE "User" ADD COLUMN     "token" TEXT NOT NULL DEFAULT gen_random_uuid();',
     [(2, "volatile-default")]),
    ("autoincrement() on an existing model", 'ALTER TABLE "User" ADD COLUMN     "seq" SERIAL NOT NULL;',
     [(1, "volatile-default")]),
    ("@default(now()) and constants fill nothing",
     "ALTER TABLE \"User\" ADD COLUMN \"at\" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,\n"
     "ADD COLUMN \"b\" TIMESTAMP(3) DEFAULT now(),\nADD COLUMN \"tier\" TEXT NOT NULL DEFAULT 'free';", []),
    ("several actions, each on its line",
     'ALTER TABLE "public"."User" ADD COLUMN "nick" TEXT,\nALTER COLUMN "a" SET NOT NULL,\n'
     'ALTER COLUMN "b" TYPE NUMERIC(10, 2);', [(2, "set-not-null-scans"), (3, "alter-type-rewrites")]),
    ("vacuum full, cluster, lock table",
     'VACUUM FULL "Image";\nVACUUM "Image";\nCLUSTER "Image" USING "Image_pkey";\n'
     'LOCK TABLE "Image" IN ACCESS EXCLUSIVE MODE;', [(1, "vacuum-full"), (3, "cluster"), (4, "lock-table")]),
    ("keywords in comments and strings are ignored",
     '-- CREATE INDEX "x" ON "User"("a");\n/* VACUUM FULL "User"; */\n'
     "INSERT INTO \"Note\" (\"body\") VALUES ('CREATE INDEX y ON \"User\"(a); LOCK TABLE \"User\"');\n", []),
    ("an enum added and used on a new model",
     'CREATE TYPE "Role" AS ENUM (\'USER\', \'ADMIN\');\nCREATE TABLE "Member" ("role" "Role" NOT NULL);\n'
     'CREATE INDEX "Member_role_idx" ON "Member"("role");\nALTER TABLE "Member" ALTER COLUMN "role" SET NOT NULL;',
     []),
    ("a table created in the same migration, named with its schema once",
     'CREATE TABLE "public"."Log" ("id" INTEGER);\nCREATE INDEX "Log_id_idx" ON "Log"("id");', []),
    ("an unreadable statement is the other linter's finding", 'CREATE INDX "a" ON "User"("b");', []),
]


@pytest.mark.parametrize(("sql", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_hazards(sql: str, expected: list[tuple[int, str]]):
    assert [(hazard.line, hazard.rule) for hazard in hazards_in("m", Script(sql))] == expected


def migrations(*scripts: str) -> list[LocalMigration]:
    return [LocalMigration(f"00{index}", checksum_of(sql), sql, Path(f"00{index}"))
            for index, sql in enumerate(scripts, 1)]


def test_a_table_from_an_earlier_migration_exists_before_this_one():
    found = lock_hazards(migrations('CREATE TABLE "Tag" ("id" INT);', 'CREATE INDEX "Tag_id" ON "Tag"("id");'))
    assert [(hazard.migration, hazard.rule, hazard.table) for hazard in found] == \
        [("002", "create-index", Table(None, "Tag"))]


def test_a_check_validated_in_an_earlier_migration_makes_set_not_null_safe():
    found = lock_hazards(migrations(
        'ALTER TABLE "Brand" ADD CONSTRAINT "Brand_domain_nn" CHECK ("domain" IS NOT NULL) NOT VALID;',
        'ALTER TABLE "Brand" VALIDATE CONSTRAINT "Brand_domain_nn";\n'
        'ALTER TABLE "Brand" ALTER COLUMN "domain" SET NOT NULL;',
        'ALTER TABLE "Brand" ALTER COLUMN "name" SET NOT NULL;'))
    assert [(hazard.migration, hazard.rule, hazard.column) for hazard in found] == \
        [("003", "set-not-null-scans", "name")]


IMAGE = Table(None, "Image")


def index_hazard(table: Table | None = IMAGE) -> Hazard:
    return Hazard("20250301000000_idx", 2, "create-index", table, 'CREATE INDEX "Image_brandId_idx" on "Image"')


@pytest.mark.parametrize(("facts", "severity", "size"), [
    (None, REFUSE, "size unknown: no database to ask"),
    (LiveFacts({IMAGE: TableSize(2_100_000, 1_503_238_554)}), REFUSE, "2.1 M rows, 1.4 GiB"),
    (LiveFacts({IMAGE: TableSize(None, 200 * 1024 * 1024)}), REFUSE, "rows unknown (never analysed), 200.0 MiB"),
    (LiveFacts({IMAGE: TableSize(1200, 180_224)}), WARN, "1200 rows, 176.0 KiB"),
    (LiveFacts({}), WARN, "not in the database yet: created by an earlier pending migration"),
])
def test_judged_by_size(facts: LiveFacts | None, severity: str, size: str):
    (finding,) = judge([index_hazard()], facts, Thresholds())
    assert (finding.severity, finding.size) == (severity, size)


def test_the_finding_names_line_size_why_and_safe_form():
    (finding,) = judge([index_hazard()], LiveFacts({IMAGE: TableSize(2_100_000, 1_503_238_554)}), Thresholds())
    assert str(finding) == ('20250301000000_idx/migration.sql:2: create-index: CREATE INDEX "Image_brandId_idx" on '
                            '"Image" (2.1 M rows, 1.4 GiB) blocks writes to the table until the index is built; '
                            'safe: CREATE INDEX CONCURRENTLY (it cannot run in a transaction: the native engine '
                            'runs such a migration statement by statement; for `prisma migrate deploy` keep it alone '
                            'in its migration)')
    assert finding.to_json()["severity"] == "refuse" and finding.to_json()["table"] == "Image"


def test_what_quotes_the_names():
    found = hazards_in("m", Script('CREATE INDEX "i" ON "s"."T"("a");\nALTER TABLE "T" ADD CONSTRAINT "f" '
                                   'FOREIGN KEY ("b") REFERENCES "U"("id");'))
    assert [hazard.what for hazard in found] == ['CREATE INDEX "i" on "s"."T"',
                                                  'ADD CONSTRAINT "f" FOREIGN KEY on "T" (referencing "U")']


def test_thresholds_decide():
    facts = LiveFacts({IMAGE: TableSize(5000, 8192)})
    assert judge([index_hazard()], facts, Thresholds(rows=1000))[0].severity == REFUSE
    assert judge([index_hazard()], facts, Thresholds(rows=10_000))[0].severity == WARN


def test_every_table_is_a_refusal_even_with_sizes():
    (finding,) = judge([index_hazard(None)], LiveFacts(), Thresholds())
    assert finding.severity == REFUSE


def test_live_facts_clear_what_does_not_rewrite_or_scan():
    (alter,) = hazards_in("m", Script('ALTER TABLE "Image" ALTER COLUMN "alt" SET DATA TYPE VARCHAR(200);'))
    (not_null,) = hazards_in("m", Script('ALTER TABLE "Image" ALTER COLUMN "alt" SET NOT NULL;'))
    big = {IMAGE: TableSize(10**7, 10**10)}
    assert judge([alter], LiveFacts(big, {(IMAGE, "alt"): "character varying(100)"}), Thresholds()) == []
    assert len(judge([alter], LiveFacts(big, {(IMAGE, "alt"): "character varying(300)"}), Thresholds())) == 1
    assert judge([not_null], LiveFacts(big, not_null_checks={(IMAGE, "alt")}), Thresholds()) == []
    assert len(judge([not_null], LiveFacts(big), Thresholds())) == 1


@pytest.mark.parametrize(("current", "target", "coercible"), [
    ("character varying(100)", ("varchar", (200,)), True),
    ("character varying(100)", ("varchar", (100,)), True),
    ("character varying(100)", ("varchar", (50,)), False),
    ("character varying(100)", ("varchar", ()), True),
    ("character varying(100)", ("text", ()), True),
    ("text", ("varchar", ()), True),
    ("text", ("varchar", (10,)), False),
    ("numeric(10,2)", ("numeric", (12, 2)), True),
    ("numeric(10,2)", ("numeric", (12, 3)), False),
    ("numeric(10)", ("numeric", (12,)), True),
    ("numeric", ("numeric", (12, 2)), False),
    ("integer", ("int8", ()), False),
    ("timestamp(3) without time zone", ("timestamptz", (3,)), False),
])
def test_binary_coercible(current: str, target: tuple[str, tuple[int, ...]], coercible: bool):
    assert binary_coercible(current, target) is coercible


@pytest.mark.parametrize(("sql", "statements"), [
    ('CREATE INDEX "i" ON "T"("a");\nALTER TABLE "T" ADD COLUMN "b" TEXT;', None),  # one implicit transaction
    ('-- CreateIndex\nCREATE INDEX CONCURRENTLY "i" ON "T"("a");\nINSERT INTO "T" VALUES (\'x; y\');\n',
     ['CREATE INDEX CONCURRENTLY "i" ON "T"("a")', "INSERT INTO \"T\" VALUES ('x; y')"]),
    ('DROP INDEX CONCURRENTLY "i"; SELECT 1', ['DROP INDEX CONCURRENTLY "i"', "SELECT 1"]),
    ('REINDEX INDEX CONCURRENTLY "i"; SELECT 1', ['REINDEX INDEX CONCURRENTLY "i"', "SELECT 1"]),
    ('VACUUM "T"; SELECT 1', ['VACUUM "T"', "SELECT 1"]),
    ('ANALYZE "T"; SELECT 1', None),
    ('CREATE INDEX CONCURRENTLY "i" ON "T"("a"); SELEC 1', None),  # PostgreSQL reports the typo
])
def test_outside_transaction(sql: str, statements: list[str] | None):
    assert outside_transaction(sql) == statements


def test_review_judges_each_finding():
    found = review(migrations('CREATE TABLE "Tag" ("id" INT);', 'CREATE INDEX "Tag_id" ON "Tag"("id");\n'
                              'ALTER TABLE "Tag" DROP COLUMN "id";\nALTR TABLE "Tag";'),
                   None, Thresholds(), refuse_breaking=False)
    assert [(finding.rule, severity) for finding, severity in found.breaking] == \
        [("drop-column", WARN), ("cannot-parse", REFUSE)]  # an unreadable statement is never only a warning
    assert [finding.severity for finding in found.locks] == [REFUSE]
    assert [line.split(": ")[0] for line in found.refusals] == ["002/migration.sql:1", "002/migration.sql:3"]
    later = review(migrations('CREATE TABLE "Tag" ("id" INT);', 'CREATE INDEX "Tag_id" ON "Tag"("id");'),
                   None, Thresholds(), refuse_breaking=True, since="002")
    assert later.refusals == [] and later.to_json()["locks"] == []
