"""Storage backends by provider name.

A backend module registers its class here when it is imported; `open_storage`
imports the module a provider names on first use, so this module (and the
interface in ops/storage/base.py) never imports a backend, and a caller that
only uses local storage never loads the S3 one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ops.errors import InventoryError
from ops.secrets import redact
from ops.storage.base import Storage, StorageConfig

# provider name -> the module that registers its backend
BACKEND_MODULES = {"r2": "ops.storage.s3", "s3": "ops.storage.s3", "local": "ops.storage.local"}
PROVIDERS = tuple(BACKEND_MODULES)

_backends: dict[str, type[Storage]] = {}


def register_backend(*providers: str) -> Callable[[type[Storage]], type[Storage]]:
    """Class decorator: `cls` serves `providers` (`@register_backend("r2", "s3")`)."""
    def register(cls: type[Storage]) -> type[Storage]:
        for provider in providers:
            _backends[provider] = cls
        return cls
    return register


def backend_for(provider: str) -> type[Storage]:
    """The backend class serving `provider`, importing its module the first time."""
    if provider not in _backends:
        importlib.import_module(BACKEND_MODULES[provider])
    return _backends[provider]


def _check_config(config: StorageConfig) -> None:
    problems = []
    if config.provider not in PROVIDERS:
        problems.append(f"storage.provider: {config.provider!r} is not one of {', '.join(PROVIDERS)}")
    if not config.bucket:
        problems.append("storage.bucket: required")
    if config.provider == "r2" and not config.endpoint:
        problems.append("storage.endpoint: required for r2 (https://ACCOUNT_ID.r2.cloudflarestorage.com)")
    if config.provider == "local" and not config.path:
        problems.append("storage.path: required for the local provider (the folder that holds buckets)")
    if config.prefix and (config.prefix.startswith("/") or ".." in config.prefix.split("/")):
        problems.append(f"storage.prefix: {config.prefix!r} must be relative without '..' segments")
    if problems:
        raise InventoryError("invalid storage settings", problems=[redact(p) for p in problems],
                             hint="fix these storage settings in the inventory")


def open_storage(config: StorageConfig) -> Storage:
    """The backend for `config`. Cheap: no connection is made until first use."""
    _check_config(config)
    return backend_for(config.provider)(config)
