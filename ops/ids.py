"""Random UUIDs (version 4) as text. The uuid module (it pulls in platform) is imported on first use."""

from __future__ import annotations


def uuid4() -> str:
    """A new random UUID, in its usual 8-4-4-4-12 form."""
    import uuid

    return str(uuid.uuid4())


def uuid4_hex() -> str:
    """A new random UUID as 32 hex digits."""
    import uuid

    return uuid.uuid4().hex


def uuid4_of(bits: int) -> str:
    """The version-4 UUID made from these 128 bits (a seeded generator's: the demo data is reproducible)."""
    import uuid

    return str(uuid.UUID(int=bits, version=4))
