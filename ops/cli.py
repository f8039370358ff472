"""Task plumbing shared by every Invoke task: errors → exit codes (the one place), environments, runs."""

from __future__ import annotations

import atexit
import copy
import difflib
import functools
import gc
import inspect
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from invoke import Task
from invoke.exceptions import Exit, ParseError
from invoke.parser import Parser, ParserContext, ParseResult
from invoke.parser.parser import ParseMachine
from invoke.program import Program

from ops import inventory, multi_env, pings, processes, remote_commands
from ops.archive import decommission_marker
from ops.engine import RunContext, Runner, check_confirm_name
from ops.errors import Interrupted, OpsError, UsageError
from ops.output import Output, results_printed
from ops.patterns import Pattern
from ops.quick_exit import ending_at_once
from ops.sandbox import Sandbox
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.engine import Runbook, RunContext, RunResult
    from ops.inventory import Environment, Inventory
    from ops.output import Output

F = TypeVar("F", bound=Callable[..., Any])

COMMON_HELP = {
    "env": "environment name from the inventory (default: the inventory's default_env)",
    "dry_run": "run the read-only probes and print the plan; change nothing",
    "confirm": "type the environment's name to confirm changes to a protected environment",
    "json": "print one JSON object with the result on stdout",
}
MULTI_ENV_HELP = ("environment name from the inventory, several (prod,staging), or all (but decommissioned ones "
                  "and the sandbox); default: the inventory's default_env")


# The shared flags' short letters, the same in every task; a task's own flags never take them.
SHORT_FLAGS = {"env": "e", "json": "j", "dry_run": "d", "confirm": "c"}


def helps(*common: str, **extra: str) -> dict[str, str]:
    """Help for a task's flags: the shared ones named in `common`, plus its own."""
    return {**{name: COMMON_HELP[name] for name in common}, **extra}


# --- command-line errors ---------------------------------------------------------------------------
# invoke parses a task's flags after it loads the collection, and answers a parse error with exit 1, or, for a
# flag value it cannot convert (`--jobs x`), with a traceback. Each becomes one line and exit 2: the `opsbook`
# console tool (runbooks/program.py) through its Program's own methods, `inv` and `python -m invoke` through
# install_usage_errors(), called from tasks.py. The parser's own checks are shared by both.

_NEEDS_VALUE = Pattern(r"^Flag <Argument: (\S+).*> needed value and was not given one!$")
_TAKES_NO_VALUE = Pattern(r"^Flag <Argument: (\S+).*> doesn't take any value!$")
_UNKNOWN = Pattern(r"^No idea what '(.*)' is!$")
_POSITIONAL = Pattern(r"^'[^']*' did not receive required positional arguments: (.*)$")


def install_usage_errors() -> None:
    """For invoke's own Program (`inv`): its parse steps exit 2 with one line."""
    install_parser_checks()
    Program.execute = ending_at_once(Program.execute)  # the run ends without Python's teardown (ops/quick_exit.py)
    if getattr(Program.parse_tasks, "opsbook", False):
        return  # tasks.py is executed again by each in-process Program.run
    Program.parse_tasks = _exit_2_on_parse_error(_listing_parses_no_task(Program.parse_tasks))
    Program.parse_cleanup = _exit_2_on_parse_error(Program.parse_cleanup)


def install_parser_checks() -> None:
    """invoke's parser builds its state machine inside Parser.parse_argv: its checks are extended in place."""
    if getattr(ParseMachine.see_value, "opsbook", False):
        return
    # Once per process (`inv` and `opsbook` alike): at exit the heap, botocore's service models and every imported
    # module, is put out of the collector's reach; the interpreter's last collections would traverse it all, 0.3 to
    # 0.7 s of every command's wall time. Objects outside reference cycles are still freed and finalized.
    atexit.register(gc.freeze)
    ParseMachine.see_value = _refusing_bad_values(ParseMachine.see_value)
    ParseMachine.complete_flag = _refusing_empty_lists(ParseMachine.complete_flag)
    ParseMachine.see_positional_arg = _refusing_flags_as_positionals(ParseMachine.see_positional_arg)
    ParseMachine.see_value.opsbook = True  # type: ignore[attr-defined]


def _refusing_bad_values(see_value: Callable[..., None]) -> Callable[..., None]:
    """A value its flag's type refuses (`--jobs x`) becomes the parser's own error, naming flag and value."""
    @functools.wraps(see_value)
    def wrapper(machine: Any, value: Any) -> None:
        try:
            see_value(machine, value)
        except (TypeError, ValueError):
            kind = "a whole number" if machine.flag.kind is int else f"a {machine.flag.kind.__name__}"
            machine.error(f"--{machine.flag.names[0]} takes {kind}, not {value!r}")

    return wrapper


def _refusing_empty_lists(complete_flag: Callable[..., None]) -> Callable[..., None]:
    """invoke lets a repeatable flag go without a value (`inv backup --tag`); every other flag needs one."""
    @functools.wraps(complete_flag)
    def wrapper(machine: Any) -> None:
        flag = machine.flag
        if flag is not None and flag.kind is list and not machine.flag_got_value:
            machine.error(f"Flag {flag!r} needed value and was not given one!")
        complete_flag(machine)

    return wrapper


def _refusing_flags_as_positionals(see_positional_arg: Callable[..., None]) -> Callable[..., None]:
    """invoke takes an unknown flag for a missing positional argument (`inv runs.show --bogus`)."""
    @functools.wraps(see_positional_arg)
    def wrapper(machine: Any, value: Any) -> None:
        if str(value).startswith("-"):
            machine.error(f"No idea what {value!r} is!")
        see_positional_arg(machine, value)

    return wrapper


def _listing_parses_no_task(parse_tasks: Callable[..., None]) -> Callable[..., None]:
    """`inv --list` names no task: building the parser of every task's flags (invoke deep-copies them all) is
    a tenth of its start-up. Anything after the core flags (`inv --list backup`, `inv --help backup`) parses."""
    @functools.wraps(parse_tasks)
    def wrapper(program: Any) -> None:
        if program.args.list.value and not program.args.help.value and not program.core.unparsed:
            program.parser = Parser(initial=program.initial_context, contexts=[])
            program.core_via_tasks, program.tasks = ParserContext(), ParseResult()
            return
        parse_tasks(program)

    return wrapper


def _exit_2_on_parse_error(parse: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(parse)
    def wrapper(program: Any) -> None:
        parsing_exits_2(program, lambda: parse(program))

    wrapper.opsbook = True  # type: ignore[attr-defined]
    return wrapper


def parsing_exits_2(program: Any, parse: Callable[[], None]) -> None:
    """Runs one of the program's parse steps: a parse error becomes one line and exit 2."""
    try:
        parse()
        sys.stdout.flush()  # a reader gone early (`inv --list | head`) shows here, not at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to say to it
        raise Exit(code=0) from None
    except ParseError as error:
        raise Exit(usage_message(program, error), code=2) from None
    except Exit as error:
        if error.code == 1 and error.message:  # `inv --list NOSUCH`
            raise Exit(f"error: {error.message.rstrip('!')}; see `{command_name(program)} --list`", code=2) from None
        raise


def command_name(program: Any) -> str:
    """How the operator ran opsbook, for the hints: `opsbook`, or invoke's `inv` in the checkout."""
    return getattr(program, "command", "inv")


def usage_message(program: Any, error: Exception) -> str:
    """One line: what was wrong, for which task, and where its flags are documented."""
    context = getattr(error, "context", None)
    task = min([context.name, *context.aliases], key=len) if getattr(context, "name", None) else None
    parser = getattr(program, "parser", None)
    tasks = list(parser.contexts) if parser is not None else []
    text = str(error)
    if match := _NEEDS_VALUE.match(text):
        text = f"{_flag(context, match[1])} needs a value"
    elif match := _TAKES_NO_VALUE.match(text):
        text = f"{_flag(context, match[1])} takes no value"
    elif match := _POSITIONAL.match(text):
        text = "missing " + ", ".join(name.strip("'").upper() for name in match[1].split(", "))
    elif (match := _UNKNOWN.match(text)) and match[1].startswith("-"):
        flags = [flag for flag in (context.flags if context is not None else []) if flag.startswith("--")]
        text = f"unknown flag {match[1]}{_did_you_mean(match[1], flags)}"
    elif match:
        text = f"{'unexpected argument' if task else 'no task named'} {match[1]!r}{_did_you_mean(match[1], tasks)}"
    command = command_name(program)
    if task:
        return f"error: {task}: {text}; see `{command} -h {task}`"
    return f"error: {text}; see `{command} {'--help' if text.startswith('unknown flag') else '--list'}`"


def _flag(context: Any, name: str) -> str:
    """The flag as typed (`--max-fail`) for the name invoke's messages use (`max_fail`)."""
    try:
        return f"--{context.args[name].names[0]}"  # args knows each flag by its attribute name too
    except (AttributeError, KeyError):
        return f"--{name}"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class TaskCall:
    """What the task class hands a body in place of invoke's context: the run's output (JSON or lines, from
    --json) and its environment, loaded on first use with the task's options, its --confirm checked."""

    def __init__(self, context: Any, arguments: dict[str, Any], *, allow_decommissioned: bool = False) -> None:
        self.context = context
        self.output = Output(json_mode=bool(arguments.get("json")))
        self.dry_run = bool(arguments.get("dry_run"))
        self.confirm: str | None = arguments.get("confirm")
        self._env_name: str | None = arguments.get("env")
        self._allow_decommissioned = allow_decommissioned

    @functools.cached_property
    def environment(self) -> Environment:
        return environment(self._env_name, output=self.output, confirm=self.confirm,
                           allow_decommissioned=self._allow_decommissioned)

    @functools.cached_property
    def inventory_environment(self) -> Environment:
        """The environment as the inventory declares it: a sandbox is not started, nothing is connected to."""
        return load_inventory().environment(self._env_name)


def opstask(body: F, job: Callable[[], str | None] | None = None, multi: bool = False,
            allow_decommissioned: bool = False) -> F:
    """Runs a task body and turns every outcome into the documented exit code; `job()` names the task for the
    pings (ops/pings.py) that report its start and its exit code to the environment's monitor. The body gets
    a TaskCall for invoke's context.

    An --env list or `all` (ops/multi_env.py) runs a `multi` task's body once per environment, each run
    pinged on its own; every other task refuses it, exit 2."""
    def calling(context: Any, *args: Any, **kwargs: Any) -> Any:
        return body(TaskCall(context, kwargs, allow_decommissioned=allow_decommissioned), *args, **kwargs)

    @functools.wraps(body)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
        name = job() if job else None

        def restore() -> None:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

        outcome = None
        if not multi_env.requested(kwargs.get("env")):
            # the handlers are restored before the end is pinged: an interrupt then cannot unwind the task again
            outcome, code, _detail = _run_pinged(calling, name, args, kwargs, restore)
        elif multi:
            try:
                code = _each_environment(calling, name, args, kwargs)
            finally:
                restore()
        else:
            restore()
            code = _reporting(lambda: _refuse_env_list(name or body.__name__, kwargs["env"]),
                              kwargs.get("json", False))[1]
        if code:
            raise Exit(code=code)
        return outcome

    return wrapper  # type: ignore[return-value]


def _run_pinged(body: Callable[..., Any], job: str | None, args: tuple[Any, ...], kwargs: dict[str, Any],
                before_finish: Callable[[], None] = lambda: None) -> tuple[Any, int | None, str]:
    """One run of the body on one environment, its start and end pinged: (its value, exit code, error line)."""
    ping = None

    def call() -> Any:
        nonlocal ping
        ping = pings.prepare(job, kwargs)
        pings.start(ping)
        return body(*args, **kwargs)

    outcome, code, detail = None, None, ""
    try:
        outcome, code, detail = _reporting(call, kwargs.get("json", False))
    finally:
        before_finish()
        pings.finish(ping, code, detail)
    return outcome, code, detail


def _reporting(call: Callable[[], Any], json_mode: bool) -> tuple[Any, int, str]:
    """Runs `call`; each error is reported in its one place: (its value, exit code, error line)."""
    printed_before = results_printed()
    try:
        return call(), 0, ""
    except OpsError as error:
        _report(error, error.exit_code, json_mode and results_printed() == printed_before)
        return None, error.exit_code, error.message
    except KeyboardInterrupt:
        _report(Interrupted("interrupted"), 130, json_mode)
        return None, 130, ""
    except Exception as error:  # a traceback is a bug: say so plainly, show it only on request
        if os.environ.get("OPS_DEBUG"):
            Output().line(traceback.format_exc())
        message = f"internal error: {type(error).__name__}: {error}"
        _report(OpsError(message, hint="this is a bug in opsbook; re-run with OPS_DEBUG=1 for the traceback"),
                1, json_mode)
        return None, 1, message


def _each_environment(body: Callable[..., Any], job: str | None, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> int:
    """A multi-environment task on each environment of an --env list: the worst exit code."""
    json_mode = kwargs.get("json", False)
    selection, code, _detail = _reporting(lambda: multi_env.selected(kwargs["env"]), json_mode)
    if code:
        return code

    def run(name: str) -> tuple[int, str]:
        before = _interrupts
        _outcome, code, detail = _run_pinged(body, job, args, {**kwargs, "env": name})
        if _interrupts != before and code != 130:
            raise KeyboardInterrupt  # it arrived while the end was pinged: the next environment must not start
        return code or 0, detail

    try:
        return multi_env.run_each(job or body.__name__, selection, json_mode, run)
    except KeyboardInterrupt:  # between two environments
        _report(Interrupted("interrupted"), 130, json_mode)
        return 130


def _refuse_env_list(task: str, env: str) -> None:
    raise UsageError(f"{task}: --env takes one environment, not {env!r}: what changes things runs on one "
                     f"environment at a time (only the read-only checks take a list or all); see `inv -h {task}`")


class OpsTask(Task):
    """An opsbook task (`@task(klass=OpsTask, help={...})`): the shared flags' help and short letters, and
    every outcome of its body turned into the documented exit code (opstask).

    `help` holds the task's own flags (and may reword a shared one); `short` gives one of its own flags a
    letter of its choosing, instead of the first free letter of its name. `multi_env=True` (read-only tasks
    only) lets --env name several environments or `all` (ops/multi_env.py); `allow_decommissioned=True`
    (read-only listings) loads a decommissioned environment too."""

    def __init__(self, body: Callable[..., Any], *args: Any, help: dict[str, str] | None = None,
                 short: dict[str, str] | None = None, multi_env: bool = False, allow_decommissioned: bool = False,
                 **kwargs: Any) -> None:
        wrapper = opstask(body, job=lambda: self.job, multi=multi_env, allow_decommissioned=allow_decommissioned)
        signature = inspect.signature(wrapper)  # the body's own (functools.wraps): read once, not once per use
        shared = {name: COMMON_HELP[name] for name in SHORT_FLAGS if name in signature.parameters}
        if multi_env and "env" in shared:
            shared["env"] = MULTI_ENV_HELP
        self.short_flags = {**{name: SHORT_FLAGS[name] for name in shared}, **(short or {})}
        self.job: str | None = None  # its name in the collection (`backup.verify`), set by name_jobs()
        self.multi_env = multi_env
        self._signature = (wrapper, signature)
        super().__init__(wrapper, *args, help={**shared, **(help or {})}, **kwargs)

    def argspec(self, body: Callable[..., Any]) -> inspect.Signature:
        """invoke's signature of the task without its context argument, from the one read in __init__ (invoke
        asks twice per task, and listing tasks builds every task)."""
        wrapper, signature = self._signature
        if body is not wrapper or not signature.parameters:
            return super().argspec(body)  # another body, or none to drop: invoke's own answer and error
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    def __deepcopy__(self, memo: dict[int, Any]) -> OpsTask:
        """invoke deep-copies the collection it loads (Collection.from_module), every task with its body's
        signature: a sixth of `inv --list` past the imports. A task only changes the help it hands out as it
        makes its arguments (invoke pops it) and its call count: those are the copy's own."""
        twin = copy.copy(self)
        memo[id(self)] = twin
        twin.help = dict(self.help)
        twin.pre, twin.post = copy.deepcopy(self.pre, memo), copy.deepcopy(self.post, memo)
        return twin

    def arg_opts(self, name: str, default: str, taken_names: set[str]) -> dict[str, Any]:
        chosen = {*SHORT_FLAGS.values(), *self.short_flags.values()}
        opts = super().arg_opts(name, default, taken_names | chosen)
        if name in self.short_flags:
            opts["names"] = [opts["names"][0], self.short_flags[name]]
        return opts


def name_jobs(collection: Any) -> None:
    """Each OpsTask learns its name in the collection, the job name its pings use: the shortest of its names
    (`backup` for `backup.run`)."""
    for name, aliases in collection.task_names.items():
        task = collection[name]
        if isinstance(task, OpsTask):
            task.job = min([name, *aliases], key=len)


_interrupts = 0  # signals received so far: one that lands while an end is pinged (which swallows it) still counts


def _interrupt(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM: commands running on hosts (in any thread) are stopped there, then the run unwinds."""
    global _interrupts
    _interrupts += 1
    remote_commands.interrupt()
    if not processes.interrupt_held():  # else raised once the local child being started is owned
        raise KeyboardInterrupt


def _report(error: OpsError, code: int, json_mode: bool) -> None:
    output = Output(json_mode=json_mode)
    output.line(f"error: {error}")
    output.result({"ok": False, "exit_code": code, "error": redact(error.message), "hint": error.hint})


def load_inventory() -> Inventory:
    return inventory.load()


def environment(name: str | None, *, output: Output | None = None, allow_decommissioned: bool = False,
                confirm: str | None = None) -> Environment:
    """The named environment, merged; a sandbox environment is started when it is not running.

    A task that changes it passes its --confirm: one naming another environment is refused here, exit 2,
    before anything runs (the runner refuses it too). A decommissioned environment (inventory flag, or the
    marker `inv decommission` leaves in the state dir) is refused, exit 2, unless the task is a read-only
    listing (`allow_decommissioned`)."""
    inventory = load_inventory()
    env = inventory.environment(name)
    check_confirm_name(env.name, confirm)
    if env.decommissioned and not allow_decommissioned:
        raise UsageError(f"environment {env.name} is decommissioned", where=env.inventory.location(f"envs.{env.name}"),
                         hint="it keeps its archive and final backup; remove `decommissioned: true` only if it is "
                              "really coming back")
    marker = decommission_marker(inventory.state_dir, env.name)
    if marker is not None and not allow_decommissioned:
        raise UsageError(f"environment {env.name} was decommissioned on {marker.get('at', '?')} by "
                         f"{marker.get('operator', '?')} (run {marker.get('run_id', '?')})",
                         where=str(inventory.state_dir / "decommissioned"),
                         hint=f"its final backup is {marker.get('final_backup', '?')} and its archive "
                              f"{marker.get('archive', '?')}; set `decommissioned: true` on envs.{env.name} in the "
                              "inventory; if `inv decommission` did not finish, run it again to finish it")
    if env.sandbox:
        sandbox = Sandbox(inventory.state_dir / "sandbox")
        info = sandbox.ensure_running(log=(output or Output()).info)
        env = env.with_overrides(sandbox.overrides(env, info))
    return env


def execute(runbook: Runbook, env: Environment, output: Output, *, dry_run: bool = False,
            confirm: str | None = None, resume: Any = None, run_id: str | None = None,
            result: Callable[[RunContext], dict[str, Any]] | None = None,
            on_failure: Callable[[RunContext, OpsError], None] | None = None) -> RunResult:
    """Runs a runbook and reports it; `result(ctx)` adds to the JSON result of a real run."""
    ctx = RunContext(env, output=output, run_id=run_id or (None if dry_run else pings.claim_run_id()))
    runner = Runner(runbook, ctx, confirm=confirm, prompt=input, resume=resume)
    try:
        outcome = runner.run(dry_run=dry_run)
    except OpsError as error:
        if on_failure:
            on_failure(ctx, error)
        raise
    output.info(f"{outcome.status} (run {outcome.run_id}; `inv runs.show {outcome.run_id}` for the journal)")
    output.result({**outcome.to_json(), **(result(ctx) if result and not dry_run else {})})
    return outcome
