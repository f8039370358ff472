"""Secret references in the inventory: `${env:…}`, `${file:…}`, `${cmd:…}`, `${aws-sm:…}`, resolved only
when used (to Secrets), named in every error, masked for display."""

from __future__ import annotations

import os
import re
from dataclasses import field
from pathlib import Path
from typing import Any

from ops.errors import InventoryError
from ops.inventory_checks import url_problem, url_schemes
from ops.lazy_dataclasses import dataclass
from ops.patterns import Pattern
from ops.secret_managers import (
    DEFAULT_COMMAND_TIMEOUT_SECONDS,
    AwsSettings,
    ManagerError,
    command_argv,
    from_aws,
    from_command,
    parse_aws_reference,
)
from ops.secrets import MASK, Secret

REFERENCE_PATTERN = Pattern(r"\$\{(?P<kind>env|file|cmd|aws-sm):(?P<body>[^}]*)\}")
REFERENCE_FORMS = ("${env:NAME}, ${env:NAME:-default}, ${file:PATH}, ${cmd:COMMAND}, ${aws-sm:NAME} "
                   "or ${aws-sm:NAME#key}")


@dataclass(frozen=True)
class Reference:
    """A string holding ${env:…}/${file:…}/${cmd:…}/${aws-sm:…} references; resolved only when used.

    `managers` is the `secret_managers` section of the reference's scope (its environment, or
    `defaults`), its own references unresolved until a manager is asked."""

    template: str
    path: str
    location: str
    managers: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def resolve(self, environ: dict[str, str] | None = None) -> Secret:
        environ = os.environ if environ is None else environ
        value = Secret(REFERENCE_PATTERN.sub(lambda match: self._substitute(match, environ), self.template))
        schemes = url_schemes(self.path)
        problem = url_problem(value.reveal(), schemes) if schemes else None
        if problem:  # the value is registered for redaction by now; the message names only the references
            references = " ".join(match[0] for match in REFERENCE_PATTERN.finditer(self.template))
            raise InventoryError(f"{self.path} (from {references}): {problem}", where=self.location,
                                 hint=f"set {references} to a full URL, or change {self.path}")
        return value

    def _substitute(self, match: re.Match[str], environ: dict[str, str]) -> str:
        body = match["body"]
        if match["kind"] in {"cmd", "aws-sm"}:
            return self._from_manager(match["kind"], body)
        if match["kind"] == "file":
            file = Path(os.path.expanduser(body))
            try:
                return file.read_text().strip()
            except OSError as error:
                raise self._error(f"${{file:{body}}} cannot be read ({error.strerror})",
                                  f"create {body} or change {self.path}") from None
        name, has_default, default = body.partition(":-")
        value = environ.get(name)
        if value:
            return value
        if has_default:
            return default
        raise self._error(f"${{env:{name}}} is not set", f"export {name}=… before running, or change {self.path}")

    def _from_manager(self, kind: str, body: str) -> str:
        try:
            if kind == "cmd":
                timeout = float(plain(resolve(self.managers.get("command_timeout_seconds")))
                                or DEFAULT_COMMAND_TIMEOUT_SECONDS)
                return from_command(body, timeout).reveal()
            return from_aws(body, aws_settings(self.managers)).reveal()
        except ManagerError as error:
            raise self._error(f"${{{kind}:{body}}}: {error.message}", error.hint) from None

    def _error(self, message: str, hint: str) -> InventoryError:
        return InventoryError(f"{self.path}: {message}", where=self.location, hint=hint)

    def __str__(self) -> str:
        return self.template


def aws_settings(managers: dict[str, Any]) -> AwsSettings:
    """`secret_managers.aws` (references resolved now); unset fields fall to boto3's own chain."""
    settings = resolve(managers.get("aws") or {})
    secret = settings.get("secret_access_key")
    return AwsSettings(region=plain(settings.get("region")), endpoint=plain(settings.get("endpoint")),
                       access_key_id=plain(settings.get("access_key_id")),
                       secret_access_key=as_secret(secret) if secret else None)


def manager_reference_problems(text: str) -> list[str]:
    problems = []
    for match in REFERENCE_PATTERN.finditer(text):
        check = command_argv if match["kind"] == "cmd" else parse_aws_reference if match["kind"] == "aws-sm" else None
        try:
            if check:
                check(match["body"])
        except ManagerError as error:
            problems.append(f"{match[0]} {error.message}; {error.hint}")
    return problems


def resolve(node: Any) -> Any:
    if isinstance(node, Reference):
        return node.resolve()
    if isinstance(node, dict):
        return {k: resolve(v) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v) for v in node]
    return node


def plain(node: Any) -> Any:
    """Resolved settings that are not credentials (bucket, endpoint, address) as plain values."""
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return node.reveal() if isinstance(node, Secret) else node


def as_secret(value: Any) -> Secret:
    return value if isinstance(value, Secret) else Secret(str(value))


def mask_tree(node: Any) -> Any:
    """For display: Secrets and references masked, references named (`*** (${env:X})`)."""
    if isinstance(node, dict):
        return {k: mask_tree(v) for k, v in node.items()}
    if isinstance(node, list):
        return [mask_tree(v) for v in node]
    if isinstance(node, Reference):
        return f"{MASK} (from {node.template})"
    if isinstance(node, Secret):
        return MASK
    return node
