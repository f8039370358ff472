"""The Vercel REST API client (Bearer token, JSON, `teamId` on every call when the project is a team's).

Only the calls the runbooks need: a project's environment variables, its deployments,
redeploying one and promoting one to production. HTTP goes through ops.web; the token
is a Secret and never leaves this module except in the Authorization header.
"""

from __future__ import annotations

import json
import urllib.error
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from ops import web
from ops.errors import CheckFailed, ConnectionFailed, InventoryError, OpsError, StepFailed
from ops.lazy_dataclasses import dataclass
from ops.secrets import Secret, redact, reveal

if TYPE_CHECKING:
    from ops.inventory import Environment

VERCEL_API = "https://api.vercel.com"
HTTP_TIMEOUT_SECONDS = 30
TARGETS = ("production", "preview")
PAGE_LIMIT = 100


@dataclass(frozen=True)
class VercelSettings:
    project_id: str
    token: Secret
    team_id: str | None
    target: str
    api: str

    def where(self) -> str:
        team = f", team {self.team_id}" if self.team_id else ""
        return f"Vercel project {self.project_id}{team}"


def settings(env: Environment) -> VercelSettings:
    """`app.vercel` of the environment; an inventory error naming what is missing."""
    if not env.has("app.vercel.project_id"):
        raise env.missing("app.vercel.project_id")
    if not env.has("app.vercel.token"):
        raise env.missing("app.vercel.token")
    token = env.value("app.vercel.token")
    target = str(env.raw("app.vercel.target", "production"))
    if target not in TARGETS:
        raise InventoryError(f"envs.{env.name}.app.vercel.target: {target!r} is not one of {', '.join(TARGETS)}",
                             where=env.inventory.location(f"envs.{env.name}.app"))
    return VercelSettings(project_id=str(env.raw("app.vercel.project_id")),
                          token=token if isinstance(token, Secret) else Secret(str(reveal(token))),
                          team_id=(str(env.raw("app.vercel.team_id")) if env.has("app.vercel.team_id") else None),
                          target=target, api=str(env.raw("app.vercel.api", VERCEL_API)).rstrip("/"))


class VercelApi:
    def __init__(self, config: VercelSettings):
        self.config = config

    # --- environment variables ---

    def list_env(self) -> list[dict[str, Any]]:
        """The project's variables (values not decrypted)."""
        return list(self.call("GET", f"/v10/projects/{self._project()}/env").get("envs") or [])

    def env_value(self, env_id: str) -> str:
        """One variable's decrypted value."""
        answer = self.call("GET", f"/v1/projects/{self._project()}/env/{quote(env_id, safe='')}")
        return str(answer.get("value") or "")

    def create_env(self, key: str, value: str) -> None:
        self.call("POST", f"/v10/projects/{self._project()}/env",
                  {"key": key, "value": value, "type": "encrypted", "target": [self.config.target]})

    def update_env(self, env_id: str, value: str) -> None:
        self.call("PATCH", f"/v9/projects/{self._project()}/env/{quote(env_id, safe='')}",
                  {"value": value, "type": "encrypted", "target": [self.config.target]})

    def delete_env(self, env_id: str) -> None:
        self.call("DELETE", f"/v9/projects/{self._project()}/env/{quote(env_id, safe='')}")

    # --- deployments ---

    def project(self) -> dict[str, Any]:
        return self.call("GET", f"/v9/projects/{self._project()}")

    def ready_deployments(self) -> list[dict[str, Any]]:
        """The target's READY deployments, newest first, every page."""
        found: list[dict[str, Any]] = []
        query: dict[str, Any] = {"projectId": self.config.project_id, "target": self.config.target,
                                 "state": "READY", "limit": PAGE_LIMIT}
        while True:
            answer = self.call("GET", "/v6/deployments", query=query)
            found += answer.get("deployments") or []
            following = (answer.get("pagination") or {}).get("next")
            if not following:
                return sorted(found, key=lambda d: d.get("created") or 0, reverse=True)
            query = {**query, "until": following}

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v13/deployments/{quote(deployment_id, safe='')}")

    def redeploy(self, deployment_id: str, name: str) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "deploymentId": deployment_id}
        if self.config.target == "production":
            body["target"] = "production"
        return self.call("POST", "/v13/deployments", body)

    def promote(self, deployment_id: str) -> None:
        self.call("POST", f"/v10/projects/{self._project()}/promote/{quote(deployment_id, safe='')}")

    # --- the call ---

    def _project(self) -> str:
        return quote(self.config.project_id, safe="")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
             query: dict[str, Any] | None = None) -> Any:
        query = {**(query or {}), **({"teamId": self.config.team_id} if self.config.team_id else {})}
        url = f"{self.config.api}{path}" + (f"?{urlencode(query)}" if query else "")
        request = web.request(url, data=json.dumps(body).encode() if body is not None else None, method=method,
                              headers={"Authorization": f"Bearer {self.config.token.reveal()}",
                                       "Content-Type": "application/json"})
        where = f"Vercel API {method} {path} ({self.config.where()})"
        try:
            with web.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            raise _http_error(error, where) from None
        except (urllib.error.URLError, OSError) as error:
            raise ConnectionFailed(f"cannot reach the Vercel API: {redact(getattr(error, 'reason', error))}",
                                   where=where, hint="check app.vercel.api and the network") from None
        return json.loads(text) if text.strip() else {}


def _http_error(error: Any, where: str) -> OpsError:
    try:
        detail = json.loads(error.read()).get("error") or {}
        message = f"{detail.get('code') or error.code}: {detail.get('message') or ''}".strip(": ")
    except (ValueError, OSError, AttributeError):
        message = f"HTTP {error.code}"
    message = redact(message)
    if error.code in (401, 403):
        return ConnectionFailed(f"Vercel refused app.vercel.token ({message})", where=where,
                                hint="the token needs access to the project (and its team: app.vercel.team_id)")
    if error.code == 404:
        return CheckFailed(f"not found ({message})", where=where,
                           hint="check app.vercel.project_id and app.vercel.team_id")
    if error.code == 429:
        return StepFailed(f"Vercel is rate limiting this token ({message})", where=where,
                          hint="wait a minute and run the task again")
    return StepFailed(f"Vercel answered HTTP {error.code} ({message})", where=where,
                      hint="read the message; Vercel's status page says whether the API is degraded")
