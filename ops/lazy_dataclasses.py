"""Dataclasses built on first use, not when their module is imported.

Listing tasks imports every module. Python 3.11 compiles each dataclass's methods from source when its
class statement runs (`__init__`, `__repr__`, `__eq__`, and for a frozen one `__setattr__`, `__delattr__`
and `__hash__`): for opsbook's hundred-odd dataclasses that was half of its import time, for classes most
commands never make. `@dataclass` from here stands where the standard one did, with the same options; the
class becomes that dataclass the first time an instance is made (copied, unpickled) or its fields
are asked for (`dataclasses.fields`, `is_dataclass`, `cls.__dataclass_fields__`). `built_on_demand()` names
every such class, so a test can build them all and see each definition is valid.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform, overload

C = TypeVar("C", bound=type)

_FIELDS = "__dataclass_fields__"
_building = threading.RLock()  # one thread builds a class (and, through its fields, its dataclass bases)
_deferred: list[type] = []


@overload
def dataclass(cls: C, /) -> C: ...


@overload
def dataclass(*, frozen: bool = False, eq: bool = True, order: bool = False, kw_only: bool = False,
              repr: bool = True, init: bool = True) -> Callable[[C], C]: ...


@dataclass_transform(field_specifiers=(dataclasses.field, dataclasses.Field))
def dataclass(cls: C | None = None, /, **options: Any) -> C | Callable[[C], C]:
    """`dataclasses.dataclass`, applied when the class is first used (slots=True makes a new class: not here)."""
    if "slots" in options:
        raise TypeError("ops.lazy_dataclasses: slots=True replaces the class; use dataclasses.dataclass")

    def deferring(cls: C) -> C:
        _defer(cls, options)
        return cls

    return deferring if cls is None else deferring(cls)


def built_on_demand() -> list[type]:
    """Every class this module's @dataclass has deferred so far, built or not (one with other bases than
    deferred dataclasses is built at once)."""
    return list(_deferred)


def _defer(cls: type, options: dict[str, Any]) -> None:
    if any(base is not object and base not in _deferred for base in cls.__bases__):
        dataclasses.dataclass(cls, **options)  # its bases may make objects their own way: built now
        return
    documented = cls.__doc__ is not None
    built = False

    def build() -> None:
        nonlocal built
        with _building:
            if built:
                return  # by another thread, or through a subclass's fields
            for base in cls.__bases__:
                getattr(base, _FIELDS, None)  # a deferred base is built first: the subclass takes its fields
            if not documented:
                cls.__doc__ = "pending"  # dataclass would describe it with the signature of `new`: set below
            dataclasses.dataclass(cls, **options)
            init = inspect.signature(cls.__init__)
            signature = init.replace(parameters=list(init.parameters.values())[1:])
            cls.__signature__ = _OwnSignature(cls, signature)  # type: ignore[attr-defined]
            if not documented:
                cls.__doc__ = cls.__name__ + str(signature).replace(" -> None", "")
            # A __new__ cannot be taken back off a class (object.__new__ would then refuse the arguments), and
            # a placeholder __init__ would leave another thread a moment without one: the first __new__ gives
            # way to one that only makes the object.
            cls.__new__ = staticmethod(_new)  # type: ignore[assignment]
            built = True

    def new(klass: type, *args: Any, **kwargs: Any) -> Any:
        build()
        return object.__new__(klass)

    cls.__new__ = staticmethod(new)  # type: ignore[assignment]
    setattr(cls, _FIELDS, _Unbuilt(build))
    _deferred.append(cls)


def _new(klass: type, *args: Any, **kwargs: Any) -> Any:
    return object.__new__(klass)


class _Unbuilt:
    """Stands as a deferred class's `__dataclass_fields__`: asking for it builds the class first."""

    def __init__(self, build: Callable[[], None]) -> None:
        self._build = build

    def __get__(self, instance: Any, owner: type) -> Any:
        self._build()
        return getattr(owner, _FIELDS)


class _OwnSignature:
    """inspect.signature(cls) would read the __new__ a built class keeps: it gets the dataclass's own; a
    subclass (None) gets the one inspect finds for it."""

    def __init__(self, cls: type, signature: inspect.Signature) -> None:
        self._cls, self._signature = cls, signature

    def __get__(self, instance: Any, owner: type) -> inspect.Signature | None:
        return self._signature if instance is None and owner is self._cls else None
