"""Where shipped classes and functions came from: the sender's module and qualified name.

A receiver rebuilds shipped code in namespaces it never puts in ``sys.modules``, so
nothing it sends back could name those objects. The decoder remembers, per rebuilt
object, the name the sender knows it by; the encoder sends such an object back as a
reference to that name when the destination provides the module (the runner's worker
answering its client). Weak: an entry lives as long as its object.
"""
from __future__ import annotations

import weakref
from typing import Any

_ORIGINS: "weakref.WeakKeyDictionary[Any, tuple[str, str]]" = weakref.WeakKeyDictionary()


def remember(obj: Any, module: str, qualname: str) -> None:
    """Record that ``obj`` was rebuilt from the sender's ``module.qualname``."""
    try:
        _ORIGINS[obj] = (module, qualname)
    except TypeError:
        pass  # not weakly referenceable: it simply has no remembered origin


def of(obj: Any) -> tuple[str, str] | None:
    """The sender's (module, qualname) of a rebuilt class or function, else ``None``."""
    try:
        return _ORIGINS.get(obj)
    except TypeError:
        return None


def nameable(qualname: str) -> bool:
    """Whether a qualified name can be found by walking attributes from its module
    (no ``<lambda>``, no ``<locals>``)."""
    return bool(qualname) and all(part.isidentifier() for part in qualname.split("."))
