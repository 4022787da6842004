"""Every use sourcebox makes of nnsight's internals, behind small functions.

nnsight has no public API for what sourcebox needs from it (the wrapped torch module, its
per-file source caches, the frame a trace reads and writes, the hook behind
``remote=...``), so these reach into its modules and private attributes, which may change
in any release. Gathered here, a new nnsight means reading one file, and the version is
checked when this module is imported: an untested nnsight fails at once, saying what to
do, instead of deep inside a trace.
"""
from __future__ import annotations

import importlib.metadata
from typing import Any, Callable

#: The nnsight releases these functions were written and tested against (0.8.x).
TESTED_SERIES = (0, 8)


class NnsightVersionError(ImportError):
    """The installed nnsight is not one sourcebox's nnsight support was tested with."""


def check_version(version: str) -> None:
    """Raise ``NnsightVersionError`` unless ``version`` is of the tested series."""
    parts = version.split(".")
    try:
        series = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        series = None
    if series != TESTED_SERIES:
        tested = ".".join(map(str, TESTED_SERIES))
        raise NnsightVersionError(
            f"nnsight {version} is installed, but sourcebox's nnsight support (runner.nnsight) is tested with "
            f"nnsight {tested}.x only: it uses nnsight internals that change between releases. Install a tested "
            f"release (pip install 'nnsight>={tested},<{TESTED_SERIES[0]}.{TESTED_SERIES[1] + 1}'), or port "
            "runner/nnsight_compat.py to this one and widen TESTED_SERIES")


def installed_version() -> str | None:
    """The installed nnsight's version, or None when it is not installed."""
    try:
        return importlib.metadata.version("nnsight")
    except importlib.metadata.PackageNotFoundError:
        return None


_installed = installed_version()
if _installed is not None:  # without nnsight there is nothing here to use
    check_version(_installed)


# -- models and their parts ---------------------------------------------------------------

def torch_module(model: Any) -> Any:
    """The ``torch.nn.Module`` an nnsight model wraps (``model`` itself when it is one)."""
    return getattr(model, "_module", model)


def envoy_module(envoy: Any) -> Any:
    """The ``torch.nn.Module`` an envoy stands for."""
    return envoy._module


def envoy_of(model: Any, module: Any) -> Any:
    """The envoy of ``model`` that stands for ``module`` (a ``torch.nn.Module``), or None."""
    envoy = model.interleaver.envoys.get(id(module))
    return envoy if envoy is not None and envoy._module is module else None


def same_model(envoy: Any, model: Any) -> bool:
    """Whether ``envoy`` is a part of ``model`` (they share its interleaver)."""
    return envoy.interleaver is model.interleaver


def cache_record_types() -> list[type]:
    """nnsight's cache records (``tracer.cache()``), which a trace may hand back."""
    from nnsight.intervention import cache

    return [cache.Cache, cache.CacheView, cache.Entry]


def attach_cache_model(value: Any, envoy: Any) -> None:
    """Give a cache view that travelled without its model the client's envoy tree, so
    navigation (``cache.transformer.h[0]``) works."""
    from nnsight.intervention.cache import CacheView

    if isinstance(value, CacheView):
        value._cache.model = envoy


# -- traces --------------------------------------------------------------------------------

def traced_source(filename: str) -> str:
    """The text nnsight parsed a traced block from (it reads each file once)."""
    from nnsight.tracing.tracer import Tracer

    return Tracer.source(filename)


def reset_source_caches(filename: str, text: str) -> None:
    """Forget every file's source and compiled block nnsight cached, and give it ``text``
    as ``filename``'s: its caches are keyed by file name and kept for ever, while a
    worker outlives many requests whose files change."""
    from nnsight.tracing.globals import BLOCKS, SOURCES

    SOURCES.clear()
    BLOCKS.clear()
    SOURCES[filename] = text


def set_trace_frame(tracer: Any, frame: Any, code: Any) -> None:
    """Make ``tracer`` read its block's variables from ``frame`` and run ``code``."""
    from nnsight.tracing.tracer import Tracer

    tracer.info = Tracer.Info(frame, code)


def intervention_traceback(error: BaseException) -> Any:
    """The traceback of the user's own lines in a failed trace, as nnsight stashes it (or None)."""
    from nnsight.tracing.util import clean_traceback

    frames = getattr(error, "__intervention_tb__", None)
    return clean_traceback(frames) if frames is not None else None


def bind_saved(frame: Any, saved: dict) -> None:
    """Bind saved values in the caller's frame, marked so an enclosing trace keeps them
    (as nnsight's own remote backend does)."""
    from nnsight.tracing.tracer import mark
    from nnsight.tracing.util import push

    for value in saved.values():
        mark(value)
    push(frame, saved)


# -- remote='...' ----------------------------------------------------------------------------

def replace_remote_backend(make: Callable[[Callable], Callable]) -> Callable:
    """Replace the method behind ``model.trace(remote=...)`` with ``make(original)``;
    return the original, for ``restore_remote_backend``."""
    from nnsight.modeling.mixins.remotable import Remotable

    original = Remotable._remote_backend
    Remotable._remote_backend = make(original)
    return original


def restore_remote_backend(original: Callable) -> None:
    from nnsight.modeling.mixins.remotable import Remotable

    Remotable._remote_backend = original
