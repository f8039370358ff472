"""ops.patterns: a regular expression compiled when first used, answering like re.compile's."""

from __future__ import annotations

import re

from ops.patterns import Pattern


def test_compiled_on_first_use_and_once() -> None:
    pattern = Pattern(r"(?P<word>[a-z]+)-(\d+)", re.IGNORECASE)
    assert pattern._compiled is None  # importing a module that defines one compiles nothing
    assert pattern.fullmatch("Abc-12").group("word") == "Abc"
    compiled = pattern.compiled()
    assert compiled is pattern.compiled() and compiled.flags & re.IGNORECASE


def test_answers_like_the_compiled_pattern() -> None:
    text = "a=1, b=22, c=333"
    lazy, eager = Pattern(r"(\w)=(\d+)"), re.compile(r"(\w)=(\d+)")
    assert lazy.findall(text) == eager.findall(text)
    assert [m.span() for m in lazy.finditer(text)] == [m.span() for m in eager.finditer(text)]
    assert lazy.sub(r"\2", text) == eager.sub(r"\2", text)
    assert lazy.search(text, 3).group(0) == "b=22"
    assert lazy.match("x") is None and lazy.pattern == eager.pattern
    assert Pattern(rb"\d+").findall(b"1 22") == [b"1", b"22"]
