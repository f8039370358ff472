"""Neon's API (v2): the branches, restores and role passwords of a `database.provider: neon` environment.

Neon gives every branch its own compute endpoint; a branch "at time T" is the parent's data as it was at T,
within the project's history retention (a time outside it is refused). Calls that change something answer
with `operations` that run asynchronously: callers wait for them to finish before using the result.
Errors are `{"code", "message"}`; the API key is sent as a Bearer token and never appears in a message.
"""

from __future__ import annotations

import json
import time
import urllib.error
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from ops import web
from ops.clock import as_utc, iso_z
from ops.errors import CheckFailed, ConnectionFailed, InventoryError, OpsError, StepFailed
from ops.lazy_dataclasses import dataclass
from ops.secrets import Secret, redact

if TYPE_CHECKING:
    from ops.inventory import Environment

NEON_API = "https://console.neon.tech/api/v2"
PROVIDER = "neon"
HTTP_TIMEOUT_SECONDS = 30.0
OPERATION_TIMEOUT_SECONDS = 300.0
OPERATION_POLL_SECONDS = 0.5
DONE, FAILED = "finished", "failed"
FAILED_STATES = frozenset({FAILED, "error", "cancelled", "skipped"})


@dataclass(frozen=True)
class Branch:
    id: str
    name: str
    parent_id: str | None
    primary: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Branch:
        return cls(str(data["id"]), str(data.get("name") or data["id"]), data.get("parent_id"),
                   bool(data.get("primary") or data.get("default")))


@dataclass(frozen=True)
class CreatedBranch:
    branch: Branch
    connection_uri: Secret | None  # the branch's read-write endpoint, the role's password in it
    endpoint_host: str | None


def is_neon(env: Environment) -> bool:
    return env.raw("database.provider", None) == PROVIDER


def client(env: Environment) -> NeonApi:
    """The API of `env`'s Neon project; InventoryError naming what is missing."""
    for key in ("project_id", "api_key"):
        if not env.has(f"database.{key}"):
            raise env.missing(f"database.{key}")
    key = env.value("database.api_key")
    return NeonApi(str(env.value("database.project_id")), key if isinstance(key, Secret) else Secret(str(key)),
                   api_base=str(env.value("database.api_base", NEON_API)))


def branch_name(env: Environment) -> str:
    """The branch the environment's database lives on (default: the project's primary branch, `main`)."""
    return str(env.value("database.branch", "main"))


def in_history_window(moment: datetime, now: datetime, retention_seconds: int) -> bool:
    return now - timedelta(seconds=retention_seconds) <= as_utc(moment) <= now


def refuse_outside_window(moment: datetime, now: datetime, retention_seconds: int, project: str) -> None:
    """CheckFailed before anything is done when `moment` is outside the project's history retention."""
    if in_history_window(moment, now, retention_seconds):
        return
    earliest = now - timedelta(seconds=retention_seconds)
    raise CheckFailed(f"{iso_z(as_utc(moment))} is outside Neon project {project}'s history window "
                      f"({iso_z(earliest)} to now: history_retention_seconds {retention_seconds})",
                      hint="choose a time inside the window, or restore a backup (`inv restore --backup ID`)")


class NeonApi:
    def __init__(self, project_id: str, api_key: Secret, *, api_base: str = NEON_API):
        self.project_id, self.api_key, self.api_base = project_id, api_key, api_base.rstrip("/")

    def _project(self, suffix: str = "") -> str:
        return f"/projects/{quote(self.project_id, safe='')}{suffix}"

    # --- reads ---

    def project(self) -> dict[str, Any]:
        return dict(self.request("GET", self._project()).get("project") or {})

    def history_retention_seconds(self) -> int:
        return int(self.project().get("history_retention_seconds") or 0)

    def branches(self) -> list[Branch]:
        return [Branch.from_json(item) for item in self.request("GET", self._project("/branches")).get("branches", [])]

    def find_branch(self, name_or_id: str) -> Branch | None:
        return next((b for b in self.branches() if name_or_id in (b.name, b.id)), None)

    def require_branch(self, name_or_id: str) -> Branch:
        branch = self.find_branch(name_or_id)
        if branch is None:
            raise CheckFailed(f"Neon project {self.project_id} has no branch {name_or_id!r}",
                              where=self.api_base, hint="check database.branch, or run `inv provision`")
        return branch

    def endpoints(self, branch_id: str) -> list[dict[str, Any]]:
        answer = self.request("GET", self._project(f"/branches/{quote(branch_id, safe='')}/endpoints"))
        return list(answer.get("endpoints") or [])

    def roles(self, branch_id: str) -> list[str]:
        answer = self.request("GET", self._project(f"/branches/{quote(branch_id, safe='')}/roles"))
        return [str(role["name"]) for role in answer.get("roles") or []]

    def databases(self, branch_id: str) -> list[str]:
        answer = self.request("GET", self._project(f"/branches/{quote(branch_id, safe='')}/databases"))
        return [str(database["name"]) for database in answer.get("databases") or []]

    def primary_branch(self) -> Branch:
        branch = next((b for b in self.branches() if b.primary), None)
        if branch is None:
            raise CheckFailed(f"Neon project {self.project_id} has no default branch", where=self.api_base,
                              hint="set one in the Neon console (Branches → Set as default)")
        return branch

    def reveal_password(self, branch_id: str, role: str) -> Secret:
        path = f"/branches/{quote(branch_id, safe='')}/roles/{quote(role, safe='')}/reveal_password"
        return Secret(str(self.request("GET", self._project(path)).get("password") or ""))

    def connection_uri(self, branch_id: str, database: str, role: str, *, pooled: bool) -> Secret:
        """The URL of `database` as `role` on the branch's read-write endpoint (its `-pooler` host when pooled)."""
        query = urlencode({"branch_id": branch_id, "database_name": database, "role_name": role,
                           "pooled": "true" if pooled else "false"})
        uri = self.request("GET", self._project(f"/connection_uri?{query}")).get("uri")
        if not uri:
            raise StepFailed(f"Neon gave no connection URI for {role}@{database} on branch {branch_id}",
                             where=self.api_base, hint="check the branch has a read-write compute endpoint")
        return Secret(str(uri))

    # --- changes (each waits for its operations) ---

    def create_branch(self, parent_id: str, name: str, at: datetime | None = None) -> CreatedBranch:
        branch: dict[str, Any] = {"parent_id": parent_id, "name": name}
        if at is not None:
            branch["parent_timestamp"] = iso_z(as_utc(at))
        answer = self.request("POST", self._project("/branches"),
                              {"branch": branch, "endpoints": [{"type": "read_write"}]})
        self.wait(answer)
        uris = answer.get("connection_uris") or []
        uri = uris[0].get("connection_uri") if uris else None
        hosts = [e.get("host") for e in answer.get("endpoints") or [] if e.get("type") == "read_write"]
        return CreatedBranch(Branch.from_json(answer["branch"]), Secret(uri) if uri else None,
                             hosts[0] if hosts else None)

    def delete_branch(self, branch_id: str) -> None:
        answer = self.request("DELETE", self._project(f"/branches/{quote(branch_id, safe='')}"), missing_ok=True)
        if answer:
            self.wait(answer)

    def restore_branch(self, branch_id: str, source_branch_id: str, at: datetime, preserve_under_name: str) -> None:
        body = {"source_branch_id": source_branch_id, "source_timestamp": iso_z(as_utc(at)),
                "preserve_under_name": preserve_under_name}
        self.wait(self.request("POST", self._project(f"/branches/{quote(branch_id, safe='')}/restore"), body))

    def reset_password(self, branch_id: str, role: str) -> Secret:
        path = f"/branches/{quote(branch_id, safe='')}/roles/{quote(role, safe='')}/reset_password"
        answer = self.request("POST", self._project(path))
        password = (answer.get("role") or {}).get("password")
        if not password:
            raise StepFailed(f"Neon reset the password of role {role} but did not return it",
                             where=self.api_base, hint="reset it again from the Neon console")
        secret = Secret(str(password))
        self.wait(answer)
        return secret

    def create_role(self, branch_id: str, role: str) -> Secret | None:
        answer = self.request("POST", self._project(f"/branches/{quote(branch_id, safe='')}/roles"),
                              {"role": {"name": role}})
        password = (answer.get("role") or {}).get("password")
        secret = Secret(str(password)) if password else None
        self.wait(answer)
        return secret

    def create_database(self, branch_id: str, name: str, owner: str) -> None:
        self.wait(self.request("POST", self._project(f"/branches/{quote(branch_id, safe='')}/databases"),
                               {"database": {"name": name, "owner_name": owner}}))

    def wait(self, answer: dict[str, Any], timeout: float = OPERATION_TIMEOUT_SECONDS) -> None:
        """Until every operation of `answer` has finished; StepFailed naming one that failed."""
        pending = [str(op["id"]) for op in answer.get("operations") or [] if op.get("status") != DONE]
        deadline = time.monotonic() + timeout
        while pending:
            operation = self.request("GET", self._project(f"/operations/{quote(pending[0], safe='')}"))
            status = str((operation.get("operation") or {}).get("status"))
            if status == DONE:
                pending.pop(0)
                continue
            if status in FAILED_STATES:
                detail = (operation.get("operation") or {}).get("error") or status
                raise StepFailed(f"Neon operation {pending[0]} {status}: {redact(detail)}", where=self.api_base,
                                 hint="the Neon console's Operations page has details; retry")
            if time.monotonic() > deadline:
                raise StepFailed(f"Neon operation {pending[0]} still {status} after {timeout:.0f}s",
                                 where=self.api_base, hint="look at the project's operations in the console")
            time.sleep(OPERATION_POLL_SECONDS)

    # --- the transport ---

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                missing_ok: bool = False) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.api_key.reveal()}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        where = f"Neon API {method} {self.api_base}{path}"
        try:
            with web.urlopen(web.request(f"{self.api_base}{path}", data=data, method=method, headers=headers),
                             timeout=HTTP_TIMEOUT_SECONDS) as response:
                answer = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            if error.code == 404 and missing_ok:
                return {}
            raise _http_error(error, where) from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise ConnectionFailed(f"cannot reach the Neon API: {redact(reason)}", where=where,
                                   hint="check database.api_base and the network") from None
        return answer if isinstance(answer, dict) else {}


def _http_error(error: Any, where: str) -> OpsError:
    try:
        body = json.loads(error.read() or b"{}")
        detail = f"{body.get('code') or error.code}: {body.get('message') or 'no message'}"
    except (ValueError, OSError, AttributeError):
        detail = f"HTTP {error.code}"
    detail = redact(detail)
    if error.code in (401, 403):
        return InventoryError(f"Neon refused database.api_key ({detail})", where=where,
                              hint="create an API key in the Neon console (Account settings → API keys) "
                                   "and set NEON_API_KEY")
    if error.code == 404:
        return CheckFailed(f"not found ({detail})", where=where, hint="check database.project_id and database.branch")
    if 400 <= error.code < 500:
        return CheckFailed(f"Neon refused the request ({detail})", where=where, hint="read the message")
    return StepFailed(f"HTTP {error.code}: {detail}", where=where, hint="retry; see https://neonstatus.com")
