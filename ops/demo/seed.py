"""Deterministic demo data for the sandbox app: rows and the image objects they point at.

Everything derives from fixed seeds, so two sandboxes hold the same data and a
restore can be compared row for row. Passwords are generated demo values, hashed;
nothing here is a real credential.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops import ids, pg

if TYPE_CHECKING:
    import psycopg

MIGRATIONS_DIR = Path(__file__).resolve().parent / "prisma" / "migrations"
APP_DIR = Path(__file__).resolve().parent

BRAND_COUNT = 20
IMAGE_COUNT = 3000
DRAFT_COUNT = 200
USER_COUNT = 50
IMAGE_OBJECT_COUNT = 300  # the first images have an object in the bucket
SEED = 20250101
EPOCH = datetime(2025, 1, 1, 9, 0, 0)

BRAND_WORDS = [
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka", "tyrell", "cyberdyne",
    "soylent", "aperture", "gringotts", "oscorp", "vandelay", "duff", "monarch", "nakatomi", "pied", "zorg",
]
JPEG_HEADER = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
JPEG_END = b"\xff\xd9"


def brand_slug(brand_id: int) -> str:
    return BRAND_WORDS[(brand_id - 1) % len(BRAND_WORDS)]


def image_brand(image_id: int) -> int:
    return (image_id - 1) % BRAND_COUNT + 1


def image_key(image_id: int) -> str:
    return f"images/{brand_slug(image_brand(image_id))}/{image_id}.jpg"


def image_size(image_id: int) -> int:
    return random.Random(SEED * 7 + image_id).randint(2048, 6144)


def image_bytes(image_id: int) -> bytes:
    """A small file that starts and ends like a JPEG; the middle is seeded noise."""
    body_length = image_size(image_id) - len(JPEG_HEADER) - len(JPEG_END)
    return JPEG_HEADER + random.Random(SEED * 13 + image_id).randbytes(body_length) + JPEG_END


def image_objects() -> Iterator[tuple[str, bytes]]:
    """(key, content) of every demo object, in key order of creation."""
    for image_id in range(1, IMAGE_OBJECT_COUNT + 1):
        yield image_key(image_id), image_bytes(image_id)


def _at(minutes: int) -> datetime:
    return EPOCH + timedelta(minutes=minutes)


def brand_rows() -> list[tuple[Any, ...]]:
    return [
        (i, brand_slug(i), brand_slug(i).title() + " Shop", f"{brand_slug(i)}.example", _at(i), _at(i + 60))
        for i in range(1, BRAND_COUNT + 1)
    ]


def image_rows() -> list[tuple[Any, ...]]:
    rng = random.Random(SEED + 1)
    statuses = ["READY"] * 8 + ["PENDING", "ARCHIVED"]
    rows = []
    for i in range(1, IMAGE_COUNT + 1):
        width = rng.choice([640, 800, 1200, 1600])
        rows.append((
            i, image_brand(i), image_key(i), "image/jpeg", image_size(i), width, width * 3 // 4,
            f"Product photo {i}", rng.choice(statuses), _at(100 + i), _at(200 + i),
        ))
    return rows


def _password_hash(index: int) -> str:
    # scrypt with small cost parameters: realistic format, fast to generate.
    salt = hashlib.sha256(f"demo-salt-{index}".encode()).digest()[:16]
    digest = hashlib.scrypt(f"demo-password-{index}".encode(), salt=salt, n=1024, r=8, p=1, dklen=32)
    return f"scrypt$1024$8$1${salt.hex()}${digest.hex()}"


def user_ids() -> list[str]:
    rng = random.Random(SEED + 2)
    return [ids.uuid4_of(rng.getrandbits(128)) for _ in range(USER_COUNT)]


def user_rows() -> list[tuple[Any, ...]]:
    roles = ["ADMIN"] * 3 + ["EDITOR"] * 17 + ["VIEWER"] * 30
    rows = []
    for index, user_id in enumerate(user_ids()):
        brand_id = None if roles[index] == "ADMIN" else index % BRAND_COUNT + 1
        rows.append((
            user_id, f"user{index + 1}@demo.example", f"Demo User {index + 1}", _password_hash(index),
            roles[index], brand_id, _at(5000 + index) if index % 3 else None, _at(50 + index), _at(70 + index),
        ))
    return rows


def _menu(rng: random.Random, brand: str) -> list[dict[str, Any]]:
    sections = rng.sample(["shoes", "bags", "sale", "new", "kids", "home", "gifts", "men", "women"], 4)
    return [
        {
            "label": section.title(),
            "href": f"https://{brand}.example/{section}",
            "children": [
                {"label": f"{section.title()} {n}", "href": f"https://{brand}.example/{section}/{n}"}
                for n in range(rng.randint(0, 4))
            ],
        }
        for section in sections
    ]


def draft_rows() -> list[tuple[Any, ...]]:
    rng = random.Random(SEED + 3)
    authors = user_ids()
    titles = ["Main menu", "Footer", "Holiday menu", "Mobile menu", "Sale banner"]
    rows = []
    for i in range(DRAFT_COUNT):
        brand_id = i % BRAND_COUNT + 1
        title = titles[(i // BRAND_COUNT) % len(titles)]
        version = i // (BRAND_COUNT * len(titles)) + 1
        status = rng.choice(["DRAFT", "DRAFT", "PUBLISHED", "DISCARDED"])
        rows.append((
            ids.uuid4_of(rng.getrandbits(128)), brand_id, title,
            json.dumps(_menu(rng, brand_slug(brand_id))), status, version,
            _at(9000 + i) if status == "PUBLISHED" else None, authors[i % len(authors)],
            _at(8000 + i), _at(8500 + i),
        ))
    return rows


TABLES: list[tuple[str, tuple[str, ...], Any]] = [
    ("Brand", ("id", "slug", "name", "domain", "createdAt", "updatedAt"), brand_rows),
    ("Image", ("id", "brandId", "storageKey", "contentType", "sizeBytes", "width", "height", "alt", "status",
               "createdAt", "updatedAt"), image_rows),
    ("User", ("id", "email", "name", "passwordHash", "role", "brandId", "lastLoginAt", "createdAt",
              "updatedAt"), user_rows),
    ("NavigationDraft", ("id", "brandId", "title", "items", "status", "version", "publishedAt", "authorId",
                         "createdAt", "updatedAt"), draft_rows),
]
SERIAL_TABLES = ("Brand", "Image")


def has_demo_data(conn: psycopg.Connection) -> bool:
    record = conn.execute('SELECT EXISTS (SELECT 1 FROM "Brand")').fetchone()
    return bool(record and record[0])


def insert_demo_data(conn: psycopg.Connection) -> dict[str, int]:
    """COPY every demo row in one transaction; returns rows per table."""
    counts = {}
    with conn.transaction():
        for table, columns, make_rows in TABLES:
            rows = make_rows()
            pg.copy_rows(conn, table, columns, rows)
            counts[table] = len(rows)
        for table in SERIAL_TABLES:
            # Rows came with explicit ids: move the sequence past them so the app can insert.
            pg.move_sequence_past_ids(conn, table)
    return counts
