"""Request kinds the worker serves, and the registry other modules add kinds to.

A handler is ``handler(context, payload) -> result``: ``payload`` is the request's
decoded bundle, the result is encoded and sent back. ``context`` is the worker's
``Context`` (``.model``, ``.policy``, ``.device``, ``.model_spec``).

Built in: ``call``, whose payload is ``{"fn": function, "args": tuple, "kwargs": dict}``. Extensions register
their own kinds at import time (``runner.nnsight`` registers ``trace``); the worker
imports every module in ``EXTENSIONS`` that is installed, plus any named with
``serve --handlers``, before it enters the sandbox.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Handler = Callable[["Context", Any], Any]

#: Modules imported by every worker at start-up so their kinds are served.
EXTENSIONS = ("runner.nnsight",)

#: The token that stands for the worker's model in bundles, both ways.
MODEL_TOKEN = "runner:model"

_registry: dict[str, Handler] = {}


class ModelPlaceholder:
    """``runner.MODEL``: put it where your function expects the model; the worker passes
    its loaded model there instead (and a result holding the worker's model comes back
    as ``runner.MODEL``)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "runner.MODEL"

    def __reduce__(self):  # copies and pickles stay the one placeholder
        return "MODEL"


MODEL = ModelPlaceholder()


@dataclass
class Context:
    """What a handler may use: the loaded model (``None`` for ``--model none``), the
    sandbox policy the worker runs under, the torch device name and the model spec; and,
    during a request, ``sources``: the requesting client's part of the worker's source
    store (digest -> text), where a handler may keep texts that client sends again by
    digest (raising ``capture.MissingSources`` for one it lacks makes the client resend)."""

    model: Any
    policy: Any
    device: str
    model_spec: str
    sources: Any = None


def register(kind: str, handler: Handler) -> None:
    """Serve requests of ``kind`` with ``handler``; registering a kind twice is an error."""
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ValueError(f"a request kind must be an identifier-like string, got {kind!r}")
    if kind in _registry and _registry[kind] is not handler:
        raise ValueError(f"request kind {kind!r} is already served by {_registry[kind]!r}")
    _registry[kind] = handler


def lookup(kind: str) -> Handler:
    """The handler of ``kind``; ``LookupError`` naming the kinds served otherwise."""
    try:
        return _registry[kind]
    except KeyError:
        raise LookupError(
            f"this worker serves no request kind {kind!r}; it serves {', '.join(sorted(_registry))}"
        ) from None


def kinds() -> list[str]:
    return sorted(_registry)


def call(context: Context, payload: Any) -> Any:
    """Run ``function(*args, **kwargs)``; ``runner.MODEL`` in the arguments is the model."""
    if not (isinstance(payload, dict) and payload.keys() == {"fn", "args", "kwargs"}
            and callable(payload["fn"]) and isinstance(payload["args"], (tuple, list))
            and isinstance(payload["kwargs"], dict)):
        raise TypeError(
            "a 'call' request's payload must be {'fn': callable, 'args': tuple, 'kwargs': dict}; "
            "build it with Worker.call or runner.encode_call")
    return payload["fn"](*payload["args"], **payload["kwargs"])


register("call", call)
