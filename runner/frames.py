"""The frames API: a call as a bundle's header and frames, an answer as an ``Outcome``.

This is the seam every job runner uses (Ray, Dask, Celery, a queue of your own): the
submitting side encodes with ``encode_call_frames``, the job hands the header and frames
to ``Worker.run_frames`` and carries the ``Outcome``'s frames back as they are, and the
submitting side calls ``decode_outcome``. The middle never decodes user code: it moves
buffers. Tensor data is never copied by these functions: encoded frames view the
tensors' memory, and an outcome's large frames view the worker's sealed result memfd.

The frames are capture's (docs/FORMAT.md): a client with only ``capture`` and msgpack,
on any supported Python, can make a call (``capture.encode_variables`` of ``fn``/``args``/
``kwargs``) and read a reply (``capture.decode(frames[0], frames[1:],
policy=capture.DATA_ONLY)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Container, Sequence

import capture
import sandbox
from capture import format as capture_format

from . import shm
from .defaults import DEFAULT_POLICY
from .errors import (BUSY, CRASHED, MEMORY, RUNNER, START, STOPPED, TIMEOUT, MemoryLimitExceeded, RequestTimeout,
                     RunnerError, ServerBusy, WorkerCrashed, WorkerStartError, WorkerStopped, cut, failure, rebuild)
from .handlers import MODEL, MODEL_TOKEN
# The kinds of ``Outcome`` are the answers to a request: the value's bundle, a failure, or
# a request for source text.
from .protocol import ERROR, MISS, REPLY, SharedRef


def model_token(obj: Any) -> str | None:
    """``persistent_id`` for ``capture.encode``: ``runner.MODEL`` travels as a token."""
    return MODEL_TOKEN if obj is MODEL else None


def model_placeholder(token: str) -> Any:
    """``persistent_load`` for a result: the model token is ``runner.MODEL``, nothing else."""
    if token != MODEL_TOKEN:
        raise capture.BundleError(f"unknown object token {token!r} in a result")
    return MODEL


@dataclass(eq=False)
class Outcome:
    """What a worker answered to a request in frames form, undecoded.

    ``kind``: ``"reply"`` (``frames`` are the result bundle's header and frames),
    ``"error"`` (``meta["error"]`` is the failure's wire form; no frames) or ``"miss"``
    (``meta["missing"]`` lists source digests the worker lacks: send the call again with
    every source text). ``meta`` is plain data (strings, numbers, lists, maps); ``frames``
    are byte buffers (a large one views a sealed, copy-on-write result memfd).
    """

    kind: str
    meta: dict = field(default_factory=dict)
    frames: list = field(default_factory=list)


def load_policy(spec: Any) -> sandbox.Policy:
    """The worker's policy from a spec (a profile name, a path, a ``Policy``; None: the default)."""
    return sandbox.Policy.load(spec if spec is not None else DEFAULT_POLICY)


def encode_payload(payload: Any, known: Container[str], *, policy: sandbox.Policy,
                   build: Callable[[Container[str]], tuple[Any, Sequence[str]]] | None = None) -> capture.Bundle:
    """A request's payload (or what ``build(known)`` makes) as a bundle for a worker that
    holds the texts whose digests are ``known``; the digests ``build`` says the worker keeps
    travel in ``source_digests`` (see ``Worker.request``)."""
    value, kept = build(known) if build is not None else (payload, ())
    bundle = capture.encode(value, policy=policy, persistent_id=model_token, label="payload", known_sources=known)
    bundle.source_digests.extend(kept)
    return bundle


def encode_call_frames(fn: Callable, args: tuple = (), kwargs: dict | None = None, *, policy: Any = None,
                       known_sources: Container[str] = ()) -> capture.Bundle:
    """A call ``fn(*args, **kwargs)`` as a bundle (``.header`` bytes and ``.frames`` that
    view the arguments' memory), for ``Worker.run_frames``.

    ``policy``: the worker's policy (a spec or ``sandbox.Policy``), which decides what
    travels as source. Source segments whose digest is in ``known_sources`` go by digest
    alone; a worker that lacks one answers ``miss``. Keep the bundle (its ``keepalive``)
    until the frames are sent.
    """
    return capture.encode_variables(
        {"fn": fn, "args": tuple(args), "kwargs": dict(kwargs or {})},
        policy=load_policy(policy) if policy is not None else None, persistent_id=model_token,
        known_sources=known_sources,
    )


def decode_outcome(outcome: Outcome) -> Any:
    """The value an ``Outcome`` holds, or raise the failure it holds (rebuilt as
    ``Worker.call`` raises it: ``WorkerCrashed``, ``RequestTimeout``, the user's type...).

    Read as data only (``capture.DATA_ONLY``): nothing in it runs here. Frames are used as
    given: writable ones become the result's memory, read-only ones (a Ray object, bytes)
    are copied once by capture where a tensor needs memory of its own.
    """
    if not isinstance(outcome, Outcome):
        raise TypeError(f"decode_outcome takes a runner.Outcome, not {type(outcome).__name__}")
    if outcome.kind == ERROR:
        raise rebuild(outcome.meta.get("error"))
    if outcome.kind == MISS:
        raise RunnerError(
            "this outcome is a 'miss': the worker lacks source text the call named by digest only; "
            "encode the call again without known_sources (encode_call_frames(..., known_sources=())) and resend")
    if outcome.kind != REPLY or not outcome.frames:
        raise ValueError(f"not an outcome of a call: kind {outcome.kind!r} with {len(outcome.frames)} frame(s)")
    return capture.decode(outcome.frames[0], outcome.frames[1:], policy=capture.DATA_ONLY,
                          persistent_load=model_placeholder, label="result")


def failure_outcome(exc: BaseException) -> Outcome:
    """An ``error`` Outcome for a failure of the runner itself around a request (a lost
    connection, a busy or stopped server), so a relay hands it back like any other
    outcome and ``decode_outcome`` raises it as the same type."""
    for cls, category in ((RequestTimeout, TIMEOUT), (MemoryLimitExceeded, MEMORY), (WorkerCrashed, CRASHED),
                          (WorkerStopped, STOPPED), (ServerBusy, BUSY), (WorkerStartError, START)):
        if isinstance(exc, cls):
            extra = {"returncode": exc.returncode, "stderr_tail": cut(exc.stderr_tail)} \
                if isinstance(exc, WorkerCrashed) else {}
            message = exc.reason if isinstance(exc, WorkerCrashed) else str(exc)
            return Outcome(ERROR, {"error": failure(category, cut(message), **extra)})
    return Outcome(ERROR, {"error": failure(RUNNER, cut(f"{type(exc).__name__}: {exc}"))})


def outcome_of(message: Any) -> Outcome:
    """The ``Outcome`` of an answer message (``reply``/``error``/``miss``) read by a client.

    Inline frames borrow the connection's receive buffer, so each gets a private copy
    (small: large frames never travel inline); large ones are the sealed result memfd,
    mapped copy-on-write without a copy.
    """
    shared = iter(shm.map_result(message.shared(), message.fds))
    frames = [next(shared) if isinstance(frame, SharedRef) else memoryview(bytearray(frame))
              for frame in message.frames]
    return Outcome(message.kind, dict(message.meta), frames)


# ``Worker.run_bytes``'s outcome for a reply: the msgpack map {"result": bin32} written as
# a fixed prefix, so ``decode_result`` reads the bundle in place instead of copying it out.
_RESULT_PREFIX = b"\x81\xa6result\xc6"
_BIN32_LIMIT = 1 << 32


def outcome_bytes(outcome: Outcome) -> bytes:
    """A reply ``Outcome`` as ``run_bytes`` outcome bytes, in one copy (the one a bytes API
    forces: a ``bytes`` object owns its memory)."""
    parts = capture_format.join_parts(outcome.frames[0], outcome.frames[1:])
    length = sum(memoryview(part).nbytes for part in parts)
    if length >= _BIN32_LIMIT:
        raise ValueError(f"a result of {length} bytes does not fit run_bytes' outcome (at most 4 GiB); "
                         "use Worker.run_frames or Worker.call")
    return b"".join([_RESULT_PREFIX, length.to_bytes(4, "big"), *parts])


def result_view(data: Any) -> memoryview | None:
    """The result bundle inside outcome bytes made by ``outcome_bytes``, as a view (no
    copy); ``None`` for any other outcome (an error, bytes from elsewhere)."""
    view = memoryview(data)
    start = len(_RESULT_PREFIX) + 4
    if view.ndim != 1 or view.itemsize != 1 or view.nbytes < start or view[:len(_RESULT_PREFIX)] != _RESULT_PREFIX:
        return None
    if int.from_bytes(view[len(_RESULT_PREFIX):start], "big") != view.nbytes - start:
        return None
    return view[start:]
