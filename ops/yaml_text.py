"""YAML text in and out: the one module that imports PyYAML, inside the functions that use it.

Manifests (Kubernetes) are written in block style, their multi-line strings (an inventory inside a
ConfigMap) as literal blocks, so they read as the files they are.

`load` keeps the line of every dotted path, so inventory problems can name their line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ops.errors import InventoryError


def load(text: str, file: Path) -> tuple[Any, dict[str, int]]:
    """The document in `text` and the line of each dotted path (`envs.prod.hosts.0` -> 12)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{file}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(file)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise InventoryError(f"YAML syntax error: {problem}", where=where,
                             hint="fix the indentation or quoting at that line") from None
    lines: dict[str, int] = {}
    _record_lines(node, "", lines)
    return data, lines


def _record_lines(node: Any, path: str, lines: dict[str, int]) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = f"{path}.{key_node.value}" if path else str(key_node.value)
            lines[child] = key_node.start_mark.line + 1
            _record_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = f"{path}.{index}"
            lines[child] = item.start_mark.line + 1
            _record_lines(item, child, lines)


def dump(data: Any, *, allow_unicode: bool = False) -> str:
    """`data` as YAML, keys in their order."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=allow_unicode)


class _Dumper:
    """Built on first use: block style, keys in the order given, long strings kept whole, multi-line
    strings (an inventory inside a ConfigMap) as literal blocks so they read as the file they are."""

    _class: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls._class is None:
            import yaml

            class Dumper(yaml.SafeDumper):
                pass

            def text(dumper: Any, value: str) -> Any:
                # PyYAML falls back to quoting by itself where a literal block cannot hold the text
                style = "|" if "\n" in value else None
                return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

            Dumper.add_representer(str, text)
            cls._class = Dumper
        return cls._class


def dump_manifest(document: Any) -> str:
    """One document as YAML text (no leading `---`): block style, multi-line strings as literal blocks."""
    import yaml

    return yaml.dump(document, Dumper=_Dumper.get(), sort_keys=False, allow_unicode=True, width=100)

