"""Reading one secret from a manager: `${cmd:COMMAND}` (a manager's CLI) and `${aws-sm:NAME[#key]}`.

Each answer is a `Secret` (registered for redaction before anything else sees it) and is kept
for the rest of the process: a task resolves the same reference from several places, and a
manager CLI may prompt or be slow. Errors name the reference and never carry the value, nor a
command's stderr (a CLI may echo what it read).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import threading
from datetime import UTC, datetime
from typing import Any

from ops import aws
from ops.lazy_dataclasses import dataclass
from ops.processes import CannotStart, child_process
from ops.secrets import Secret

DEFAULT_COMMAND_TIMEOUT_SECONDS = 10.0
AWS_SETTINGS = {"retries": {"max_attempts": 3}, "connect_timeout": 10, "read_timeout": 30}
_cache: dict[tuple[str, ...], Secret] = {}
_lock = threading.Lock()


class ManagerError(Exception):
    """A reference could not be read: `message` says why, `hint` what to do (neither holds a value)."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class AwsSettings:
    """Where Secrets Manager is: unset fields come from boto3's own chain (AWS_* variables, ~/.aws)."""

    region: str | None = None
    endpoint: str | None = None
    access_key_id: str | None = None
    secret_access_key: Secret | None = None

    def client(self) -> Any:
        return aws.client("secretsmanager", endpoint=self.endpoint, region=self.region,  # type: ignore[arg-type]
                          access_key_id=self.access_key_id,
                          secret_access_key=self.secret_access_key.reveal() if self.secret_access_key else None,
                          settings=AWS_SETTINGS)

    def key(self) -> tuple[str, ...]:
        secret = self.secret_access_key.reveal() if self.secret_access_key else ""
        return (self.region or "", self.endpoint or "", self.access_key_id or "", secret)


def command_argv(command: str) -> list[str]:
    """The command split as a POSIX shell would split it, without running a shell."""
    try:
        argv = shlex.split(command)
    except ValueError as error:
        raise ManagerError(f"cannot be split into words ({error})", "quote the command's arguments evenly") from None
    if not argv:
        raise ManagerError("names no command", "write the command after `cmd:`")
    return argv


def from_command(command: str, timeout: float = DEFAULT_COMMAND_TIMEOUT_SECONDS) -> Secret:
    """The command's standard output, trailing newline removed; run once per process."""
    key = ("cmd", command)
    with _lock:
        if key in _cache:
            return _cache[key]
    value = _run(command_argv(command), timeout)
    with _lock:
        return _cache.setdefault(key, value)


def _run(argv: list[str], timeout: float) -> Secret:
    try:
        with child_process(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                           start_new_session=True) as process:  # its own group: a timeout stops its children too
            try:
                stdout, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                raise ManagerError(f"command {argv[0]!r} did not finish within {timeout:g}s (stopped)",
                                   "check that the manager is reachable and needs no prompt, or raise "
                                   "secret_managers.command_timeout_seconds") from None
    except CannotStart as error:
        missing = isinstance(error.error, FileNotFoundError)
        raise ManagerError(f"command {argv[0]!r} {'not found' if missing else f'cannot start ({error})'}",
                           f"install {argv[0]} or put it on PATH" if missing else f"check {argv[0]}") from None
    output = Secret(stdout.decode(errors="replace").rstrip("\r\n"))  # registered before any message
    if process.returncode != 0:
        # stderr is never read: a manager CLI may echo what it was asked for
        raise ManagerError(f"command {argv[0]!r} exited {process.returncode} (its output is not shown)",
                           "run the command yourself to see why (logged in? the item's name?)")
    if not output:
        raise ManagerError(f"command {argv[0]!r} printed nothing", "check the item the command names")
    return output


def parse_aws_reference(body: str) -> tuple[str, str | None]:
    """`NAME` or `NAME#json_key`."""
    name, has_key, json_key = body.partition("#")
    if not name.strip() or (has_key and not json_key.strip()):
        raise ManagerError("needs a secret name (and a key after #)", "write ${aws-sm:NAME} or ${aws-sm:NAME#key}")
    return name.strip(), json_key.strip() if has_key else None


def from_aws(body: str, settings: AwsSettings) -> Secret:
    """The secret's current value, or one key of its JSON object."""
    name, json_key = parse_aws_reference(body)
    key = ("aws-sm", body, *settings.key())
    with _lock:
        if key in _cache:
            return _cache[key]
    text = aws_secret_string(settings, name)
    value = Secret(text) if json_key is None else _json_key(text, name, json_key)
    with _lock:
        return _cache.setdefault(key, value)


def aws_secret_string(settings: AwsSettings, name: str, stage: str = "AWSCURRENT") -> str:
    try:
        answer = settings.client().get_secret_value(SecretId=name, VersionStage=stage)
    except aws.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code == "ResourceNotFoundException":
            raise ManagerError(f"AWS Secrets Manager has no secret {name!r}"
                               f"{f' in {settings.region}' if settings.region else ''}",
                               "create it, or check the name and secret_managers.aws.region") from None
        raise ManagerError(f"AWS Secrets Manager refused to read {name!r} ({code or error})",
                           "check the credentials' secretsmanager:GetSecretValue permission") from None
    except aws.BotoCoreError as error:
        raise ManagerError(f"AWS Secrets Manager could not be reached ({type(error).__name__})",
                           "check secret_managers.aws (region, endpoint) and the network") from None
    text = answer.get("SecretString")
    if text is None:
        raise ManagerError(f"secret {name!r} is binary", "store it as a string (SecretString)")
    Secret(text)
    return text


def _json_key(text: str, name: str, json_key: str) -> Secret:
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise ManagerError(f"secret {name!r} is not a JSON object, so it has no key {json_key!r}",
                           f"write ${{aws-sm:{name}}} for the whole value")
    for value in document.values():
        Secret(str(value))
    if json_key not in document:
        raise ManagerError(f"secret {name!r} has no key {json_key!r}",
                           f"add {json_key} to the secret, or use one of its keys: {', '.join(sorted(document))}")
    return Secret(str(document[json_key]))


def aws_last_changed(settings: AwsSettings, name: str) -> datetime | None:
    """When the secret last changed, or None when it cannot be told (missing, refused, unreachable)."""
    try:
        answer = settings.client().describe_secret(SecretId=name)
    except (aws.ClientError, aws.BotoCoreError):
        return None
    changed = answer.get("LastChangedDate") or answer.get("CreatedDate")
    return changed.astimezone(UTC) if isinstance(changed, datetime) else None
