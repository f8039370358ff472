"""The suite's own layout, read from the sources: helpers shared between test modules live in tests/fixtures/,
so no test module imports another, and each shared helper is defined once."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
# code a test hands to a child process (`python -c …`) imports too
IMPORT_IN_CODE = re.compile(r"(?:^|;)\s*(?:from|import)\s+(tests(?:\.\w+)+)", re.MULTILINE)


def is_test_module(name: str) -> bool:
    """A dotted module name that is a test module (test_*.py) rather than a helper."""
    return name.rpartition(".")[2].startswith("test_")


@functools.cache
def syntax_tree(path: Path) -> ast.Module:
    """The test source's syntax tree, parsed once for both tests below (neither changes a file)."""
    return ast.parse(path.read_text(), str(path))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports, anywhere in it (functions and child-process code included), as dotted names
    with their line."""
    package = ".".join(path.relative_to(TESTS.parent).with_suffix("").parts[:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(syntax_tree(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            # `from tests.integration import test_backup` names the module in the alias
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if is_test_module(alias.name)]
            found.append((node.lineno, module))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [(node.lineno, name) for name in IMPORT_IN_CODE.findall(node.value)]
    return found


def test_no_test_module_imports_another():
    offenders = [f"{path.relative_to(TESTS.parent)}:{line} imports {name}"
                 for path in sorted(TESTS.rglob("*.py"))
                 for line, name in imported_modules(path)
                 if name.startswith("tests.") and is_test_module(name)]
    assert offenders == [], "move what they share into tests/fixtures/:\n" + "\n".join(offenders)


def test_assert_no_secret_is_defined_once_in_the_fixtures():
    definitions = [f"{path.relative_to(TESTS.parent)}:{node.lineno} {node.name}"
                   for path in sorted(TESTS.rglob("*.py"))
                   for node in ast.walk(syntax_tree(path))
                   if isinstance(node, ast.FunctionDef) and node.name.startswith("assert_no_secret")]
    assert len(definitions) == 1 and definitions[0].startswith("tests/fixtures/"), definitions
