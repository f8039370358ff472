"""The steps of `inv secrets.move --to KIND`: the file store's entries copied into the store the inventory
names now, read back and compared, then the file removed.

The inventory names the target first (`secrets.store: aws-sm`), so that from the copy on every run
reads the manager; the file goes only once every entry reads back equal. Run again after an
interruption, it copies what is still missing and removes the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ops.engine import Change, RunContext, Step
from ops.errors import StepFailed, UsageError

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.secret_store import Store

SOURCE = "file"


def target_store(env: Environment, to: str) -> Store:
    """The store the entries go to: the one the inventory names, which must be `to`."""
    if to == SOURCE:
        raise UsageError("--to names the file store, which is where the entries come from",
                         hint="--to aws-sm or --to kubernetes")
    if env.store_kind != to:
        raise UsageError(f"envs.{env.name}.secrets.store is {env.store_kind}, not {to}: opsbook would go on "
                         "reading the file's entries from there after the move",
                         hint=f"set `secrets: {{store: {to}}}` for {env.name} in the inventory, then move")
    return env.secret_store()


def differing(source: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """The source's keys the target lacks or holds another value for (names only)."""
    return sorted(key for key, value in source.items() if value and target.get(key) != value)


class CopyEntries(Step):
    name = "copy-entries"

    def __init__(self, to: str):
        self.to = to
        self.title = f"copy the file store's entries into the {to} store"

    def check(self, ctx: RunContext) -> Change | None:
        source, target = ctx.env.secret_store(SOURCE), target_store(ctx.env, self.to)
        missing = differing(source.read(), target.read())
        if not missing:
            return None
        return Change(f"copy {len(missing)} entries from {source.label} into {target.label}",
                      [f"{key} (value never shown)" for key in missing])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        source, target = ctx.env.secret_store(SOURCE), target_store(ctx.env, self.to)
        entries = source.read()
        target.update({key: entries[key] for key in differing(entries, target.read())})
        return {"copied": sorted(entries), "to": target.location}

    def verify(self, ctx: RunContext) -> None:
        source, target = ctx.env.secret_store(SOURCE), target_store(ctx.env, self.to)
        wrong = differing(source.read(), target.read())
        if wrong:
            raise StepFailed(f"{target.label} does not read back {', '.join(wrong)} as written; the file stays",
                             hint="check the store's permissions (read and write), then run secrets.move again")


class RemoveFile(Step):
    name = "remove-file"

    def __init__(self, to: str):
        self.to = to
        self.title = "remove the file store once every entry reads back from the new store"

    def check(self, ctx: RunContext) -> Change | None:
        source = ctx.env.secret_store(SOURCE)
        if not source.exists():
            return None
        return Change(f"remove {source.location} (its entries now live in the {self.to} store)")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        source, target = ctx.env.secret_store(SOURCE), target_store(ctx.env, self.to)
        wrong = differing(source.read(), target.read())
        if wrong:  # read back once more right before the only copy goes
            raise StepFailed(f"{target.label} lacks {', '.join(wrong)}; {source.location} is kept",
                             hint="run secrets.move again")
        source.remove()
        return {"removed": source.location}
