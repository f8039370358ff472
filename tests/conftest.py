"""Session-wide real servers on loopback: PostgreSQL, S3 (moto), sshd with a test app."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.s3",
    "tests.fixtures.ssh",
    "tests.fixtures.notify",
    "tests.fixtures.cloudflare",
    "tests.fixtures.provision",
    "tests.fixtures.vercel",
    "tests.fixtures.neon",
]
