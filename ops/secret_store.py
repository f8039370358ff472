"""Generated secrets: the store interface, and its `file` backend, a 0600 KEY=VALUE file per environment
under <state>/secrets/.

A backend says where it keeps an environment's map (`label`, `location`), reads it whole and
changes several keys in one write; the rest (get, set, delete, get_or_generate) is shared.
The other backends (ops/secret_store_aws.py, ops/secret_store_kubernetes.py) and the registry
that picks one by the environment's `secrets.store` (ops/secret_stores.py) build on this.
"""

from __future__ import annotations

import os
import secrets as random_tokens
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from ops.secrets import Secret


class Store:
    """One environment's generated secrets, wherever a backend keeps them."""

    kind = "abstract"

    @property
    def label(self) -> str:
        """Short, for plans: where the values go."""
        raise NotImplementedError

    @property
    def location(self) -> str:
        """In full, for errors and secrets.status."""
        return self.label

    def exists(self) -> bool:
        raise NotImplementedError

    def read(self) -> dict[str, Secret]:
        raise NotImplementedError

    def update(self, changes: Mapping[str, Secret | None]) -> None:
        """Set (or, for None, remove) several keys in one write."""
        raise NotImplementedError

    def last_changed(self) -> datetime | None:
        """When the map last changed (any key), or None when nothing is stored."""
        raise NotImplementedError

    def remove(self) -> None:
        """Forget the whole map (after it moved to another store)."""
        raise NotImplementedError

    def get(self, key: str) -> Secret | None:
        return self.read().get(key)

    def set(self, key: str, value: Secret) -> None:
        self.update({key: value})

    def delete(self, *keys: str) -> None:
        present = self.read()
        if any(key in present for key in keys):
            self.update(dict.fromkeys(keys))

    def get_or_generate(self, key: str, length: int = 32) -> Secret:
        existing = self.get(key)
        if existing:
            return existing
        value = Secret(random_tokens.token_urlsafe(length)[:length])
        self.set(key, value)
        return value


class SecretStore(Store):
    """The `file` backend: <state>/secrets/<env>.env, mode 0600, in a 0700 folder."""

    kind = "file"

    def __init__(self, state_dir: Path, env_name: str):
        self.path = state_dir / "secrets" / f"{env_name}.env"

    @property
    def label(self) -> str:
        return self.path.name

    @property
    def location(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> dict[str, Secret]:
        if not self.path.exists():
            return {}
        values = {}
        for line in self.path.read_text().splitlines():
            key, separator, value = line.partition("=")
            if separator and not line.startswith("#"):
                values[key.strip()] = Secret(value.strip())
        return values

    def update(self, changes: Mapping[str, Secret | None]) -> None:
        """Set (or, for None, remove) several keys in one atomic write (temp file + rename), never readable
        by others: a crash leaves the old file or the new one, never a mix."""
        values = {k: v for k, v in {**self.read(), **changes}.items() if v is not None}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self.path.with_suffix(f".tmp-{os.getpid()}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.writelines(f"{k}={v.reveal()}\n" for k, v in sorted(values.items()))
        os.replace(temporary, self.path)

    def last_changed(self) -> datetime | None:
        return datetime.fromtimestamp(self.path.stat().st_mtime, UTC) if self.path.exists() else None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
