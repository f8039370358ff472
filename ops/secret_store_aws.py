"""The `aws-sm` secret store: one AWS Secrets Manager secret per environment holding a JSON map.

Each change puts a new version (AWSCURRENT); Secrets Manager keeps the one before as
AWSPREVIOUS, so a change that turns out wrong can be read back (`previous()`) and restored.
Every machine with the same inventory and access to the secret sees the same state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ops import aws
from ops.errors import ConnectionFailed, InventoryError
from ops.secret_managers import AwsSettings
from ops.secret_store import Store
from ops.secrets import Secret


class AwsSecretStore(Store):
    kind = "aws-sm"

    def __init__(self, settings: AwsSettings, name: str):
        self.settings = settings
        self.name = name

    @property
    def label(self) -> str:
        return f"AWS Secrets Manager secret {self.name}"

    def _call(self, operation: str, **arguments: Any) -> dict[str, Any] | None:
        """The answer, or None when the secret does not exist."""
        try:
            return getattr(self.settings.client(), operation)(**arguments)
        except aws.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code == "ResourceNotFoundException":
                return None
            raise ConnectionFailed(f"AWS Secrets Manager refused {operation} on {self.name} ({code or 'error'})",
                                   hint="check the credentials' secretsmanager permissions on this secret "
                                   "(Get/Put/Create/DescribeSecret)") from None
        except aws.BotoCoreError as error:
            raise ConnectionFailed(f"AWS Secrets Manager could not be reached ({type(error).__name__})",
                                   hint="check secret_managers.aws (region, endpoint) and the network") from None

    def exists(self) -> bool:
        return self._call("describe_secret", SecretId=self.name) is not None

    def read(self, stage: str = "AWSCURRENT") -> dict[str, Secret]:
        answer = self._call("get_secret_value", SecretId=self.name, VersionStage=stage)
        if answer is None:
            return {}
        return self._parse(answer.get("SecretString") or "{}")

    def previous(self) -> dict[str, Secret]:
        """The map before the last change (AWSPREVIOUS), empty when there was none."""
        return self.read("AWSPREVIOUS")

    def _parse(self, text: str) -> dict[str, Secret]:
        Secret(text)
        try:
            document = json.loads(text)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise InventoryError(f"{self.label} is not a JSON object of KEY: value",
                                 hint="point secrets.aws_secret at a secret opsbook keeps, or empty it ({})")
        return {str(k): Secret(str(v)) for k, v in document.items()}

    def update(self, changes: Mapping[str, Secret | None]) -> None:
        current = self.read()
        values = {k: v for k, v in {**current, **changes}.items() if v is not None}
        if values == current and self.exists():
            return  # no new version for nothing
        text = json.dumps({k: v.reveal() for k, v in sorted(values.items())})
        Secret(text)
        if self._call("put_secret_value", SecretId=self.name, SecretString=text) is None:
            self._call("create_secret", Name=self.name, SecretString=text,
                       Description="opsbook: generated and rotated secrets of one environment")

    def last_changed(self) -> datetime | None:
        answer = self._call("describe_secret", SecretId=self.name)
        if not answer:
            return None
        changed = answer.get("LastChangedDate") or answer.get("CreatedDate")
        return changed.astimezone(UTC) if isinstance(changed, datetime) else None

    def remove(self) -> None:
        self._call("delete_secret", SecretId=self.name, RecoveryWindowInDays=7)
