"""The Runner on in-memory steps: plan rendering, confirmation, undo, journal transitions."""

import io
import json

import pytest

from ops import inventory
from ops.engine import Change, Runbook, RunContext, Runner, Step
from ops.errors import CheckFailed, ConfirmationRequired, Interrupted, StepFailed
from ops.output import Output
from ops.step_apply import failure_text


class SetKey(Step):
    def __init__(self, store, key, value, fail=False):
        self.store, self.key, self.value, self.fail = store, key, value, fail
        self.name = f"set-{key}"
        self.title = f"set {key}"

    def check(self, ctx):
        if self.store.get(self.key) == self.value:
            return None
        return Change(f"set {self.key} to {self.value}", details=[f"was {self.store.get(self.key)}"])

    def apply(self, ctx, change):
        if self.fail:
            raise StepFailed(f"cannot set {self.key}", hint="fix the thing")
        self.store[self.key] = self.value
        return {"key": self.key}

    def undo(self, ctx, change):
        self.store.pop(self.key, None)


@pytest.fixture
def environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OPS_HOME", str(tmp_path / "state"))
    (tmp_path / "inventory.yaml").write_text("project: t\nenvs:\n  dev: {}\n  prod: {protected: true}\n")
    loaded = inventory.load(tmp_path / "inventory.yaml")
    return lambda name="dev": loaded.environment(name)


def run(env, steps, **options):
    stream = io.StringIO()
    ctx = RunContext(env, output=Output(stream=stream))
    result = Runner(Runbook("demo", "Demo", steps), ctx, **options).run()
    return result, stream.getvalue(), ctx


def journal(ctx):
    return [json.loads(line) for line in ctx.journal.path.read_text().splitlines()]


def test_dry_run_renders_the_plan_and_changes_nothing(environment):
    store = {"b": 2}
    stream = io.StringIO()
    ctx = RunContext(environment(), output=Output(stream=stream))
    result = Runner(Runbook("demo", "Demo", [SetKey(store, "a", 1), SetKey(store, "b", 2)]), ctx).run(dry_run=True)
    assert store == {"b": 2}
    assert result.status == "planned"
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"dry run of demo on dev (run {ctx.run_id}):"
    assert lines[1:4] == ["  1. set a: would set a to 1", "       was None", "  2. set b: nothing to do"]
    assert [e["state"] for e in journal(ctx) if e["event"] == "step"] == ["planned", "planned"]


def test_apply_then_second_plan_is_empty(environment):
    store = {}
    result, _, ctx = run(environment(), [SetKey(store, "a", 1)])
    assert result.status == "succeeded" and store == {"a": 1}
    assert [e["state"] for e in journal(ctx) if e["event"] == "step"] == ["planned", "started", "applied", "verified"]
    again, output, _ = run(environment(), [SetKey(store, "a", 1)])
    assert again.status == "nothing to do" and "nothing to do" in output


def test_failure_undoes_applied_steps_in_reverse_and_keeps_the_hint(environment):
    store = {}
    with pytest.raises(StepFailed) as raised:
        run(environment(), [SetKey(store, "a", 1), SetKey(store, "b", 2), SetKey(store, "c", 3, fail=True)])
    assert store == {}
    message = str(raised.value)
    assert "step 3 (set c) failed: cannot set c" in message
    assert "undone: set b, set a" in message
    assert message.count("what to do: fix the thing") == 1


def test_protected_environment_without_a_terminal_refuses(environment):
    store = {}
    with pytest.raises(ConfirmationRequired, match="--confirm prod"):
        run(environment("prod"), [SetKey(store, "a", 1)])
    assert store == {}
    result, _, _ = run(environment("prod"), [SetKey(store, "a", 1)], confirm="prod")
    assert result.status == "succeeded"


def test_every_change_to_a_protected_environment_asks_unless_the_runbook_is_exempt(environment):
    store = {}
    runbook = Runbook("demo", "Demo", [SetKey(store, "a", 1)])
    with pytest.raises(ConfirmationRequired, match="no terminal"):
        Runner(runbook, RunContext(environment("prod"), output=Output(stream=io.StringIO()))).run()
    exempt = Runbook("nightly", "Nightly", [SetKey(store, "a", 1)], confirm_exempt="adds a copy only")
    assert Runner(exempt, RunContext(environment("prod"), output=Output(stream=io.StringIO()))).run().status \
        == "succeeded"
    assert store == {"a": 1}


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_confirm_naming_another_environment_is_refused_before_the_journal(environment, dry_run):
    for name, exempt in (("prod", None), ("prod", "adds a copy only"), ("dev", None)):
        ctx = RunContext(environment(name), output=Output(stream=io.StringIO()))
        runbook = Runbook("demo", "Demo", [SetKey({}, "a", 1)], confirm_exempt=exempt)
        with pytest.raises(ConfirmationRequired, match="does not match"):
            Runner(runbook, ctx, confirm="staging").run(dry_run=dry_run)
        assert not ctx.journal.path.exists()


def test_check_that_cannot_run_makes_the_dry_run_exit_3(environment):
    class Broken(SetKey):
        def check(self, ctx):
            raise StepFailed("server unreachable")

    with pytest.raises(CheckFailed, match="the plan cannot be made: step 1"):
        Runner(Runbook("demo", "Demo", [Broken({}, "a", 1)]), RunContext(environment(), output=Output(
            stream=io.StringIO()))).run(dry_run=True)


def test_check_that_cannot_run_makes_the_real_run_exit_3_too(environment):
    class Broken(SetKey):
        def check(self, ctx):
            raise StepFailed("server unreachable")

    store = {}
    with pytest.raises(CheckFailed, match="the plan cannot be made: step 2") as raised:
        run(environment(), [SetKey(store, "a", 1), Broken(store, "b", 2)])
    assert raised.value.exit_code == 3 and store == {}


def test_an_undo_that_keeps_its_change_is_reported_as_kept(environment):
    class Keeps(SetKey):
        def undo(self, ctx, change):
            return "it is in use now"

    store = {}
    with pytest.raises(StepFailed) as raised:
        run(environment(), [SetKey(store, "a", 1), Keeps(store, "b", 2), SetKey(store, "c", 3, fail=True)])
    message = str(raised.value)
    assert store == {"b": 2}
    assert "undone: set a" in message and "kept: set b (it is in use now)" in message
    assert "set b" not in message.split("undone:")[1].split("kept:")[0]


def test_verify_failure_is_a_step_failure(environment):
    class Liar(SetKey):
        def apply(self, ctx, change):
            return None  # claims success, changes nothing

    with pytest.raises(StepFailed, match="still not done after applying"):
        run(environment(), [Liar({}, "a", 1)])


class NoUndo(SetKey):
    undo = None  # a step that cannot be compensated


def test_a_wrapped_step_is_undone_only_when_the_step_it_wraps_can_be(environment):
    from ops.engine import WrappedStep

    store = {}
    steps = [WrappedStep(SetKey(store, "a", 1)), WrappedStep(NoUndo(store, "b", 2), title="set b, wrapped"),
             SetKey(store, "c", 3, fail=True)]
    with pytest.raises(StepFailed) as raised:
        run(environment(), steps)
    assert store == {"b": 2}  # a undone through its wrapper; b has nothing to undo it with
    assert "undone: set a" in str(raised.value) and "set b, wrapped" not in str(raised.value).split("undone:")[1]
    assert steps[1].checklist_line() == "set b, wrapped" and steps[0].checklist_line() == "set a"


class Nested(Step):
    """A step whose apply runs steps of its own through the context, as the drill's and decommission's do."""

    name = "outer"
    title = "run the inner steps"

    def __init__(self, inner, catch=False):
        self.inner, self.catch, self.outcome = inner, catch, None

    def check(self, ctx):
        return Change("run the inner steps")

    def apply(self, ctx, change):
        try:
            self.outcome = ctx.run_steps(self.inner)
        except StepFailed as error:
            if not self.catch:
                raise
            self.outcome = error
        return {"ran": len(self.inner)}

    def verify(self, ctx):
        pass


def step_entries(ctx):
    return [(e["index"], e["step"], e["state"]) for e in journal(ctx) if e["event"] == "step"]


def test_inner_steps_are_applied_and_journaled_as_steps_of_their_parent(environment):
    store = {"b": 2}
    outer = Nested([SetKey(store, "a", 1), SetKey(store, "b", 2)])
    result, output, ctx = run(environment(), [SetKey(store, "z", 0), outer])
    assert result.status == "succeeded" and store == {"a": 1, "b": 2, "z": 0}
    assert [(p.index, p.change is not None) for p in outer.outcome] == [("2.1", True), ("2.2", False)]
    assert step_entries(ctx)[-7:] == [
        (2, "outer", "started"), ("2.1", "outer/set-a", "started"), ("2.1", "outer/set-a", "applied"),
        ("2.1", "outer/set-a", "verified"), ("2.2", "outer/set-b", "unchanged"), (2, "outer", "applied"),
        (2, "outer", "verified")]
    assert ctx.state["set-a"] == {"key": "a"}  # inner steps find each other's outputs by their own names
    assert "     2.1. set a: set a to 1 …" in output.splitlines()


def test_an_inner_failure_undoes_the_inner_steps_then_fails_the_parent(environment):
    store = {}
    outer = Nested([SetKey(store, "a", 1), SetKey(store, "b", 2, fail=True)])
    with pytest.raises(StepFailed) as raised:
        run(environment(), [SetKey(store, "z", 0), outer])
    assert store == {}  # a undone by the inner run, z by the runner
    message = str(raised.value)
    assert "step 2 (run the inner steps) failed: cannot set b" in message and "undone: set z" in message
    assert message.count("what to do: fix the thing") == 1
    entries = [e for e in last_journal(environment()) if e["event"] == "step"]
    assert [(e["index"], e["step"], e["state"]) for e in entries[-5:]] == [
        ("2.2", "outer/set-b", "started"), ("2.2", "outer/set-b", "failed"), ("2.1", "outer/set-a", "undone"),
        (2, "outer", "failed"), (1, "set-z", "undone")]
    assert (entries[-4]["reason"], entries[-4]["hint"]) == ("cannot set b", "fix the thing")
    assert entries[-2]["reason"] == "cannot set b"


def test_a_parent_that_handles_an_inner_failure_goes_on(environment):
    store = {}
    outer = Nested([SetKey(store, "a", 1), SetKey(store, "b", 2, fail=True)], catch=True)
    result, _, ctx = run(environment(), [outer, SetKey(store, "c", 3)])
    assert result.status == "succeeded" and store == {"c": 3}
    assert isinstance(outer.outcome, StepFailed)
    assert step_entries(ctx)[-8:] == [
        ("1.2", "outer/set-b", "started"), ("1.2", "outer/set-b", "failed"), ("1.1", "outer/set-a", "undone"),
        (1, "outer", "applied"), (1, "outer", "verified"), (2, "set-c", "started"), (2, "set-c", "applied"),
        (2, "set-c", "verified")]


def test_an_interrupt_in_an_inner_step_stops_the_run_at_its_parent(environment):
    class Interrupts(SetKey):
        def apply(self, ctx, change):
            raise KeyboardInterrupt

    store = {}
    with pytest.raises(Interrupted) as raised:
        run(environment(), [Nested([SetKey(store, "a", 1), Interrupts(store, "b", 2)]), SetKey(store, "c", 3)])
    assert raised.value.exit_code == 130 and "runs.resume" in raised.value.hint
    assert store == {}  # the inner steps are undone: a resume applies their parent again
    entries = last_journal(environment())
    assert [(e["index"], e["step"], e["state"], e.get("reason")) for e in entries[-5:-1]] == [
        ("1.2", "outer/set-b", "started", None), ("1.2", "outer/set-b", "failed", "interrupted"),
        ("1.1", "outer/set-a", "undone", None), (1, "outer", "failed", "interrupted")]
    assert (entries[-1]["status"], entries[-1]["exit_code"], entries[-1]["stopped_at"]) == ("interrupted", 130, "outer")


def test_one_failure_text_with_or_without_what_to_do():
    error = StepFailed("the dump stopped", where="db.example", hint="look at the server log")
    assert failure_text(error) == "db.example: the dump stopped"
    assert failure_text(error, with_hint=True) == "db.example: the dump stopped (what to do: look at the server log)"
    assert failure_text(ValueError("bad value")) == "ValueError: bad value"


def last_journal(env):
    runs = sorted((env.inventory.state_dir / "runs").glob("*.jsonl"))
    return [json.loads(line) for line in runs[-1].read_text().splitlines()]


def test_the_steps_of_one_parent_are_numbered_on_across_its_calls(environment):
    class Twice(Nested):
        def apply(self, ctx, change):
            self.outcome = ctx.run_steps(self.inner[:1]) + ctx.run_steps(self.inner[1:])

    store = {}
    outer = Twice([SetKey(store, "a", 1), SetKey(store, "b", 2)])
    run(environment(), [outer])
    assert [p.index for p in outer.outcome] == ["1.1", "1.2"] and store == {"a": 1, "b": 2}
