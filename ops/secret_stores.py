"""Secret store backends by name, and the one an environment's `secrets.store` names (default `file`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

from ops.errors import InventoryError
from ops.lazy_dataclasses import dataclass
from ops.secret_managers import AwsSettings
from ops.secret_store import SecretStore, Store
from ops.secret_store_aws import AwsSecretStore
from ops.secret_store_kubernetes import KubernetesSecretStore

DEFAULT_STORE = "file"


@dataclass(frozen=True)
class StoreSettings:
    """What a backend needs to find one environment's map."""

    kind: str
    state_dir: Path
    env_name: str
    project: str
    aws: AwsSettings = field(default_factory=AwsSettings)
    aws_secret: str | None = None
    kubernetes: dict[str, Any] = field(default_factory=dict)


def _file(settings: StoreSettings) -> Store:
    return SecretStore(settings.state_dir, settings.env_name)


def _aws(settings: StoreSettings) -> Store:
    return AwsSecretStore(settings.aws, settings.aws_secret or f"opsbook/{settings.project}/{settings.env_name}")


def _kubernetes(settings: StoreSettings) -> Store:
    return KubernetesSecretStore(settings.kubernetes, settings.env_name)


BACKENDS: dict[str, Callable[[StoreSettings], Store]] = {"file": _file, "aws-sm": _aws, "kubernetes": _kubernetes}


def register(name: str, factory: Callable[[StoreSettings], Store]) -> None:
    BACKENDS[name] = factory


def open_store(settings: StoreSettings) -> Store:
    factory = BACKENDS.get(settings.kind)
    if factory is None:
        raise InventoryError(f"envs.{settings.env_name}.secrets.store: no store named {settings.kind!r}",
                             hint=f"use one of {', '.join(sorted(BACKENDS))}")
    return factory(settings)
