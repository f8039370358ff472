"""The `kubernetes` secret store: the environment's map as a Secret, through the Kubernetes API.

The Secret is the one the scheduled CronJobs read (`envFrom`, ops/schedule.py: opsbook-ENV in
namespace opsbook unless `schedule.kubernetes` or `secrets.kubernetes` say), so a key opsbook
rotates reaches the next job without a copy by hand. Keys others put in that Secret stay: a
change rewrites only the keys it names. Each write carries the resourceVersion it read, so two
writers never overwrite each other's change (the API answers 409 to the later one).

Inside a pod, the API server, token and CA default to the service account's; elsewhere
`secrets.kubernetes.api` and `token` (a reference) say where and as whom.
"""

from __future__ import annotations

import base64
import json
import urllib.error
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ops import web
from ops.clock import iso_z, parse_time_or_none, utc_now
from ops.errors import ConnectionFailed
from ops.secret_store import Store
from ops.secrets import Secret, redact

IN_CLUSTER_API = "https://kubernetes.default.svc"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CHANGED_ANNOTATION = "opsbook/changed-at"
TIMEOUT_SECONDS = 30.0


def secret_manifest(name: str, namespace: str, env_name: str, values: Mapping[str, Secret],
                    resource_version: str | None = None, changed_at: datetime | None = None) -> dict[str, Any]:
    """The Secret object for `values` (base64 data, as the API takes it)."""
    metadata: dict[str, Any] = {
        "name": name, "namespace": namespace,
        "labels": {"app.kubernetes.io/name": "opsbook", "app.kubernetes.io/instance": env_name.replace("_", "-"),
                   "app.kubernetes.io/managed-by": "opsbook"},
        "annotations": {CHANGED_ANNOTATION: iso_z(changed_at or utc_now())},
    }
    if resource_version:
        metadata["resourceVersion"] = resource_version
    data = {key: base64.b64encode(value.reveal().encode()).decode() for key, value in sorted(values.items())}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "data": data}


def decoded(secret: dict[str, Any]) -> dict[str, Secret]:
    return {key: Secret(base64.b64decode(value).decode(errors="replace"))
            for key, value in (secret.get("data") or {}).items()}


class KubernetesSecretStore(Store):
    kind = "kubernetes"

    def __init__(self, settings: dict[str, Any], env_name: str):
        self.env_name = env_name
        self.namespace = str(settings.get("namespace") or "opsbook")
        self.name = str(settings.get("secret") or f"opsbook-{env_name.replace('_', '-')}")
        self.api = str(settings.get("api") or IN_CLUSTER_API).rstrip("/")
        self._token = settings.get("token")
        self.ca_file = settings.get("ca_file") or (str(SERVICE_ACCOUNT / "ca.crt")
                                                   if not settings.get("api") and SERVICE_ACCOUNT.exists() else None)

    @property
    def label(self) -> str:
        return f"Kubernetes Secret {self.namespace}/{self.name}"

    @property
    def location(self) -> str:
        return f"{self.label} at {self.api}"

    def _path(self, named: bool = True) -> str:
        base = f"/api/v1/namespaces/{self.namespace}/secrets"
        return f"{base}/{self.name}" if named else base

    def _headers(self) -> dict[str, str]:
        token = self._token
        if token is None and (SERVICE_ACCOUNT / "token").exists():
            token = Secret((SERVICE_ACCOUNT / "token").read_text().strip())
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token.reveal() if isinstance(token, Secret) else token}"
        return headers

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The answer's object, or None for 404."""
        request = web.request(f"{self.api}{path}", method=method, headers=self._headers(),
                              data=json.dumps(body).encode() if body is not None else None)
        try:
            with web.urlopen(request, timeout=TIMEOUT_SECONDS, context=web.tls_context(self.ca_file)) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise ConnectionFailed(f"{self.label}: the API answered {error.code} to {method}",
                                   hint=_hint(error.code)) from None
        except (urllib.error.URLError, OSError) as error:
            raise ConnectionFailed(f"{self.label}: cannot reach {self.api} ({redact(error)})",
                                   hint="check secrets.kubernetes.api and the network") from None
        return json.loads(text) if text else {}

    def _object(self) -> dict[str, Any] | None:
        return self._call("GET", self._path())

    def exists(self) -> bool:
        return self._object() is not None

    def read(self) -> dict[str, Secret]:
        found = self._object()
        return decoded(found) if found else {}

    def update(self, changes: Mapping[str, Secret | None]) -> None:
        found = self._object()
        current = decoded(found) if found else {}
        values = {k: v for k, v in {**current, **changes}.items() if v is not None}
        if found is not None and values == current:
            return
        version = (found or {}).get("metadata", {}).get("resourceVersion")
        manifest = secret_manifest(self.name, self.namespace, self.env_name, values, version)
        if found is None:
            self._call("POST", self._path(named=False), manifest)
        else:
            self._call("PUT", self._path(), manifest)

    def last_changed(self) -> datetime | None:
        found = self._object()
        if not found:
            return None
        metadata = found.get("metadata", {})
        return parse_time_or_none((metadata.get("annotations") or {}).get(CHANGED_ANNOTATION)
                                  or metadata.get("creationTimestamp"))

    def remove(self) -> None:
        self._call("DELETE", self._path())


def _hint(code: int) -> str:
    if code in (401, 403):
        return "the token needs get, create and update on this Secret (a Role bound to its service account)"
    if code == 409:
        return "the Secret changed while opsbook wrote it: run the task again"
    return "check secrets.kubernetes (api, namespace, secret)"
