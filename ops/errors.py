"""One error tree. Each class carries the process exit code it maps to.

The CLI layer (ops/cli.py) is the only place that turns these into exits;
everything else raises. A message says what failed, where, and what to do next.
"""

from __future__ import annotations


class OpsError(Exception):
    """A failure an operator can act on. Never carries a secret value.

    The engine and the notifier read the fields below; an instance may override them (a step's failure
    keeps the exit code of its cause, a failed delivery says how often it was tried).
    """

    exit_code: int = 1
    journaled: bool = False  # the engine already wrote the run's failed end to the journal
    attempts: int = 1  # deliveries tried before giving up (notification channels)

    def __init__(self, message: str, *, hint: str | None = None, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.where = where

    def __str__(self) -> str:
        lines = [f"{self.where}: {self.message}" if self.where else self.message, *self.details()]
        if self.hint:
            lines.append(f"  what to do: {self.hint}")
        return "\n".join(lines)

    def details(self) -> list[str]:
        return []


class StepFailed(OpsError):
    """A step's apply or verify did not reach its post-condition."""

    exit_code = 1


class ConnectionFailed(OpsError):
    """A server (database, storage, host) could not be reached or refused us."""

    exit_code = 1


class UsageError(OpsError):
    """Wrong arguments on the command line."""

    exit_code = 2


class InventoryError(OpsError):
    """The inventory cannot be loaded or is invalid. `problems` lists them all."""

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.problems = problems or []

    def details(self) -> list[str]:
        return [f"  - {problem}" for problem in self.problems]


class ConfirmationRequired(OpsError):
    """A protected environment was about to change without the operator's consent."""

    exit_code = 2


class CheckFailed(OpsError):
    """A check or precondition failed: corruption, pending migrations, failed drill."""

    exit_code = 3


class LockHeld(OpsError):
    """Another run holds the lock on this environment and resource."""

    exit_code = 75


class Interrupted(OpsError):
    """The operator (or a signal) interrupted the run."""

    exit_code = 130


EXIT_OK = 0
