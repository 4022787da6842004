"""The serializers compared: sourcebox's capture and the pickles people use today.

Each is named the same way in ``latest.json``, RESULTS.md, the plots and the cold-load
child process (``benchmarks.coldload``), which imports this module to load a payload.
"""
from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator

OURS = "sourcebox"
PICKLE = "pickle"
CLOUDPICKLE = "cloudpickle"
CLOUDPICKLE_BY_VALUE = "cloudpickle-by-value"
DILL = "dill"
ALL = (OURS, PICKLE, CLOUDPICKLE, CLOUDPICKLE_BY_VALUE, DILL)

DESCRIPTIONS = {
    OURS: "capture.dumps / capture.loads: source + msgpack + raw tensor frames",
    PICKLE: f"pickle protocol {pickle.HIGHEST_PROTOCOL}: everything by reference (user modules must be importable)",
    CLOUDPICKLE: "cloudpickle, defaults: importable user modules by reference, the rest as bytecode",
    CLOUDPICKLE_BY_VALUE: "cloudpickle with register_pickle_by_value on the user modules: bytecode by value",
    DILL: "dill with recurse=True",
}


@dataclass
class Serializer:
    """One way of turning an object into bytes and back."""

    name: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


def _cloudpickle_by_value(user_modules: list[ModuleType]) -> Serializer:
    import cloudpickle

    # Registered only while dumping, so plain cloudpickle, interleaved with this one,
    # keeps pickling the same modules by reference. It costs about a microsecond a call.
    @contextlib.contextmanager
    def by_value() -> Iterator[None]:
        for module in user_modules:
            cloudpickle.register_pickle_by_value(module)
        try:
            yield
        finally:
            for module in user_modules:
                cloudpickle.unregister_pickle_by_value(module)

    def dumps(obj: Any) -> bytes:
        with by_value():
            return cloudpickle.dumps(obj)

    return Serializer(CLOUDPICKLE_BY_VALUE, dumps, cloudpickle.loads)


def make(name: str, user_modules: list[ModuleType] = ()) -> Serializer:
    """The serializer called ``name`` (one of ``ALL``); ``user_modules`` are shipped by value
    where the serializer has such a mode."""
    if name == OURS:
        import capture
        return Serializer(OURS, capture.dumps, capture.loads)
    if name == PICKLE:
        return Serializer(PICKLE, lambda obj: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), pickle.loads)
    if name == CLOUDPICKLE:
        import cloudpickle
        return Serializer(CLOUDPICKLE, cloudpickle.dumps, cloudpickle.loads)
    if name == CLOUDPICKLE_BY_VALUE:
        return _cloudpickle_by_value(list(user_modules))
    if name == DILL:
        import dill
        return Serializer(DILL, lambda obj: dill.dumps(obj, recurse=True), dill.loads)
    raise ValueError(f"unknown serializer {name!r}; choose one of {', '.join(ALL)}")
