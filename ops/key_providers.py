"""Who makes and revokes storage keys: Cloudflare (R2 API tokens), AWS IAM, or a person (static).

A provider creates a key, deletes one (a key already gone is not an error) and
lists the keys it knows. Facts that change during a rotation (the current key,
the credentials to call the API with) are read through callables at call time,
never captured when the provider is built.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import sys
import urllib.error
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ops import aws, web
from ops.clock import parse_time_or_none
from ops.errors import CheckFailed, ConnectionFailed, OpsError, StepFailed, UsageError
from ops.lazy_dataclasses import dataclass
from ops.secrets import Secret, mask_identifier, redact, reveal

if TYPE_CHECKING:
    from botocore.client import BaseClient

CLOUDFLARE_API = "https://api.cloudflare.com/client/v4"
HTTP_TIMEOUT_SECONDS = 30
PAGE_SIZE = 50
IAM_KEYS_PER_USER = 2
# Where the static provider reads the key the operator made by hand (or a prompt asks for it).
NEW_KEY_ID_VARIABLE = "OPS_NEW_STORAGE_ACCESS_KEY_ID"
NEW_SECRET_VARIABLE = "OPS_NEW_STORAGE_SECRET_ACCESS_KEY"


@dataclass(frozen=True)
class NewKey:
    """A storage key just created, with its secret (a Secret: it never prints itself)."""

    key_id: str
    secret_access_key: Secret
    created_at: datetime


@dataclass(frozen=True)
class KeyInfo:
    """A storage key as the provider lists it."""

    key_id: str
    created_at: datetime | None
    active: bool
    label: str | None = None  # the token's name (cloudflare); IAM keys have none


class KeyProvider(ABC):
    name: str = "provider"
    manual: bool = False  # keys are made and revoked by a person, not through an API

    @abstractmethod
    def create_key(self, label: str) -> NewKey: ...

    @abstractmethod
    def delete_key(self, key_id: str) -> None:
        """Revoke `key_id`; one already gone is not an error."""

    @abstractmethod
    def list_keys(self) -> list[KeyInfo]: ...

    def preflight(self) -> list[str]:
        """Read-only: can a key be created now? Details for the plan; raises when it cannot."""
        return []

    def owns(self, info: KeyInfo, label_prefix: str) -> bool:
        """Whether `info` is a key an earlier rotation made (and may clean up when it is not current)."""
        return False

    def info(self, key_id: str) -> KeyInfo | None:
        return next((key for key in self.list_keys() if key.key_id == key_id), None)




# --- Cloudflare -------------------------------------------------------------------


def r2_secret(token_value: str) -> Secret:
    """R2's S3 secret access key is the hex SHA-256 of the API token's value."""
    return Secret(hashlib.sha256(token_value.encode()).hexdigest())


def copy_restrictions(token: dict[str, Any]) -> dict[str, Any]:
    """The token's client IP filter (`condition`) and lifetime (`not_before`, `expires_on`), as POST takes them."""
    return {key: token[key] for key in ("condition", "not_before", "expires_on") if token.get(key)}


def describe_restrictions(restrictions: dict[str, Any]) -> list[str]:
    """Plan lines for what the new token keeps beside the policies."""
    lines = []
    request_ip = (restrictions.get("condition") or {}).get("request_ip") or {}
    if restrictions.get("condition"):
        allowed, refused = request_ip.get("in") or [], request_ip.get("not_in") or []
        lines.append("and its client IP filter: " + "; ".join(
            part for part in (f"only from {', '.join(allowed)}" if allowed else "",
                              f"never from {', '.join(refused)}" if refused else "") if part))
    if restrictions.get("not_before") or restrictions.get("expires_on"):
        lines.append(f"and its lifetime: valid from {restrictions.get('not_before') or 'creation'} until "
                     f"{restrictions.get('expires_on') or 'revoked'} (a rotation never extends it)")
    return lines


def copy_policies(policies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The current token's policies in the shape POST …/tokens accepts (ids dropped)."""
    copied = []
    for policy in policies:
        groups = [{"id": group["id"]} for group in policy.get("permission_groups", [])]
        copied.append({"effect": policy.get("effect", "allow"), "resources": policy.get("resources", {}),
                       "permission_groups": groups})
    return copied


class CloudflareProvider(KeyProvider):
    """R2 keys are account API tokens: key id = token id, secret = sha256(token value)."""

    name = "cloudflare"

    def __init__(self, account_id: str, api_token: Secret, current_key_id: Callable[[], str], *,
                 api_base: str = CLOUDFLARE_API):
        self.account_id = account_id
        self.api_token = api_token
        self.current_key_id = current_key_id
        self.api_base = api_base.rstrip("/")

    def _tokens(self, suffix: str = "") -> str:
        return f"/accounts/{self.account_id}/tokens{suffix}"

    def preflight(self) -> list[str]:
        template = self._template()
        return [f"the new token gets the current token's {len(template['policies'])} policy(ies) "
                f"(account {self.account_id}, {self.api_base})", *describe_restrictions(template)]

    def _template(self) -> dict[str, Any]:
        """What the new token copies from the current one: never more than it may do."""
        current = self.current_key_id()
        token = self.request("GET", self._tokens(f"/{current}"))
        policies = copy_policies(token.get("policies") or [])
        if not policies:
            raise CheckFailed(f"the current R2 token {mask_identifier(current)} has no policies to copy",
                              where=f"Cloudflare account {self.account_id}",
                              hint="check storage.access_key_id: it must be the id of the R2 API token")
        return {"policies": policies, **copy_restrictions(token)}

    def create_key(self, label: str) -> NewKey:
        token = self.request("POST", self._tokens(), {"name": label, **self._template()})
        value = token.get("value")
        if not token.get("id") or not value:
            raise StepFailed(f"Cloudflare created a token without an id or value (account {self.account_id})",
                             hint=f"look for a token named {label!r} in the dashboard and delete it, then retry")
        return NewKey(token["id"], r2_secret(value), parse_time_or_none(token.get("issued_on")) or datetime.now(UTC))

    def delete_key(self, key_id: str) -> None:
        self.request("DELETE", self._tokens(f"/{key_id}"), missing_ok=True)

    def list_keys(self) -> list[KeyInfo]:
        keys: list[KeyInfo] = []
        page = 1
        while True:
            result, info = self.request("GET", self._tokens(f"?page={page}&per_page={PAGE_SIZE}"), paged=True)
            keys += [KeyInfo(t["id"], parse_time_or_none(t.get("issued_on")), t.get("status") == "active",
                             t.get("name")) for t in result or []]
            if not result or page >= int((info or {}).get("total_pages") or 1):
                return keys
            page += 1

    def owns(self, info: KeyInfo, label_prefix: str) -> bool:
        return bool(info.label and info.label.startswith(label_prefix))

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, *, missing_ok: bool = False,
                paged: bool = False) -> Any:
        """One API call; the envelope's `result` (and `result_info` when paged)."""
        data = json.dumps(body).encode() if body is not None else None
        request = web.request(f"{self.api_base}{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {self.api_token.reveal()}", "Content-Type": "application/json"})
        where = f"Cloudflare API {method} {self.api_base}{masked_path(path)}"
        try:
            with web.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
                envelope = _envelope(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 404 and missing_ok:
                return None
            raise self._http_error(error, where) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ConnectionFailed(f"cannot reach the Cloudflare API: {redact(reason)}", where=where,
                                   hint="check keys.api_base and the network") from None
        if not envelope.get("success"):
            raise StepFailed(f"Cloudflare refused: {_messages(envelope)}", where=where,
                             hint="read the message; the dashboard's audit log has details")
        return (envelope.get("result"), envelope.get("result_info")) if paged else envelope.get("result")

    def _http_error(self, error: Any, where: str) -> OpsError:
        try:
            detail = _messages(_envelope(error.read()))
        except (ValueError, OSError):
            detail = f"HTTP {error.code}"
        if error.code in (401, 403):
            return ConnectionFailed(f"Cloudflare refused keys.api_token ({detail})", where=where,
                                    hint="the API token needs Account API Tokens: Edit on account "
                                         f"{self.account_id}; check keys.api_token and keys.account_id")
        if error.code == 404:
            return CheckFailed(f"not found ({detail})", where=where,
                               hint="check keys.account_id and that storage.access_key_id is the R2 token's id")
        return StepFailed(f"HTTP {error.code}: {detail}", where=where, hint="retry; if it persists see "
                          "https://www.cloudflarestatus.com")


def masked_path(path: str) -> str:
    """The request path for messages: no query, the token id (an R2 access key id) masked."""
    head, separator, tail = path.split("?")[0].partition("/tokens/")
    if not separator:
        return head
    token_id, slash, rest = tail.partition("/")
    return f"{head}{separator}{mask_identifier(token_id)}{slash}{rest}"


def _envelope(raw: bytes) -> dict[str, Any]:
    envelope = json.loads(raw or b"{}")
    if not isinstance(envelope, dict):
        raise ValueError("not a Cloudflare API envelope")
    return envelope


def _messages(envelope: dict[str, Any]) -> str:
    errors = envelope.get("errors") or []
    text = "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}" for e in errors if isinstance(e, dict))
    return redact(text or "no error message")


# --- AWS IAM -----------------------------------------------------------------------


class AwsIamProvider(KeyProvider):
    """Access keys of one IAM user, dedicated to the app's storage (at most two keys per user)."""

    name = "aws-iam"

    def __init__(self, user: str, credentials: Callable[[], tuple[Any, Secret | None]],
                 current_key_id: Callable[[], str], *, endpoint: str | None = None,
                 log: Callable[[str], None] | None = None, retired: Callable[[], set[str]] | None = None):
        self.user = user
        self.credentials = credentials
        self.current_key_id = current_key_id
        self.endpoint = endpoint
        self.log = log or (lambda text: None)
        self.retired = retired or set  # keys of the user the environment no longer uses

    def _client(self) -> BaseClient:
        key_id, secret = self.credentials()
        return aws.client("iam", endpoint=self.endpoint, region="us-east-1", access_key_id=reveal(key_id),
                          secret_access_key=reveal(secret) if secret else None,
                          settings={"connect_timeout": 10, "read_timeout": 30, "retries": {"max_attempts": 3}})

    def _call(self, action: str, operation: str, **arguments: Any) -> dict[str, Any]:
        where = f"IAM user {self.user}" + (f" at {self.endpoint}" if self.endpoint else "")
        try:
            return getattr(self._client(), operation)(**arguments)
        except aws.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            detail = redact(error.response.get("Error", {}).get("Message", code))
            if code == "NoSuchEntity":
                raise CheckFailed(f"{action}: not found ({detail})", where=where,
                                  hint="check keys.iam_user in the inventory") from None
            if code in {"InvalidClientTokenId", "SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId"}:
                raise ConnectionFailed(f"{action}: IAM refused the current storage key ({code})", where=where,
                                       hint="the storage key needs iam:CreateAccessKey, DeleteAccessKey and "
                                            "ListAccessKeys on its own user; provision and rotation revoke the "
                                            "inventory's key once they replace it: the key in use is in the secret "
                                            "store (`inv secrets.status`; the file store is .ops/secrets/ of the "
                                            "machine that ran them)") from None
            raise StepFailed(f"{action}: {code}: {detail}", where=where, hint="retry; then check IAM") from None
        except aws.BotoCoreError as error:
            raise ConnectionFailed(f"{action}: cannot reach IAM ({redact(error)})", where=where,
                                   hint="check keys.endpoint (or storage.endpoint) and the network") from None

    def list_keys(self) -> list[KeyInfo]:
        response = self._call("listing access keys", "list_access_keys", UserName=self.user)
        return [KeyInfo(k["AccessKeyId"], parse_time_or_none(k.get("CreateDate")), k.get("Status") == "Active")
                for k in response.get("AccessKeyMetadata", [])]

    def _never_used(self, key_id: str) -> bool:
        response = self._call("reading when a key was last used", "get_access_key_last_used", AccessKeyId=key_id)
        return not (response.get("AccessKeyLastUsed") or {}).get("LastUsedDate")

    def _removable(self) -> list[tuple[KeyInfo, str]]:
        """What must go to make room for a new key, and why it may: raises when only keys in use would have to."""
        keys = self.list_keys()
        if len(keys) < IAM_KEYS_PER_USER:
            return []
        current, retired = self.current_key_id(), self.retired()
        spare = [(k, self._why_spare(k, retired)) for k in keys if k.key_id != current]
        spare = [(k, why) for k, why in spare if why]
        if len(keys) - len(spare[:1]) >= IAM_KEYS_PER_USER:
            others = ", ".join(mask_identifier(k.key_id) for k in keys if k.key_id != current)
            raise CheckFailed(f"IAM user {self.user} already has {len(keys)} access keys and the other one "
                              f"({others}) is active and has been used", where=f"IAM user {self.user}",
                              hint="find who uses it; deactivate it (aws iam update-access-key --status Inactive) "
                                   "or delete it, then rotate again")
        return spare[:1]

    def _why_spare(self, key: KeyInfo, retired: set[str]) -> str | None:
        if key.key_id in retired:
            return "the inventory's key, replaced by the secret store's"
        if not key.active:
            return "inactive"
        return "never used" if self._never_used(key.key_id) else None

    def preflight(self) -> list[str]:
        return [f"delete the key {mask_identifier(k.key_id)} of {self.user} ({why}) to stay within IAM's "
                f"{IAM_KEYS_PER_USER} keys per user" for k, why in self._removable()]

    def create_key(self, label: str) -> NewKey:
        for spare, why in self._removable():
            self.log(f"deleting the key {mask_identifier(spare.key_id)} of {self.user} ({why}; IAM allows "
                     f"{IAM_KEYS_PER_USER} keys per user)")
            self.delete_key(spare.key_id)
        key = self._call("creating an access key", "create_access_key", UserName=self.user)["AccessKey"]
        return NewKey(key["AccessKeyId"], Secret(key["SecretAccessKey"]),
                      parse_time_or_none(key.get("CreateDate")) or datetime.now(UTC))

    def delete_key(self, key_id: str) -> None:
        try:
            self._call(f"deleting the key {mask_identifier(key_id)}", "delete_access_key", UserName=self.user,
                       AccessKeyId=key_id)
        except CheckFailed:  # NoSuchEntity: gone already
            if any(k.key_id == key_id for k in self.list_keys()):
                raise


# --- static -------------------------------------------------------------------------


class StaticProvider(KeyProvider):
    """Keys managed by hand: the operator creates and revokes them; opsbook verifies."""

    name = "static"
    manual = True

    def __init__(self, bucket: str, *, prompt: Callable[[str], str] | None = None):
        self.bucket = bucket
        self.prompt = prompt

    def instructions(self) -> list[str]:
        return [f"1. at your storage provider, create a new access key with read/write on bucket {self.bucket}",
                f"2. export {NEW_KEY_ID_VARIABLE}=<its id> and {NEW_SECRET_VARIABLE}=<its secret> "
                "(or run from a terminal to be asked for them)",
                "3. run the rotation (again): it probes the key, switches the apps, then asks you to "
                "revoke the old key and checks that it is refused"]

    def preflight(self) -> list[str]:
        return self.instructions()

    def create_key(self, label: str) -> NewKey:
        key_id = os.environ.get(NEW_KEY_ID_VARIABLE, "").strip()
        secret = os.environ.get(NEW_SECRET_VARIABLE, "").strip()
        if not (key_id and secret) and self.prompt is not None and sys.stdin.isatty():
            key_id = self.prompt("new access key id: ").strip()
            secret = getpass.getpass("new secret access key: ").strip()
        if not (key_id and secret):
            raise UsageError("the static key provider needs the new key you created by hand",
                             hint="; ".join(self.instructions()))
        return NewKey(key_id, Secret(secret), datetime.now(UTC))

    def delete_key(self, key_id: str) -> None:
        raise CheckFailed(f"the old key {mask_identifier(key_id)} still works: opsbook cannot revoke a key "
                          "managed by hand", where=f"bucket {self.bucket}",
                          hint=f"delete key {mask_identifier(key_id)} at your storage provider, then run the "
                               "rotation again (or `inv runs.resume`): it checks that the key is refused")

    def list_keys(self) -> list[KeyInfo]:
        return []
