"""A stand-in for the Node app: a tiny HTTP server configured by an env file.

    python server.py --env-file .env --port 3000 --pid-file app.pid

/api/health: 200 when DATABASE_URL connects, else 503 with the reason.
/api/ready:  200 when health passes, no migration is pending (folders under
             APP_MIGRATIONS_DIR vs finished rows of _prisma_migrations) and the
             S3_* storage keys can reach their bucket; else 503 naming the check.

Standard library only; psycopg and boto3 are used when importable (run it with the
project's Python). Exits 2 at start when DATABASE_URL is missing. Secret values
never appear in responses or logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import sys
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REQUIRED = ("DATABASE_URL",)
S3_VARIABLES = ("S3_ENDPOINT", "S3_BUCKET", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|KEY", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s/]+@")
CHECK_TIMEOUT_SECONDS = 3


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines; blank lines, comments and an `export ` prefix allowed; quotes stripped."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                value = value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        values[key.strip()] = value
    return values


class App:
    def __init__(self, environment: dict[str, str]):
        self.environment = environment
        self._secrets = [value for key, value in environment.items()
                         if SECRET_NAME.search(key) and len(value) >= 4]
        password = urlsplit(environment.get("DATABASE_URL", "")).password
        if password:
            self._secrets += [password, unquote(password)]

    def scrub(self, text: str) -> str:
        for value in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(value, "***")
        return URL_PASSWORD.sub(r"\1***@", text)

    # --- checks: each returns None when fine, else the reason ---

    def check_database(self) -> str | None:
        url = self.environment["DATABASE_URL"]
        try:
            import psycopg
        except ImportError:
            return self._check_tcp(url)
        try:
            with psycopg.connect(url, connect_timeout=CHECK_TIMEOUT_SECONDS) as connection:
                connection.execute("select 1")
        except Exception as error:
            return self.scrub(f"database: {error}".strip())
        return None

    def _check_tcp(self, url: str) -> str | None:
        parts = urlsplit(url)
        try:
            socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432),
                                     timeout=CHECK_TIMEOUT_SECONDS).close()
        except OSError as error:
            return f"database: cannot connect to {parts.hostname}:{parts.port or 5432}: {error.strerror}"
        return None

    def check_migrations(self) -> str | None:
        directory = self.environment.get("APP_MIGRATIONS_DIR")
        if not directory:
            return None
        try:
            on_disk = {entry.name for entry in os.scandir(directory) if entry.is_dir()}
        except OSError as error:
            return f"migrations: cannot read {directory}: {error.strerror}"
        try:
            applied = self._applied_migrations()
        except Exception as error:
            return self.scrub(f"migrations: {error}".strip())
        pending = sorted(on_disk - applied)
        return f"migrations: {len(pending)} pending: {', '.join(pending)}" if pending else None

    def _applied_migrations(self) -> set[str]:
        import psycopg

        with psycopg.connect(self.environment["DATABASE_URL"],
                             connect_timeout=CHECK_TIMEOUT_SECONDS) as connection:
            exists = connection.execute("select to_regclass('_prisma_migrations') is not null").fetchone()
            if not exists or not exists[0]:
                return set()
            rows = connection.execute(
                "select migration_name from _prisma_migrations"
                " where finished_at is not null and rolled_back_at is null").fetchall()
        return {row[0] for row in rows}

    def check_storage(self) -> str | None:
        present = [name for name in S3_VARIABLES if self.environment.get(name)]
        if not present:
            return None
        missing = [name for name in S3_VARIABLES if name not in present]
        if missing:
            return f"storage: missing {', '.join(missing)}"
        try:
            self._head_bucket()
        except Exception as error:
            return self.scrub(f"storage: {type(error).__name__}: {error}")
        return None

    def _head_bucket(self) -> None:
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=CHECK_TIMEOUT_SECONDS, read_timeout=CHECK_TIMEOUT_SECONDS,
                        retries={"max_attempts": 1}, request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
        client = boto3.client(
            "s3", endpoint_url=self.environment["S3_ENDPOINT"],
            aws_access_key_id=self.environment["S3_ACCESS_KEY_ID"],
            aws_secret_access_key=self.environment["S3_SECRET_ACCESS_KEY"],
            region_name=self.environment.get("S3_REGION", "us-east-1"), config=config)
        client.head_bucket(Bucket=self.environment["S3_BUCKET"])

    def health(self) -> tuple[int, dict]:
        reason = self.check_database()
        return (503, {"status": "error", "reason": reason}) if reason else (200, {"status": "ok"})

    def ready(self) -> tuple[int, dict]:
        for check in (self.check_database, self.check_migrations, self.check_storage):
            reason = check()
            if reason:
                return 503, {"status": "error", "check": check.__name__.removeprefix("check_"),
                             "reason": reason}
        return 200, {"status": "ok"}


def log(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{stamp} {message}", flush=True)


def make_handler(app: App) -> type[BaseHTTPRequestHandler]:
    routes = {"/api/health": app.health, "/api/ready": app.ready}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            status, payload = route() if route else (404, {"status": "error", "reason": "not found"})
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            log(f"GET {self.path.split('?', 1)[0]} {status}")

        def log_message(self, format: str, *args: object) -> None:
            pass  # do_GET logs one scrubbed line per request

    return Handler


def read_environment(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return parse_env_file(handle.read())
    except FileNotFoundError:
        return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--pid-file")
    arguments = parser.parse_args(argv)

    environment = read_environment(arguments.env_file)
    missing = [name for name in REQUIRED if not environment.get(name)]
    if missing:
        log(f"cannot start: missing required variable {', '.join(missing)} in {arguments.env_file}")
        return 2
    server = ThreadingHTTPServer((arguments.host, arguments.port), make_handler(App(environment)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if arguments.pid_file:
        # Written once the port is bound: its presence means the app accepts connections.
        with open(arguments.pid_file, "w") as handle:
            handle.write(f"{os.getpid()}\n")
    log(f"listening on {arguments.host}:{arguments.port} pid {os.getpid()} "
        f"(variables: {', '.join(sorted(environment))})")
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if arguments.pid_file:
            with contextlib.suppress(FileNotFoundError):
                os.remove(arguments.pid_file)
        log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
