"""A random sample of stored images, probed the way the app and its visitors read them.

HEAD and GET through the storage API (sizes must agree, and match the database's record when
the sample comes from it), then GET over HTTP through the storage's public base URL when set.
"""

from __future__ import annotations

import random
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ops import pg, web
from ops.errors import OpsError
from ops.secrets import Secret, redact

READERS = 8

Sample = list[tuple[str, int | None]]  # (key, expected size or None)


def from_bucket(storage: Any, prefix: str, count: int) -> Sample:
    """A listing cannot show a missing image; `from_database` can."""
    objects = [(info.key, info.size) for info in storage.list(prefix)]
    return random.sample(objects, min(count, len(objects)))


def from_database(url: Secret | str, query: str, count: int, label: str) -> Sample:
    """`query` (the inventory's drill.images_query) returns key [, size]; run read-only."""
    with pg.connect(url, application_name=label[:63]) as connection:
        connection.execute("SET TRANSACTION READ ONLY")
        rows = pg.random_rows(connection, query, count)
    return [(str(row[0]), int(row[1]) if len(row) > 1 and row[1] is not None else None) for row in rows]


def probe_all(storage: Any, sample: Sample) -> list[str]:
    """The problems found, one line per image (empty when all answer)."""
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        return [problem for problem in pool.map(lambda item: probe_image(storage, *item), sample) if problem]


def probe_image(storage: Any, key: str, expected: int | None) -> str | None:
    """None when `key` answers HEAD and GET (and its public URL) with the expected size; else the problem."""
    try:
        info = storage.head(key)
        if info is None:
            return f"{key}: missing"
        if expected is not None and info.size != expected:
            return f"{key}: {info.size} bytes stored, {expected} expected"
        with storage.open_read(key) as reader:
            received = sum(len(chunk) for chunk in iter(lambda: reader.read(1 << 16), b""))
        if received != info.size:
            return f"{key}: GET returned {received} bytes, HEAD says {info.size}"
        url = storage.public_url(key)
        return _probe_public(url, info.size) if url else None
    except OpsError as error:
        return f"{key}: {redact(error.message)}"


def _probe_public(url: str, size: int) -> str | None:
    try:
        with web.urlopen(url, timeout=10) as response:
            received = len(response.read())
    except urllib.error.HTTPError as error:
        return f"{url}: HTTP {error.code}"
    except OSError as error:
        return f"{url}: {redact(getattr(error, 'reason', error))}"
    return None if received == size else f"{url}: {received} bytes over HTTP, {size} stored"
