"""ops.lazy_dataclasses: a class declared with its @dataclass is the standard dataclass once used, built once."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import pickle
import threading
from collections.abc import Callable
from dataclasses import field
from pathlib import Path

import pytest

from ops.lazy_dataclasses import built_on_demand, dataclass

REPOSITORY = Path(__file__).resolve().parents[2]


def _unbuilt(cls: type) -> bool:
    return type(vars(cls)["__dataclass_fields__"]).__name__ == "_Unbuilt"


def declared(decorator: Callable[[type], type]) -> type:
    @decorator
    class Asset:
        name: str
        size: int = 0
        tags: tuple[str, ...] = field(default_factory=tuple)

    return Asset


def test_a_frozen_one_is_built_by_its_first_instance_and_behaves_as_the_standard_one():
    lazy, reference = declared(dataclass(frozen=True)), declared(dataclasses.dataclass(frozen=True))
    assert _unbuilt(lazy)
    one = lazy("a", 3)
    assert not _unbuilt(lazy)
    assert repr(one) == repr(reference("a", 3))
    assert one == lazy("a", 3) and one != lazy("b") and hash(one) == hash(lazy("a", 3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.name = "b"  # type: ignore[misc]
    assert dataclasses.replace(one, size=4) == lazy("a", 4, ())
    assert dataclasses.asdict(one) == {"name": "a", "size": 3, "tags": ()}
    assert copy.deepcopy(one) == one and copy.copy(one) == one
    assert str(inspect.signature(lazy)) == str(inspect.signature(reference))
    assert lazy.__doc__ == reference.__doc__
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'name'"):
        lazy()


@dataclass(frozen=True)
class Pickled:
    name: str


def test_an_unpickled_one_is_built_too():
    assert _unbuilt(Pickled)
    data = pickle.dumps(Pickled("x"))
    assert pickle.loads(data) == Pickled("x")


def test_asking_for_its_fields_builds_it_before_any_instance():
    @dataclass
    class Record:
        """A record."""

        key: str
        values: list[int] = field(default_factory=list)

    assert dataclasses.is_dataclass(Record)
    assert [f.name for f in dataclasses.fields(Record)] == ["key", "values"]
    assert set(Record.__dataclass_fields__) == {"key", "values"}
    assert Record("k").values == [] and Record.__doc__ == "A record."


def test_threads_making_the_first_instances_at_once_all_get_one():
    @dataclass
    class Shared:
        number: int

    made: list[Shared] = []
    start = threading.Barrier(8)

    def make(number: int) -> None:
        start.wait()
        made.append(Shared(number))

    threads = [threading.Thread(target=make, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(one.number for one in made) == list(range(8))


def test_a_subclass_gets_its_own_fields_and_signature():
    @dataclass(frozen=True)
    class Base:
        name: str

    @dataclass(frozen=True)
    class Derived(Base):
        extra: int = 1

    class Plain(Base):
        pass

    def unbuilt(cls: type) -> bool:
        return type(vars(cls)["__dataclass_fields__"]).__name__ == "_Unbuilt"

    assert unbuilt(Base) and unbuilt(Derived)  # a subclass of a deferred dataclass waits too
    assert Derived("d") == Derived("d", 1)
    assert not unbuilt(Base) and not unbuilt(Derived)
    assert str(inspect.signature(Derived)) == "(name: 'str', extra: 'int' = 1) -> None"
    assert repr(Plain("p")).endswith("Plain(name='p')")


def test_a_wrong_declaration_fails_when_first_used():
    @dataclass
    class Wrong:
        with_default: int = 0
        without: int  # type: ignore[misc]

    with pytest.raises(TypeError, match="non-default argument 'without' follows default argument"):
        Wrong()


def test_every_dataclass_of_opsbook_builds():
    """Their definitions are checked here, not when their modules are imported."""
    for package in ("ops", "runbooks"):
        for path in sorted((REPOSITORY / package).rglob("*.py")):
            parts = path.relative_to(REPOSITORY).with_suffix("").parts
            importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    declared = [cls for cls in built_on_demand() if cls.__module__.startswith(("ops.", "runbooks."))]
    assert len(declared) > 100
    for cls in declared:
        assert dataclasses.fields(cls), f"{cls.__module__}.{cls.__qualname__}"
