"""YAML out: documents (Kubernetes manifests) as YAML text. PyYAML is imported here, lazily, and only here
for writing, so listing the tasks never imports it."""

from __future__ import annotations

from typing import Any


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


def dump(document: Any) -> str:
    """One document as YAML text (no leading `---`)."""
    import yaml

    return yaml.dump(document, Dumper=_Dumper.get(), sort_keys=False, allow_unicode=True, width=100)


def dump_all(documents: list[Any]) -> str:
    """Several documents as one multi-document YAML text, each introduced by `---`."""
    return "".join(f"---\n{dump(document)}" for document in documents)
