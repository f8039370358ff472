"""Generated secrets, kept in a 0600 KEY=VALUE file per environment under <state>/secrets/."""

from __future__ import annotations

import os
import secrets as random_tokens
from collections.abc import Mapping
from pathlib import Path

from ops.secrets import Secret


class SecretStore:
    def __init__(self, state_dir: Path, env_name: str):
        self.path = state_dir / "secrets" / f"{env_name}.env"

    def read(self) -> dict[str, Secret]:
        if not self.path.exists():
            return {}
        values = {}
        for line in self.path.read_text().splitlines():
            key, separator, value = line.partition("=")
            if separator and not line.startswith("#"):
                values[key.strip()] = Secret(value.strip())
        return values

    def get(self, key: str) -> Secret | None:
        return self.read().get(key)

    def set(self, key: str, value: Secret) -> None:
        self.update({key: value})

    def delete(self, *keys: str) -> None:
        present = self.read()
        if any(key in present for key in keys):
            self.update(dict.fromkeys(keys))

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

    def get_or_generate(self, key: str, length: int = 32) -> Secret:
        existing = self.get(key)
        if existing:
            return existing
        value = Secret(random_tokens.token_urlsafe(length)[:length])
        self.set(key, value)
        return value
