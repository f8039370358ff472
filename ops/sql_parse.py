"""PostgreSQL's own grammar (libpg_query, through pglast): a script's statements and tokens.

The connector of pglast, imported here only and lazily (listing tasks loads none of it).
What it returns is plain data: each statement's parse tree as dicts (libpg_query's JSON),
every `location` in it turned into a character offset of the script (libpg_query counts
bytes), and the scanner's tokens. A statement the parser cannot read comes back with its
error instead of a tree, so that callers report it rather than pass it.
"""

from __future__ import annotations

import functools
import json
from bisect import bisect_left
from typing import Any

from ops.lazy_dataclasses import dataclass

COMMENT_TOKENS = frozenset({"SQL_COMMENT", "C_COMMENT"})
STRING_TOKENS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST"})
SEMICOLON = "ASCII_59"


@dataclass(frozen=True)
class Token:
    start: int  # character offsets in the script, end exclusive
    end: int
    name: str  # the grammar's name: ALTER, IDENT, ASCII_44 (a comma), SQL_COMMENT...


@dataclass(frozen=True)
class Statement:
    """One statement: its tree (`{"IndexStmt": {...}}`), or the parser's error; where it starts and ends."""

    start: int
    end: int
    tree: dict[str, Any] | None = None
    error: str | None = None

    @property
    def kind(self) -> str:
        return next(iter(self.tree)) if self.tree else ""

    @property
    def fields(self) -> dict[str, Any]:
        return next(iter(self.tree.values())) if self.tree else {}


def statements(sql: str) -> list[Statement]:
    """The script's statements in order. When the script does not parse, each statement is parsed on its own
    (split by the scanner), so one unreadable statement is reported and the others are still read."""
    from pglast import parser

    chars = _char_offsets(sql)
    try:
        tree = json.loads(parser.parse_sql_json(sql))
    except parser.ParseError as error:
        return _one_by_one(sql, chars, error)
    starts = _word_starts(tokens(sql))
    return [_statement(sql, chars, raw, starts) for raw in tree.get("stmts", [])]


@functools.lru_cache(maxsize=4)  # the statements' and the linters' look at the same script
def tokens(sql: str) -> tuple[Token, ...]:
    """The scanner's tokens (comments included); none when the scanner itself fails (an unclosed quote)."""
    from pglast import parser

    try:
        scanned = parser.scan(sql)
    except parser.ParseError:
        return ()
    return tuple(Token(token.start, token.end + 1, token.name) for token in scanned)


def _one_by_one(sql: str, chars: list[int] | None, whole: Exception) -> list[Statement]:
    from pglast import parser

    try:
        pieces = _pieces(parser.scan(sql))
    except parser.ParseError as error:  # the scanner fails too (an unclosed quote): nothing can be split
        return [Statement(_error_offset(error, 0), len(sql), error=_message(error))]
    found = []
    for start, stop in pieces:
        padding = " " * len(sql[:start].encode())  # the same byte offsets as in the whole script
        try:
            tree = json.loads(parser.parse_sql_json(padding + sql[start:stop]))
        except parser.ParseError as error:
            found.append(Statement(start + _error_offset(error, len(padding)), stop, error=_message(error)))
            continue
        found += [_statement(sql, chars, raw, [start]) for raw in tree.get("stmts", [])]
    return found or [Statement(0, len(sql), error=_message(whole))]


def _pieces(scanned: Any) -> list[tuple[int, int]]:
    """(start, end) of each statement between semicolons, from the scanner's tokens (pglast's own
    scanner-based split leaves out a statement whose first word is no keyword: a typo there)."""
    pieces, start, last = [], None, 0
    for token in scanned:
        if token.name in COMMENT_TOKENS:
            continue
        if token.name == SEMICOLON:
            if start is not None:
                pieces.append((start, last))
            start = None
            continue
        start = token.start if start is None else start
        last = token.end + 1
    if start is not None:
        pieces.append((start, last))
    return pieces


def _statement(sql: str, chars: list[int] | None, raw: dict[str, Any], starts: list[int]) -> Statement:
    tree = _to_chars(raw["stmt"], chars)
    start = _char(raw.get("stmt_location", 0), chars)
    length = raw.get("stmt_len", 0)
    end = _char(raw.get("stmt_location", 0) + length, chars) if length else len(sql)
    index = bisect_left(starts, start)  # its first word: past the blanks and comments before it
    return Statement(starts[index] if index < len(starts) and starts[index] < end else start, end, tree=tree)


def _word_starts(scanned: tuple[Token, ...]) -> list[int]:
    return [token.start for token in scanned if token.name not in COMMENT_TOKENS]


def _to_chars(node: Any, chars: list[int] | None) -> Any:
    if chars is None:  # ASCII: bytes are characters
        return node
    if isinstance(node, dict):
        return {key: _char(value, chars) if key == "location" and isinstance(value, int) and value >= 0
                else _to_chars(value, chars) for key, value in node.items()}
    if isinstance(node, list):
        return [_to_chars(item, chars) for item in node]
    return node


def _char_offsets(sql: str) -> list[int] | None:
    """For each byte of the UTF-8 script, the character it belongs to (None: ASCII, the same offsets)."""
    if sql.isascii():
        return None
    offsets = [index for index, char in enumerate(sql) for _ in char.encode()]
    return [*offsets, len(sql)]


def _char(byte: int, chars: list[int] | None) -> int:
    if chars is None:
        return byte
    return chars[min(byte, len(chars) - 1)]


def _error_offset(error: Exception, padding: int) -> int:
    position = error.args[1] if len(error.args) > 1 and isinstance(error.args[1], int) else padding
    return max(0, position - padding)


def _message(error: Exception) -> str:
    return str(error.args[0]) if error.args else str(error)
