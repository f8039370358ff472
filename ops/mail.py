"""The SMTP connector: smtplib and email.message, imported inside the function that sends.

Both pull in much of the email package; listing tasks and importing any other module
must not pay for that.
"""

from __future__ import annotations

import ssl


class MailFailed(Exception):
    """The SMTP exchange failed (refused, dropped, timed out): the text names the error's type."""


def send(host: str, port: int, *, timeout: float, starttls: bool, login: tuple[str, str] | None,
         subject: str, sender: str, recipients: list[str], body: str) -> dict[str, object]:
    """Send one plain-text message; the recipients the server refused (empty when all were taken)."""
    import smtplib
    from email.message import EmailMessage

    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message.set_content(body)
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as client:
            if starttls:
                client.starttls(context=ssl.create_default_context())
            if login:
                client.login(*login)
            return dict(client.send_message(message))
    except (smtplib.SMTPException, OSError) as error:
        raise MailFailed(f"{type(error).__name__}: {error}") from None
