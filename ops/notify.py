"""Notice channels from the inventory's `notify` list: stdout, file, webhook (Slack-compatible), smtp.

Each channel kind takes one rendered format, for one audience:

    stdout, file -> "status_page" (Markdown)     webhook -> "webhook" (JSON payload)     smtp -> "email"

A channel's `audience` is "internal" unless the inventory says "public": customer-facing
text goes out only where the operator asked for it. `send` never raises for a failed
delivery: it returns one Delivery per channel and the caller decides (an incident update
is recorded before anything is sent, so a failed send loses nothing).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
from collections.abc import Collection
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlparse

from ops import mail, web
from ops.errors import OpsError
from ops.hosts import is_loopback
from ops.inventory import resolve
from ops.lazy_dataclasses import dataclass
from ops.output import Output
from ops.secrets import Secret, redact, reveal

if TYPE_CHECKING:
    from ops.inventory import Environment

FORMAT_OF_KIND = {"stdout": "status_page", "file": "status_page", "webhook": "webhook", "smtp": "email"}
AUDIENCES = ("public", "internal")
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 2  # so three attempts in all
BACKOFF_SECONDS = 0.5  # doubled after each failed attempt
MAX_BACKOFF_SECONDS = 8.0


@dataclass(frozen=True)
class Notice:
    """One rendered notice: a format for an audience. `body` is Markdown, JSON text or email text."""

    format: str  # status_page | webhook | email
    audience: str  # public | internal
    subject: str
    body: str
    state: str = ""


@dataclass(frozen=True)
class Channel:
    """A notice channel from the inventory's `notify` list."""

    index: int
    kind: str
    audience: str
    settings: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return f"notify[{self.index}] {self.kind} ({self.target()})"

    def target(self) -> str:
        """Where it goes, without the secret part (a webhook URL's path is its credential)."""
        if self.kind == "webhook":
            parsed = urlparse(str(reveal(self.settings.get("url", ""))))
            return f"{parsed.scheme}://{parsed.hostname}{':' + str(parsed.port) if parsed.port else ''}/…"
        if self.kind == "smtp":
            to = self.settings.get("to") or []
            return f"{self.settings.get('host', 'localhost')}:{self.settings.get('port', 25)} to {len(to)} recipient(s)"
        if self.kind == "file":
            return str(self.settings.get("path", "?"))
        return "standard output"


@dataclass
class Delivery:
    """What sending a notice to one channel did."""

    channel: str
    kind: str
    audience: str
    ok: bool
    detail: str
    attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"channel": self.channel, "kind": self.kind, "audience": self.audience, "ok": self.ok,
                "detail": redact(self.detail), "attempts": self.attempts}


class SendFailed(OpsError):
    """One channel could not deliver (after its retries)."""


# --- channels ---------------------------------------------------------------------------------


def channels(env: Environment) -> list[Channel | Delivery]:
    """The configured channels; a channel whose settings cannot be resolved comes back as a failed Delivery."""
    configured = env.raw("notify", []) or []
    found: list[Channel | Delivery] = []
    for index, raw in enumerate(configured):
        kind = raw.get("kind", "?")
        audience = raw.get("audience") or "internal"
        try:
            settings = resolve(raw)
        except OpsError as error:
            found.append(Delivery(f"notify[{index}] {kind}", kind, audience, False, redact(error.message)))
            continue
        found.append(Channel(index, kind, audience, settings))
    return found


def route(env: Environment, notices: list[Notice], *, audience: str | None = None,
          only: Collection[str] | None = None) -> list[tuple[Channel, Notice] | Delivery]:
    """Each configured channel (only those of `audience`, and those named in `only`, when given) with the notice
    of its format, or the failed Delivery of a channel that cannot be sent to. Nothing is sent: a plan shows this."""
    routes: list[tuple[Channel, Notice] | Delivery] = []
    for channel in channels(env):
        if only is not None and (channel.channel if isinstance(channel, Delivery) else channel.name) not in only:
            continue
        if isinstance(channel, Delivery):
            routes.append(channel)
            continue
        if audience and channel.audience != audience:
            continue
        notice = _notice_for(channel, notices)
        if notice is None:
            routes.append(Delivery(channel.name, channel.kind, channel.audience, False,
                                   f"no {FORMAT_OF_KIND.get(channel.kind)} notice for the "
                                   f"{channel.audience} audience was rendered"))
        else:
            routes.append((channel, notice))
    return routes


def send(env: Environment, notices: list[Notice], *, stream: TextIO | None = None,
         audience: str | None = None, only: Collection[str] | None = None) -> list[Delivery]:
    """Deliver to every configured channel (only those of `audience`, and those named in `only`, when given) the
    notice of its format."""
    return [item if isinstance(item, Delivery) else _deliver(env, *item, stream)
            for item in route(env, notices, audience=audience, only=only)]


def _notice_for(channel: Channel, notices: list[Notice]) -> Notice | None:
    wanted = FORMAT_OF_KIND.get(channel.kind)
    return next((n for n in notices if n.format == wanted and n.audience == channel.audience), None)


def preview_text(notice: Notice) -> str:
    if notice.format == "email":
        return f"Subject: {notice.subject}\n\n{notice.body}"
    return notice.body


def _deliver(env: Environment, channel: Channel, notice: Notice, stream: TextIO | None) -> Delivery:
    senders = {"stdout": _to_stream, "file": _to_file, "webhook": _to_webhook, "smtp": _to_smtp}
    sender = senders.get(channel.kind)
    if sender is None:
        return Delivery(channel.name, channel.kind, channel.audience, False, f"unknown channel kind {channel.kind!r}")
    try:
        detail, attempts = sender(env, channel, notice, stream)
    except OpsError as error:
        return Delivery(channel.name, channel.kind, channel.audience, False, redact(error.message),
                        error.attempts)
    except Exception as error:  # a channel must never take the incident update down with it
        return Delivery(channel.name, channel.kind, channel.audience, False,
                        redact(f"{type(error).__name__}: {error}"), 1)
    return Delivery(channel.name, channel.kind, channel.audience, True, detail, attempts)


def _to_stream(env: Environment, channel: Channel, notice: Notice, stream: TextIO | None) -> tuple[str, int]:
    print(redact(preview_text(notice)), file=stream or sys.stdout, flush=True)
    return "printed", 1


def _to_file(env: Environment, channel: Channel, notice: Notice, stream: TextIO | None) -> tuple[str, int]:
    """Appended (a notice log a status page or a person can follow), never rewritten."""
    path = Path(os.path.expanduser(str(channel.settings["path"])))
    if not path.is_absolute():
        path = env.inventory.file.parent / path
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(redact(preview_text(notice)).rstrip("\n") + "\n\n---\n\n")
    return f"appended to {path}", 1


# --- webhook ----------------------------------------------------------------------------------


def _to_webhook(env: Environment, channel: Channel, notice: Notice, stream: TextIO | None) -> tuple[str, int]:
    url = channel.settings.get("url")
    if not url:
        raise SendFailed(f"{channel.name}: no url")
    payload = json.loads(notice.body)
    timeout = float(channel.settings.get("timeout") or DEFAULT_TIMEOUT)
    retries = int(channel.settings.get("retries", DEFAULT_RETRIES))
    return post_json(url, payload, timeout=timeout, retries=retries, label=channel.name)


def post_json(url: str | Secret, payload: dict[str, Any], *, timeout: float = DEFAULT_TIMEOUT,
              retries: int = DEFAULT_RETRIES, label: str = "webhook") -> tuple[str, int]:
    """POST with retries on network errors, 429 and 5xx (backoff doubling); other 4xx fail at once."""
    data = json.dumps(payload).encode()
    delay = BACKOFF_SECONDS
    last = "not attempted"
    for attempt in range(1, retries + 2):
        request = web.request(str(reveal(url)), data=data, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "opsbook"})
        try:
            with web.urlopen(request, timeout=timeout) as response:
                return f"HTTP {response.status}", attempt
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code} {error.reason}"
            if error.code != 429 and error.code < 500:
                raise _failed(label, last, attempt) from None
            delay = max(delay, _retry_after(error))
        except (urllib.error.URLError, OSError) as error:
            last = f"no answer ({getattr(error, 'reason', error)})"
        if attempt <= retries:
            time.sleep(min(delay, MAX_BACKOFF_SECONDS))  # backoff between attempts, not a readiness wait
            delay *= 2
    raise _failed(label, last, retries + 1)


def _retry_after(error: Any) -> float:
    try:
        return float(error.headers.get("Retry-After") or 0)
    except (TypeError, ValueError):
        return 0.0


def _failed(label: str, reason: str, attempts: int) -> SendFailed:
    failure = SendFailed(redact(f"{label}: {reason} after {attempts} attempt(s)"))
    failure.attempts = attempts
    return failure


# --- smtp -------------------------------------------------------------------------------------


def _to_smtp(env: Environment, channel: Channel, notice: Notice, stream: TextIO | None) -> tuple[str, int]:
    settings = channel.settings
    host, port = str(settings.get("host") or "localhost"), int(settings.get("port") or 25)
    recipients = [str(reveal(to)) for to in settings.get("to") or []]
    if not recipients:
        raise SendFailed(f"{channel.name}: no recipients (`to`)")
    password = settings.get("password")
    starttls = bool(settings.get("starttls"))
    if password and not starttls and not is_loopback(host):
        raise SendFailed(f"{channel.name}: refusing to send the SMTP password unencrypted to {host}",
                         hint="set starttls: true for this channel")
    sender = str(settings.get("from") or f"opsbook@{socket.gethostname()}")
    username = settings.get("username")
    login = (str(reveal(username)), str(reveal(password))) if username and password else None
    try:
        refused = mail.send(host, port, timeout=float(settings.get("timeout") or DEFAULT_TIMEOUT), starttls=starttls,
                            login=login, subject=notice.subject, sender=sender, recipients=recipients,
                            body=notice.body)
    except mail.MailFailed as error:
        raise SendFailed(redact(f"{channel.name}: {error}")) from None
    if refused:
        raise SendFailed(f"{channel.name}: refused recipients: {', '.join(sorted(refused))}")
    return f"sent to {len(recipients)} recipient(s)", 1


# --- the plain failure message (contract E) --------------------------------------------------


def plain_notices(subject: str, body: str, *, audience: str = "internal") -> list[Notice]:
    """A message without a template, in every format."""
    subject, body = redact(subject), redact(body)
    payload = {"text": f"{subject}\n{body}",
               "blocks": [{"type": "header", "text": {"type": "plain_text", "text": subject[:150]}},
                          {"type": "section", "text": {"type": "mrkdwn", "text": body[:3000] or subject}}]}
    return [Notice("status_page", audience, subject, f"**{subject}**\n\n{body}\n"),
            Notice("webhook", audience, subject, json.dumps(payload)),
            Notice("email", audience, subject, body + "\n")]


def notify_failure(env: Environment, subject: str, body: str) -> None:
    """Tell every internal channel that something failed. Never raises: a failed send warns on stderr."""
    try:
        deliveries = send(env, plain_notices(subject, body), audience="internal", stream=sys.stderr)
    except Exception as error:  # the failure being reported matters more than this one
        Output().warn(f"could not notify the channels of {env.name}: {error}")
        return
    for delivery in deliveries:
        if not delivery.ok:
            Output().warn(f"{delivery.channel} was not told: {delivery.detail}")


def failed(deliveries: list[Delivery]) -> list[Delivery]:
    return [delivery for delivery in deliveries if not delivery.ok]
