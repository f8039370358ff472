"""boto3 clients, one per service, endpoint, region, key pair and settings for the whole process.

Building a client loads botocore's models (a few hundred milliseconds, and again for
each boto3 session), and a run reaches the same bucket or IAM user from several
places. Clients are thread-safe; a new key pair gets its own. boto3 is imported here
only when a client is first asked for, so importing this module stays cheap; other modules
(ops/storage/s3.py aside, the S3 backend) take boto3's clients and botocore's exceptions
(`aws.ClientError`, `aws.BotoCoreError`) from here.
"""

from __future__ import annotations

import copy
import json
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from botocore.client import BaseClient

_lock = threading.Lock()
_session: Any = None
_clients: dict[tuple[str | None, ...], BaseClient] = {}


def client(service: str, *, endpoint: str | None, region: str, access_key_id: str | None,
           secret_access_key: str | None, settings: dict[str, Any]) -> BaseClient:
    """The process's client for these; `settings` are botocore Config arguments."""
    global _session
    key = (service, endpoint, region, access_key_id, secret_access_key, json.dumps(settings, sort_keys=True))
    with _lock:
        if key not in _clients:
            import boto3.session
            from botocore.config import Config

            if _session is None:
                _session = boto3.session.Session()
            config = Config(**copy.deepcopy(settings))  # a copy: botocore rewrites `retries` in place
            _clients[key] = _session.client(service, endpoint_url=endpoint, region_name=region,
                                            aws_access_key_id=access_key_id,
                                            aws_secret_access_key=secret_access_key, config=config)
        return _clients[key]


# botocore's exception classes for callers' `except` clauses: `except aws.ClientError:` looks the
# class up (importing botocore) only when an exception reaches that clause.
_EXCEPTIONS = frozenset({"BotoCoreError", "ClientError"})


def __getattr__(name: str) -> type[Exception]:
    if name in _EXCEPTIONS:
        from botocore import exceptions

        return getattr(exceptions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
