"""Annotations that only make sense unevaluated: postponed annotations naming a module that is
imported for type checkers only (and exists nowhere)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import module_that_exists_nowhere
    from module_that_exists_nowhere import Tensorish


def norm(values: list[float]) -> Tensorish:
    return sum(v * v for v in values) ** 0.5


def describe(thing: module_that_exists_nowhere.Thing) -> str:
    return f"<{thing}>"
