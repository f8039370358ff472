"""R2 bucket lock rules through Cloudflare's API: objects under a prefix cannot be deleted or overwritten
until they are `maxAgeSeconds` old, whatever S3 key asks.

    GET /accounts/{account_id}/r2/buckets/{bucket}/lock   -> {"rules": [{id, enabled, prefix, condition}]}
    PUT /accounts/{account_id}/r2/buckets/{bucket}/lock   <- {"rules": [...]} (the whole set)

The backups' rule covers `<backups.prefix>backups/` with condition {"type": "Age", "maxAgeSeconds":
lock_days * 86400}; other rules of the bucket are kept as they are. The API token and account come from
the environment's `keys` section (keys.account_id, keys.api_token, keys.api_base), as for key rotation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ops.backup_manifest import BACKUPS_DIR
from ops.engine import Change
from ops.errors import CheckFailed, ConnectionFailed
from ops.key_providers import CLOUDFLARE_API, CloudflareProvider
from ops.lazy_dataclasses import dataclass
from ops.secrets import Secret, reveal

if TYPE_CHECKING:
    from ops.inventory import Environment

DAY_SECONDS = 86400


def rule_id(prefix: str) -> str:
    return "opsbook-backups" + (f"-{prefix.strip('/').replace('/', '-')}" if prefix.strip("/") else "")


def covers(rule: dict[str, Any], prefix: str, seconds: int) -> bool:
    """Whether `rule` holds every object under `prefix` for at least `seconds` from its creation."""
    condition = rule.get("condition") or {}
    long_enough = condition.get("type") == "Indefinite" or (
        condition.get("type") == "Age" and int(condition.get("maxAgeSeconds") or 0) >= seconds)
    return bool(rule.get("enabled")) and prefix.startswith(str(rule.get("prefix") or "")) and long_enough


@dataclass
class BucketLocks:
    """The lock rules of one R2 bucket."""

    api: CloudflareProvider
    bucket: str

    @classmethod
    def for_env(cls, env: Environment) -> BucketLocks:
        missing = [path for path in ("keys.account_id", "keys.api_token") if not env.has(path)]
        if missing:
            raise env.missing(missing[0])
        api = CloudflareProvider(str(reveal(env.value("keys.account_id"))), Secret(env.value("keys.api_token")),
                                 lambda: "", api_base=str(env.raw("keys.api_base", None) or CLOUDFLARE_API))
        return cls(api, env.storage_config("backups").bucket)

    @property
    def path(self) -> str:
        return f"/accounts/{self.api.account_id}/r2/buckets/{self.bucket}/lock"

    def _call(self, method: str, body: dict[str, Any] | None = None) -> Any:
        try:
            return self.api.request(method, self.path, body)
        except ConnectionFailed as error:
            if "refused keys.api_token" not in error.message:
                raise
            raise ConnectionFailed(error.message, where=error.where,
                                   hint=f"bucket locks need a token allowed Workers R2 Storage: Edit on account "
                                        f"{self.api.account_id}; check keys.api_token and keys.account_id") from None

    def rules(self) -> list[dict[str, Any]]:
        return list((self._call("GET") or {}).get("rules") or [])

    def change(self, prefix: str, days: int) -> Change | None:
        """None when a rule already holds the backups long enough; else the rule to add."""
        locked, seconds = prefix + BACKUPS_DIR, days * DAY_SECONDS
        rules = self.rules()
        if any(covers(rule, locked, seconds) for rule in rules):
            return None
        rule = {"id": rule_id(prefix), "enabled": True, "prefix": locked,
                "condition": {"type": "Age", "maxAgeSeconds": seconds}}
        return Change(f"set the R2 bucket lock rule {rule['id']} on {self.bucket}/{locked}: {days} day(s)",
                      [f"objects under {locked} cannot be deleted or overwritten until {days} day(s) old",
                       f"{len(rules)} other rule(s) of the bucket kept"], rule)

    def apply(self, change: Change) -> None:
        kept = [rule for rule in self.rules() if rule.get("id") != change.data["id"]]
        self._call("PUT", {"rules": [*kept, change.data]})

    def require(self, prefix: str, days: int) -> str:
        """What holds the backups; CheckFailed when no enabled rule holds them `days` days."""
        locked = prefix + BACKUPS_DIR
        holding = [rule for rule in self.rules() if covers(rule, locked, days * DAY_SECONDS)]
        if not holding:
            raise CheckFailed(f"no enabled R2 bucket lock rule holds {self.bucket}/{locked} for {days} day(s) "
                              "(backups.lock_days)", where=f"Cloudflare API {self.path}",
                              hint="the next backup sets it; a removed rule means someone with an API token "
                                   "changed the bucket: find out who")
        return (f"R2 bucket lock rule {holding[0].get('id')} holds {self.bucket}/{locked} for {days} day(s); "
                "it binds every S3 key")
