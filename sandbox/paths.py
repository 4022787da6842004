"""Where the interpreter's own code lives, as opposed to a user's project."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from typing import Iterable


def interpreter_roots() -> list[str]:
    """The interpreter's prefixes, its stdlib and its site-packages directories (resolved)."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths = sysconfig.get_paths()
    roots.update(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    roots.update(site.getsitepackages())
    return sorted(os.path.realpath(root) for root in roots if root)


def is_under(path: str, roots: Iterable[str]) -> bool:
    """Is ``path`` (resolved) one of ``roots`` or inside one?"""
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)
