"""The import graph of ops/ and runbooks/, read from the source: no cycles, no upward imports.

Every import statement counts, at module level or inside a function, except those under
`if TYPE_CHECKING:` (they never run). `from ops import x` is an edge to ops.x when x is a
module, else to ops. Library modules (ops) never import runbooks, and runbooks never use
each other as libraries (the package's registry, runbooks/__init__.py, is not a runbook).

The lists below name tolerated exceptions (none today); the tests fail on any edge or cycle
not listed, and on a listed edge that is gone (delete it from the list then).

Where imports are written: opsbook's own modules at the top, never inside a function; the
heavy libraries only in their connector modules, inside the functions that use them.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
PACKAGES = ("ops", "runbooks")

# runbook -> runbook edges (none left: what runbooks share lives in ops).
ALLOWED_RUNBOOK_EDGES: set[tuple[str, str]] = set()
# ops -> runbooks edges.
ALLOWED_UPWARD_EDGES: set[tuple[str, str]] = set()
# Edges that close a cycle; the test looks for cycles without them.
ALLOWED_CYCLE_EDGES: set[tuple[str, str]] = set()

Graph = dict[str, set[str]]


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of `packages` under `root`."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def parse(path: Path) -> ast.Module:
    """The module's syntax tree, parsed once per text: each test here reads the whole code base."""
    return _parse(path.read_text(), str(path))


@functools.cache
def _parse(text: str, filename: str) -> ast.Module:
    return ast.parse(text, filename=filename)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import under `node`, at any depth (functions, classes, try blocks), skipping
    the body of `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _import_nodes_of(other)
        else:
            yield from _import_nodes(child)


def _import_nodes_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _import_nodes(node)


def _base_of(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The module a `from … import` reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """`name` or its nearest enclosing module of ours; None for third-party and stdlib."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    path = modules[module]
    targets: set[str] = set()
    for node in _import_nodes(parse(path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = _base_of(module, path, node)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        targets.update(found for name in names if (found := _known(name, modules)) and found != module)
    return targets


def import_graph(root: Path = REPOSITORY, packages: tuple[str, ...] = PACKAGES) -> Graph:
    modules = module_files(root, packages)
    return {module: imports_of(module, modules) for module in modules}


@functools.cache
def code_base_graph() -> Graph:
    """import_graph() of the repository, built once for the tests that read it (none changes it)."""
    return import_graph()


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _edges(graph: Graph) -> set[tuple[str, str]]:
    return {(source, target) for source, targets in graph.items() for target in targets}


def _without(graph: Graph, edges: set[tuple[str, str]]) -> Graph:
    return {source: {t for t in targets if (source, t) not in edges} for source, targets in graph.items()}


# Where the task collection and the console tool are put together: they import every runbook by design.
COMPOSITION = {"runbooks.collection", "runbooks.program"}


def _is_runbook(module: str) -> bool:
    return module.startswith("runbooks.") and module not in COMPOSITION


# ---------------------------------------------------------------- the code base


def test_no_import_cycles() -> None:
    found = cycles(_without(code_base_graph(), ALLOWED_CYCLE_EDGES))
    assert not found, f"import cycles (break each one; a shared piece moves down into its own module): {found}"


def test_library_modules_never_import_runbooks() -> None:
    upward = {(s, t) for s, t in _edges(code_base_graph()) if s.startswith("ops") and t.startswith("runbooks")}
    assert upward <= ALLOWED_UPWARD_EDGES, (
        f"ops imports runbooks (pass what is needed in from the runbook instead): "
        f"{sorted(upward - ALLOWED_UPWARD_EDGES)}")


def test_runbooks_do_not_use_each_other_as_libraries() -> None:
    shared = {(s, t) for s, t in _edges(code_base_graph()) if _is_runbook(s) and _is_runbook(t)}
    assert shared <= ALLOWED_RUNBOOK_EDGES, (
        f"a runbook imports another (move what they share into ops): {sorted(shared - ALLOWED_RUNBOOK_EDGES)}")


def test_every_allowed_edge_still_exists() -> None:
    gone = (ALLOWED_RUNBOOK_EDGES | ALLOWED_UPWARD_EDGES | ALLOWED_CYCLE_EDGES) - _edges(code_base_graph())
    assert not gone, f"edges no longer in the code: remove them from this test's allow-lists: {sorted(gone)}"


# ---------------------------------------------------------------- where imports are written

# The connectors: the only modules that import these libraries, each inside the functions that
# use them (so listing tasks loads none), and nothing else inside a function (pyproject.toml
# exempts exactly these from ruff's PLC0415).
CONNECTORS = {
    "ops.pg": {"psycopg"},
    "ops.aws": {"boto3", "botocore"},
    "ops.storage.s3": {"botocore", "urllib3"},
    "ops.hosts": {"fabric", "paramiko"},
    "ops.remote_commands": {"paramiko"},
    "ops.render": {"jinja2"},
    "ops.yaml_text": {"yaml"},
    "ops.inventory_schema": {"jsonschema"},
    "ops.dump": {"zstandard", "pyrage"},
    "ops.sql_parse": {"pglast"},
    "ops.progress_bar": {"rich"},
}
HEAVY = set().union(*CONNECTORS.values()) | {"kubernetes_validate"}
# Standard-library modules that import many others (they cost start-up): the same pattern, by dotted
# name, in their own connectors (`import urllib.error` and `urllib.parse` stay cheap and free to use).
STDLIB_CONNECTORS = {
    "ops.web": {"urllib.request", "http.client"},
    "ops.mail": {"smtplib", "email.message"},
    "ops.archive": {"tarfile"},
    "ops.render": {"importlib.resources"},
    "ops.ids": {"uuid"},
    "ops.migrations.state": {"tomllib"},
    "ops.storage.s3_conditional": {"email.utils"},
}
OURS = {*PACKAGES, "tasks"}


def imported_libraries(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The top-level names an import reads from ("" for a relative import: always ours)."""
    if isinstance(node, ast.Import):
        return [alias.name.partition(".")[0] for alias in node.names]
    return [""] if node.level else [(node.module or "").partition(".")[0]]


def function_level_imports(tree: ast.AST, inside: bool = False) -> Iterator[tuple[int, str]]:
    """(line, library) of each import inside a function or method body (`if TYPE_CHECKING:` skipped)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from function_level_imports(ast.Module(body=[other], type_ignores=[]), inside)
        elif isinstance(child, ast.Import | ast.ImportFrom):
            if inside:
                yield from ((child.lineno, library) for library in imported_libraries(child))
        else:
            function = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            yield from function_level_imports(child, inside or function)


def runtime_imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, library) of every import that can run: at any level, outside `if TYPE_CHECKING:`."""
    for node in _import_nodes(tree):
        yield from ((node.lineno, library) for library in imported_libraries(node))


@functools.cache
def _sources(root: Path = REPOSITORY) -> dict[str, ast.AST]:
    """Every module's syntax tree, read once (the tests only read them)."""
    files = {**module_files(root), "tasks": root / "tasks.py"}
    return {module: parse(path) for module, path in files.items()}


def _ours(library: str) -> bool:
    return library in OURS or library == ""


def test_no_function_level_import_of_opsbook_modules() -> None:
    found = sorted(f"{module}:{line}" for module, tree in _sources().items()
                   for line, library in function_level_imports(tree) if _ours(library))
    assert not found, f"import opsbook's modules at the top of the module, not inside a function: {found}"


def test_connectors_import_only_their_libraries_inside_functions() -> None:
    sources = _sources()
    connectors = {module: CONNECTORS.get(module, set()) | {name.partition(".")[0]
                                                           for name in STDLIB_CONNECTORS.get(module, ())}
                  for module in {*CONNECTORS, *STDLIB_CONNECTORS}}
    found = sorted(f"{module}:{line} {library or 'relative'}" for module, allowed in connectors.items()
                   for line, library in function_level_imports(sources[module]) if library not in allowed)
    assert not found, f"a connector imports only its heavy libraries inside functions, the rest at the top: {found}"


def test_heavy_libraries_only_in_their_connectors() -> None:
    found = sorted(f"{module}:{line} {library}" for module, tree in _sources().items()
                   for line, library in runtime_imports(tree)
                   if library in HEAVY and library not in CONNECTORS.get(module, ()))
    assert not found, (f"heavy libraries come through their connector ({sorted(CONNECTORS)}); "
                       f"under `if TYPE_CHECKING:` for annotations only: {found}")


def imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted modules an import can load: `from a.b import c` may load a.b.c as well as a.b."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = "" if node.level else node.module or ""
    return [base, *(f"{base}.{alias.name}" for alias in node.names)] if base else []


def _within(name: str, modules: set[str]) -> bool:
    return any(name == module or name.startswith(f"{module}.") for module in modules)


def test_costly_stdlib_modules_only_in_their_connectors() -> None:
    costly = set().union(*STDLIB_CONNECTORS.values())
    found = sorted(f"{module}:{node.lineno} {name}" for module, tree in _sources().items()
                   for node in _import_nodes(tree) for name in imported_modules(node)
                   if _within(name, costly) and not _within(name, STDLIB_CONNECTORS.get(module, set())))
    assert not found, f"these standard-library modules come through their connector ({STDLIB_CONNECTORS}): {found}"


def test_function_level_imports_read_from_the_source() -> None:
    tree = ast.parse(
        "import json\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import psycopg\n"
        "def f():\n    from ops import pg\n    import yaml, os.path\n    if TYPE_CHECKING:\n        import fabric\n"
        "class K:\n    import re\n    async def m(self):\n        from . import x\n"
        "        def inner():\n            import jinja2\n")
    assert sorted(function_level_imports(tree)) == [(6, "ops"), (7, "os"), (7, "yaml"), (13, ""), (15, "jinja2")]
    assert sorted(runtime_imports(tree)) == [(1, "json"), (2, "typing"), (6, "ops"), (7, "os"), (7, "yaml"),
                                             (11, "re"), (13, ""), (15, "jinja2")]


# ---------------------------------------------------------------- the graph builder itself


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_graph_reads_every_kind_of_import(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b, CONSTANT\n",
        "pkg/b.py": "def f():\n    from pkg.sub import c\n",
        "pkg/c.py": "import pkg.sub.d\nimport json\n",
        "pkg/sub/__init__.py": "from . import d\nfrom .d import name\n",
        "pkg/sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                        "else:\n    from .. import c\nclass K:\n    def m(self):\n        from ..a import x\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.b", "pkg"},  # a module by its name, a constant by its package
        "pkg.b": {"pkg.sub"},  # function level; `c` is a name of pkg.sub, not a module
        "pkg.c": {"pkg.sub.d"},  # stdlib left out
        "pkg.sub": {"pkg.sub.d"},
        "pkg.sub.d": {"pkg.c", "pkg.a"},  # TYPE_CHECKING body skipped, its else and a method read
    }


def test_cycles_found_with_and_without_an_allowed_edge() -> None:
    graph = {"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}
    assert cycles(graph) == [["x", "y", "z"]]
    assert cycles(_without(graph, {("z", "x")})) == []
