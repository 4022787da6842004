"""What the destination has: the protocol capture consults, and its stand-in default.

The sandbox's ``Policy`` is the real implementation (capture does not import it: both
packages are leaves). Any object with these three methods and a ``name`` will do:

- ``provides(module) -> bool``: on dumps, objects from such modules travel by reference.
- ``resolve(module, qualname) -> object``: on loads, import and walk an attribute path,
  raising ``ImportError`` with a clear message when the destination refuses it.
- ``builtins() -> dict``: the ``__builtins__`` of every namespace shipped code runs in;
  its ``__import__`` is where imports made by user code meet the policy.
"""
from __future__ import annotations

import builtins as _builtins
import importlib
import sys
from typing import Any, Protocol

#: The server set assumed until a policy is given: the stdlib and the big four.
DEFAULT_PACKAGES = ("torch", "numpy", "transformers", "einops")


class Destination(Protocol):
    name: str

    def provides(self, module: str) -> bool: ...

    def resolve(self, module: str, qualname: str) -> Any: ...

    def builtins(self) -> dict: ...


def walk_qualname(obj: Any, qualname: str) -> Any:
    """Follow a dotted attribute path (``Outer.Inner.method``) from ``obj``."""
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


class DefaultDestination:
    """The stdlib plus torch, numpy, transformers and einops, with unrestricted imports."""

    name = "default-server-set"

    def provides(self, module: str) -> bool:
        top = module.partition(".")[0]
        return top in sys.stdlib_module_names or top in DEFAULT_PACKAGES or top == "builtins"

    def resolve(self, module: str, qualname: str) -> Any:
        return walk_qualname(importlib.import_module(module), qualname)

    def builtins(self) -> dict:
        return _builtins.__dict__


DEFAULT = DefaultDestination()
