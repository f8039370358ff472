"""The migration linter, table-driven: what breaks the running app is found, with its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.migrations.lint import Finding, lint_migrations, lint_sql, mask
from ops.migrations.state import LocalMigration, checksum_of
from tests.fixtures.prisma_sql import PRISMA_ENUM_DROP

CASES = [
    # (id, sql, [(line, rule), ...])
    ("create table is fine", 'CREATE TABLE "A" ("id" SERIAL NOT NULL, "b" TEXT NOT NULL);\n', []),
    ("drop table", '-- DropTable\nDROP TABLE "Legacy";\n', [(2, "drop-table")]),
    ("drop table if exists, two", "DROP TABLE IF EXISTS a, \"B\";", [(1, "drop-table")]),
    ("drop column (Prisma)", '-- AlterTable\nALTER TABLE "User" DROP COLUMN "email";\n', [(2, "drop-column")]),
    ("drop column without keyword", "ALTER TABLE users DROP legacy;", [(1, "drop-column")]),
    ("drop constraint is fine", 'ALTER TABLE "Image" DROP CONSTRAINT "Image_brandId_fkey";', []),
    ("several actions, each on its line",
     'ALTER TABLE "User" ADD COLUMN "nick" TEXT,\nDROP COLUMN "a",\nALTER COLUMN "b" SET DATA TYPE NUMERIC(10, 2);',
     [(2, "drop-column"), (3, "alter-column-type")]),
    ("rename column", 'ALTER TABLE "User" RENAME COLUMN "name" TO "fullName";', [(1, "rename")]),
    ("rename table", 'ALTER TABLE "User"\n  RENAME TO "Account";', [(2, "rename")]),
    ("rename constraint is fine", 'ALTER TABLE "User" RENAME CONSTRAINT "a" TO "b";', []),
    ("rename enum value", "ALTER TYPE \"Role\" RENAME VALUE 'EDITOR' TO 'WRITER';", [(1, "rename")]),
    ("alter column type (Prisma)", 'ALTER TABLE "Image" ALTER COLUMN "alt" SET DATA TYPE VARCHAR(200);',
     [(1, "alter-column-type")]),
    ("alter column type (short)", "ALTER TABLE t ALTER c TYPE bigint;", [(1, "alter-column-type")]),
    ("set not null", 'ALTER TABLE "Brand" ALTER COLUMN "domain" SET NOT NULL;', [(1, "set-not-null")]),
    ("drop not null is fine", 'ALTER TABLE "Brand" ALTER COLUMN "domain" DROP NOT NULL;', []),
    ("add not null without default", 'ALTER TABLE "User" ADD COLUMN "tenant" TEXT NOT NULL;',
     [(1, "add-not-null-without-default")]),
    ("add not null with default is fine", "ALTER TABLE \"User\" ADD COLUMN \"tier\" TEXT NOT NULL DEFAULT 'free';",
     []),
    ("add serial is fine", 'ALTER TABLE "User" ADD COLUMN "seq" SERIAL NOT NULL;', []),
    ("add nullable is fine", 'ALTER TABLE "User" ADD COLUMN "bio" TEXT;', []),
    ("add constraint is fine", 'ALTER TABLE "A" ADD CONSTRAINT "A_pkey" PRIMARY KEY ("id");', []),
    ("enum value dropped the Prisma way", PRISMA_ENUM_DROP, [(13, "drop-enum-value")]),
    ("drop type on its own", 'DROP TYPE "Mood";', [(1, "drop-type")]),
    ("keywords in comments and strings are ignored",
     "-- DROP TABLE x;\n/* ALTER TABLE y DROP COLUMN z; */\nINSERT INTO t VALUES ('DROP TABLE t; ALTER TABLE u "
     "DROP COLUMN v');\nSELECT $$ DROP TABLE w $$;\n", []),
    ("semicolon inside a quoted identifier", 'ALTER TABLE "a;b" DROP COLUMN "c";', [(1, "drop-column")]),
    ("lower case", "alter table users\n\n  drop column email;", [(3, "drop-column")]),
]


@pytest.mark.parametrize(("sql", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_lint(sql: str, expected: list[tuple[int, str]]):
    findings = lint_sql("20250101000000_x", sql)
    assert [(finding.line, finding.rule) for finding in findings] == expected


def test_finding_names_file_line_and_why():
    (finding,) = lint_sql("20250301000000_drop", '\n\nALTER TABLE "User" DROP COLUMN "email";')
    assert str(finding).startswith("20250301000000_drop/migration.sql:3: drop-column: drops column email of table "
                                   "User (")
    assert finding.to_json() == {"migration": "20250301000000_drop", "line": 3, "rule": "drop-column",
                                 "what": "drops column email of table User"}


def test_enum_recreation_is_one_finding_naming_the_enum():
    (finding,) = lint_sql("m", PRISMA_ENUM_DROP)
    assert "ImageStatus" in finding.what


def test_lint_migrations_in_order():
    migrations = [LocalMigration(name, checksum_of(sql), sql, Path(name)) for name, sql in
                  (("001", "DROP TABLE a;"), ("002", "SELECT 1;"), ("003", "ALTER TABLE b RENAME TO c;"))]
    assert [(f.migration, f.rule) for f in lint_migrations(migrations)] == [("001", "drop-table"), ("003", "rename")]
    assert isinstance(lint_migrations(migrations)[0], Finding)


def test_mask_keeps_length_and_lines():
    sql = "SELECT 'a;\nb' -- c\n/* d\n*/ $x$ e\n $x$;"
    masked = mask(sql)
    assert len(masked) == len(sql) and masked.count("\n") == sql.count("\n")
    assert "a" not in masked and "c" not in masked and "e" not in masked and masked.endswith(";")


UNREADABLE = [
    # (id, sql, [(line, rule), ...]): PostgreSQL's parser reads the statements, not a pattern
    ("a typo is a finding of its own, the rest still linted",
     'ALTER TABLE "A" ADD COLUMN "b" TEXT;\nALTER TABEL "A" DROP COLUMN "b";\nDROP TABLE "C";',
     [(2, "cannot-parse"), (3, "drop-table")]),
    ("an unclosed quote: the whole script", "SELECT 1;\nDROP TABLE a;\nSELECT 'oops;\n", [(3, "cannot-parse")]),
    ("a statement after multi-byte text keeps its line", "INSERT INTO t VALUES ('é ü ✓');\n\nDROP TABLE a;",
     [(3, "drop-table")]),
    ("keywords as quoted names", 'ALTER TABLE "select" DROP COLUMN "table";', [(1, "drop-column")]),
    ("schema-qualified", 'ALTER TABLE "public"."User"\n  DROP COLUMN "email";', [(2, "drop-column")]),
    ("a function body holding DROP is no drop",
     "CREATE FUNCTION f() RETURNS void AS $body$ BEGIN DROP TABLE x; END $body$ LANGUAGE plpgsql;", []),
]


@pytest.mark.parametrize(("sql", "expected"), [case[1:] for case in UNREADABLE],
                         ids=[case[0] for case in UNREADABLE])
def test_parser_cases(sql: str, expected: list[tuple[int, str]]):
    assert [(finding.line, finding.rule) for finding in lint_sql("m", sql)] == expected


def test_cannot_parse_says_what_the_parser_said():
    (finding,) = lint_sql("m", "SELECT 1;\nALTER TABEL x ADD y int;")
    assert str(finding).startswith('m/migration.sql:2: cannot-parse: cannot parse: syntax error at or near "TABEL"')


@pytest.mark.parametrize("sql", ["SELECT 1;\nALTR TABLE a DROP COLUMN b;", "SELECT 1;\nFOO;\nSELECT 2;",
                                 "DROPP TABLE a"])
def test_a_typo_in_the_first_word_is_still_reported(sql: str):
    assert [finding.rule for finding in lint_sql("m", sql)] == ["cannot-parse"]
