"""`inv pitr.setup`'s first step for an engine that encrypts its archive (pgBackRest): a passphrase generated
once into the environment's secret store (`PITR_CIPHER_PASS`), before the archive exists. An archive made
before, without one, stays as it is: an engine cannot encrypt a repository it already wrote in the clear
(a new stanza, elsewhere, would be needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ops.engine import Change, RunContext, Step
from ops.errors import StepFailed
from ops.pitr_engine import PASSPHRASE_KEY

if TYPE_CHECKING:
    from ops.pitr_setup import Setup

PASSPHRASE_LENGTH = 64


class PassphraseStep(Step):
    name = "passphrase"

    def __init__(self, setup: Setup):
        self.setup = setup
        self.title = f"generate the passphrase that encrypts {setup.engine.location} ({PASSPHRASE_KEY})"

    def check(self, ctx: RunContext) -> Change | None:
        engine = self.setup.engine
        if not engine.encrypts or engine.passphrase is not None:
            return None
        if engine.prepared(ctx.storage("backups").list(engine.root)):
            return None  # written in the clear already: it stays so
        store = ctx.env.secret_store()
        return Change(f"generate {PASSPHRASE_KEY} into {store.label}",
                      [f"{engine.name} encrypts its WAL archive and base backups with it; "
                       "break-glass recovery needs it"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        store = ctx.env.secret_store()
        self.setup.engine.passphrase = store.get_or_generate(PASSPHRASE_KEY, PASSPHRASE_LENGTH)
        return {"key": PASSPHRASE_KEY, "store": store.label}

    def verify(self, ctx: RunContext) -> None:
        if ctx.env.secret_store().get(PASSPHRASE_KEY) is None:
            raise StepFailed(f"{PASSPHRASE_KEY} is not in {ctx.env.secret_store().label}")
