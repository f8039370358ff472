"""The HTTP client connector: urllib.request, imported inside the functions that use it.

urllib.request pulls in http.client and most of the email package; listing tasks and
importing any other module must not pay for that. Callers build a request and open it
here, and catch urllib.error's exceptions (cheap to import) as before.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import urllib.request
    from http.client import HTTPResponse


def request(url: str, *, data: bytes | None = None, method: str | None = None,
            headers: dict[str, str] | None = None) -> urllib.request.Request:
    """A urllib request, not sent yet."""
    import urllib.request

    return urllib.request.Request(url, data=data, method=method, headers=headers or {})


def urlopen(target: str | urllib.request.Request, *, timeout: float,
            context: ssl.SSLContext | None = None) -> HTTPResponse:
    """urllib.request.urlopen: the response (a context manager); HTTPError for a non-2xx answer."""
    import urllib.request

    response: Any = urllib.request.urlopen(target, timeout=timeout, context=context)
    return response


def tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    """Certificates checked against `ca_file` (a private CA, as a Kubernetes API server's), or None: the
    system's."""
    if not ca_file:
        return None
    return ssl.create_default_context(cafile=ca_file)
