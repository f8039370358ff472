"""ops.ids: random UUIDs as text, the same as the uuid module's."""

from __future__ import annotations

import random
import uuid

from ops import ids


def test_random_uuids_are_version_4_and_new_each_time() -> None:
    first, second = ids.uuid4(), ids.uuid4()
    assert first != second and uuid.UUID(first).version == 4 and str(uuid.UUID(first)) == first
    assert len(ids.uuid4_hex()) == 32 and uuid.UUID(ids.uuid4_hex()).version == 4


def test_a_seeded_uuid_is_reproducible() -> None:
    bits = random.Random(7).getrandbits(128)
    assert ids.uuid4_of(bits) == str(uuid.UUID(int=bits, version=4)) == ids.uuid4_of(bits)
