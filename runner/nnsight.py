"""nnsight traces run by the sourcebox worker: a ``remote='local'`` that behaves like the server.

A traced ``with`` block travels to the long-lived worker that holds the model as its
source text plus the values it reads, encoded by ``capture`` under the worker's policy;
the worker runs it on its own model and sends back only what the block ``.save()``\\ d.

Client side, `WorkerBackend` is an nnsight backend (``model.trace(..., backend=...)``
calls it with the tracer); `install` makes ``remote='local'`` use it. Worker side,
`handle_trace` serves the ``trace`` request kind. docs/NNSIGHT.md explains the design.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import hashlib
import io
import os
import re
import sys
import threading
import types
import weakref
from typing import Any

import msgpack

from . import handlers
from . import nnsight_compat as compat

TRACE_REQUEST = "trace"

# Tokens standing for the worker's own objects: the model and its parts never travel.
_MODEL = "nnsight:model"
_TRACER = "nnsight:tracer"
_TOKENIZER = "nnsight:tokenizer"
_ENVOY = "nnsight:envoy:"
_MODULE = "nnsight:module:"

# Keys for the traced call's own arguments among the block's variables; not identifiers,
# so no variable of the user's can take them.
_ARGS, _KWARGS = "trace args", "trace kwargs"


class TraceRefused(RuntimeError):
    """The worker cannot run this trace (another model, an unsupported tracer)."""


# --- client side ---------------------------------------------------------------------


@functools.cache  # a WorkerBackend is made per trace; registering once is enough
def _allow_trace_results() -> None:
    """The library record types a trace hands back may come back from the worker as plain
    data: nnsight's cache records (``tracer.cache()``) and transformers' key/value caches
    (in saved model outputs). Their state is written into them and none of their code
    runs (the client reads replies with ``capture.DATA_ONLY``)."""
    import capture
    from transformers import cache_utils

    records = compat.cache_record_types()
    records += [value for value in vars(cache_utils).values()
                if isinstance(value, type) and value.__module__ == cache_utils.__name__]
    capture.DATA_ONLY.allow(*records, own_methods=False)


class WorkerBackend:
    """An nnsight backend that runs the traced block in a sourcebox worker.

    ``with model.trace(prompt, backend=WorkerBackend(worker)):`` ships the block's source
    and the values it reads to ``worker`` (a ``runner.Worker``), runs it there on the
    worker's model, prints what the block printed, and binds the saved values in the
    caller's frame, as a local trace would. Errors are raised at the user's own lines:
    the line that reads an object that cannot travel, or the lines the worker ran.
    """

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        _allow_trace_results()

    def __call__(self, tracer: Any) -> None:
        import capture

        try:
            request = build_request(tracer, policy=getattr(self.worker, "policy", None))
        except capture.CaptureError as error:
            block = _Block(tracer)
            line = block.line_reading(_root_name(error.path))
            error.add_note(f"(read by the traced block at {block.file}:{line})")
            raise _at_user_lines(error, [(block.file, line, block.name)]) from None
        data = _request_bytes(request)
        digest = _request_digest(data)

        def build(known):  # an identical trace again sends the digest alone
            return ({"digest": digest} if digest in known else {"digest": digest, "request": data}), [digest]

        try:
            result = self.worker.request(TRACE_REQUEST, build=build)
        except Exception as error:
            frames = [
                (file, line, name)
                for file, line, name, *_ in getattr(error, "remote_traceback", None) or ()
                if not file.startswith(_sourcebox_directories())
            ]
            if not frames:
                raise
            # The same exception, re-raised with the user's frames: no new cause to chain.
            raise _at_user_lines(error, frames)  # noqa: B904
        bind_result(tracer, result)


def build_request(tracer: Any, policy: Any = None) -> dict:
    """The ``trace`` request for a captured tracer: the block's source and what it reads.

    ``policy`` describes the worker (what it can import), as ``capture.encode`` takes it.
    Values that are the client's model, its envoys, modules or tokenizer, or the tracer
    itself, travel as tokens the worker replaces with its own objects. Raises
    ``capture.CaptureError`` naming the variable that cannot travel.
    """
    import capture

    model = getattr(tracer, "envoy", None)
    if model is None:
        raise TraceRefused(
            "the sourcebox worker runs model traces (model.trace / model.generate); "
            f"a {type(tracer).__name__} such as model.session() is not supported: "
            "run its traces one by one"
        )
    block = _Block(tracer)
    frame = tracer.info.frame
    frame_locals, frame_globals = frame.f_locals, frame.f_globals  # f_locals is rebuilt per access

    variables, global_names = {}, []
    for name in sorted(block.names_read()):
        if name in frame_locals:
            variables[name] = frame_locals[name]
        elif name in frame_globals:
            variables[name] = frame_globals[name]
            global_names.append(name)
    variables[_ARGS] = list(tracer.args)
    variables[_KWARGS] = dict(tracer.kwargs)

    bundle = capture.encode_variables(variables, policy=policy, persistent_id=_client_tokens(model, tracer))
    return {
        "model": _model_identity(model),
        "call": _call_name(tracer.fn, model),
        "file": block.file,
        "line": block.first,
        "name": block.name,
        "source": block.source(),
        "globals": global_names,
        "variables": bundle.to_bytes(),
    }


def _request_bytes(request: dict) -> bytes:
    """A trace request on the wire: plain data (strings, numbers, the variables' bundle)."""
    return msgpack.packb(request, use_bin_type=True)


def _request_digest(data: bytes) -> str:
    """The name a trace request's bytes are kept under in the worker's source store."""
    return "trace:" + hashlib.sha256(data).hexdigest()[:32]


def bind_result(tracer: Any, result: dict) -> None:
    """Replay the block's output and bind its saved values in the caller's frame."""
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    saved = result["saved"]
    for value in saved.values():
        compat.attach_cache_model(value, tracer.envoy)  # a cache travels without its model
    compat.bind_saved(tracer.info.frame, saved)


# Per block node (nnsight keeps one per traced block): what a repeated trace would
# otherwise work out again from the file's text and the AST every time.
_block_sources: "weakref.WeakKeyDictionary[ast.AST, str]" = weakref.WeakKeyDictionary()
_block_names: "weakref.WeakKeyDictionary[ast.AST, frozenset[str]]" = weakref.WeakKeyDictionary()


class _Block:
    """The traced block as the user wrote it: file, enclosing function, AST, lines."""

    def __init__(self, tracer: Any):
        code = tracer.info.frame.f_code
        self.file, self.name, self.node = code.co_filename, code.co_name, tracer.node
        self.first, self.last = self.node.body[0].lineno, self.node.end_lineno

    def source(self) -> str:
        # The text nnsight parsed the block from (it reads each file once and keeps the
        # node), so the lines match the node's, and a node's text never changes.
        text = _block_sources.get(self.node)
        if text is None:
            text = _block_sources[self.node] = "".join(
                compat.traced_source(self.file).splitlines(keepends=True)[self.first - 1:self.last])
        return text

    def names_read(self) -> frozenset[str]:
        """Names the block reads from its surroundings (loads, deletes, augmented targets)."""
        names = _block_names.get(self.node)
        if names is None:
            found = set()
            for child in self._walk():
                if isinstance(child, ast.Name) and isinstance(child.ctx, (ast.Load, ast.Del)):
                    found.add(child.id)
                elif isinstance(child, ast.AugAssign) and isinstance(child.target, ast.Name):
                    found.add(child.target.id)
            names = _block_names[self.node] = frozenset(found)
        return names

    def line_reading(self, name: str | None) -> int:
        """The first line of the block that reads ``name`` (else the block's first line)."""
        lines = [child.lineno for child in self._walk() if isinstance(child, ast.Name) and child.id == name]
        return min(lines, default=self.first)

    def _walk(self):
        for statement in self.node.body:
            yield from ast.walk(statement)


def _sourcebox_directories() -> tuple[str, ...]:
    """Where sourcebox's own code lives: its frames (the policy's import guard, capture's
    decoder) are machinery, not the user's code, and are left out of re-raised errors."""
    import capture
    import sandbox

    return tuple(os.path.dirname(package.__file__) + os.sep for package in (capture, sandbox, handlers))


def _root_name(path: str) -> str | None:
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", path or "")
    return match.group(0) if match else None


def _at_user_lines(error: BaseException, frames: list) -> BaseException:
    """``error`` with a traceback that ends in ``frames`` (file, line, function name).

    The frames are real: for each, a one-line code object compiled under the user's
    file name at that line calls the next, so every traceback printer (pytest's
    included) shows the user's file, line and source text.
    """

    def raise_error() -> None:
        raise error

    call_next = raise_error
    for file, line, name in reversed(frames):
        # The call spans two lines so that tracebacks underline none of the user's line.
        code = compile("\n" * (line - 1) + "_call_next(\n)", file, "exec").replace(co_name=name)
        call_next = types.FunctionType(code, {"_call_next": call_next, "__builtins__": builtins})
    error.with_traceback(None)
    try:
        call_next()
    except BaseException as raised:  # noqa: BLE001 - it is `error`, now with the frames
        chain = raised.__traceback__.tb_next  # past this function's own frame
    entries = []
    while chain is not None and chain.tb_frame.f_code is not raise_error.__code__:
        entries.append(chain)
        chain = chain.tb_next
    rebuilt = None
    for entry in reversed(entries):
        rebuilt = types.TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return error.with_traceback(rebuilt)


def _call_name(fn: Any, model: Any) -> str:
    if isinstance(fn, str):
        return fn
    if getattr(fn, "__self__", None) is model:
        return fn.__name__
    raise TraceRefused(
        f"the traced call {fn!r} is not a method of the model; the worker runs only "
        "the model's own methods (model.trace, model.generate)"
    )


def _model_identity(model: Any) -> str:
    from .models import identity

    directory = getattr(model, "repo_id", None)
    if not isinstance(directory, str):
        raise TraceRefused(
            f"{type(model).__name__} names no model directory; open the client model with "
            "TransformersModel(path, task='text-generation') on a local directory, "
            "e.g. path = runner.models.path('tiny-gpt2')"
        )
    return identity(directory)


def _client_tokens(model: Any, tracer: Any):
    """``persistent_id`` for capture: the client's model parts become tokens."""
    import torch
    from nnsight.intervention.envoy import Envoy

    def persistent_id(obj: Any) -> str | None:
        if obj is model:
            return _MODEL
        if obj is tracer:
            return _TRACER
        if isinstance(obj, Envoy):
            return _ENVOY + obj.path if compat.same_model(obj, model) else None
        if isinstance(obj, torch.nn.Module):
            envoy = compat.envoy_of(model, obj)
            return _MODULE + envoy.path if envoy is not None else None
        if obj is getattr(model, "tokenizer", None):
            return _TOKENIZER
        return None

    return persistent_id


# --- worker side ---------------------------------------------------------------------


class _RequestFrame:
    """Stands in for the caller's frame on the worker.

    nnsight reads a trace's globals and locals off its frame and pushes the saved
    values back into ``f_locals``; here that dict records what was pushed.
    """

    def __init__(self, request: dict, global_values: dict, local_values: dict):
        self.f_globals = global_values
        self.f_locals = _PushedNames(local_values)
        self.f_code = types.SimpleNamespace(
            co_filename=request["file"], co_name=request["name"], co_firstlineno=request["line"]
        )


class _PushedNames(dict):
    def __init__(self, initial: dict):
        super().__init__(initial)
        self.pushed: dict = {}

    def update(self, values: dict) -> None:  # what nnsight's push() calls
        super().update(values)
        self.pushed.update(values)


_run_lock = threading.Lock()


def _stored_request(context: Any, payload: Any) -> dict:
    """The trace request of ``payload`` (``{"digest", "request"}``, the bytes absent when
    the client believes the worker holds them), kept in the client's part of the source
    store for the next identical trace; ``capture.MissingSources`` when it is not there."""
    import capture

    if not (isinstance(payload, dict) and isinstance(payload.get("digest"), str)
            and isinstance(payload.get("request", b""), bytes)):
        raise TraceRefused("a trace request is {'digest': str, 'request': bytes}; send it with WorkerBackend")
    digest, data, store = payload["digest"], payload.get("request"), context.sources
    if data is None:
        data = store.get(digest) if store is not None else None
        if data is None:
            raise capture.MissingSources([digest])
    elif _request_digest(data) != digest:  # a store must not learn a request under a false name
        raise TraceRefused(f"the trace request does not match its digest {digest!r}")
    elif store is not None:
        store[digest] = data
    try:
        request = msgpack.unpackb(data, raw=False)
    except Exception as error:  # msgpack reports malformed input with assorted types
        raise TraceRefused(f"the trace request is not readable: {error}") from None
    problems = [key for key, kind in _REQUEST_FIELDS.items()
                if not isinstance(request, dict) or not isinstance(request.get(key), kind)]
    if problems:
        raise TraceRefused(f"the trace request lacks or mistypes {', '.join(problems)}; send it with WorkerBackend")
    return request


#: The fields of a trace request (``build_request``) and their types.
_REQUEST_FIELDS = {"model": str, "call": str, "file": str, "line": int, "name": str, "source": str, "globals": list,
                   "variables": bytes}


def handle_trace(context: Any, payload: Any) -> dict:
    """Run a ``trace`` request on ``context.model``; return the saved values and output.

    ``context`` is the worker's request context (``.model``, ``.policy``, ``.sources``).
    The block runs with the policy's builtins, so its imports obey the policy. The result
    is ``{"saved": {name: value}, "stdout": str, "stderr": str}``.
    """
    import capture

    request = _stored_request(context, payload)
    model = context.model
    _refuse_other_model(model, request["model"])
    call = _resolve_call(model, request["call"])
    policy_builtins = context.policy.builtins() if context.policy is not None else vars(builtins)

    # nnsight keeps per-process trace state (the saved set, nesting depth, source
    # caches): one trace at a time.
    with _run_lock:
        code = _compile_block(request)
        tracer = model.trace(fn=call)
        variables = capture.loads(
            request["variables"],
            policy=context.policy,
            persistent_load=_worker_objects(model, tracer),
        )
        tracer.args = tuple(variables.pop(_ARGS))
        tracer.kwargs = variables.pop(_KWARGS)
        global_values = {name: variables.pop(name) for name in request["globals"]}
        frame = _RequestFrame(
            request,
            {**global_values, "__builtins__": policy_builtins},
            {**variables, "__builtins__": policy_builtins},
        )
        compat.set_trace_frame(tracer, frame, code)
        with _captured_output() as (stdout, stderr):
            try:
                tracer.__exit__(None, None, None)
            except Exception as error:
                # The intervention-only traceback (the user's lines, not the model's
                # forward that was running around them), as nnsight stashes it.
                user_frames = compat.intervention_traceback(error)
                if user_frames is not None:
                    error.with_traceback(user_frames)
                if stdout.getvalue() or stderr.getvalue():
                    error.add_note("the traced block printed, before failing:\n" + stdout.getvalue() + stderr.getvalue())
                raise
    return {"saved": frame.f_locals.pushed, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def _refuse_other_model(model: Any, requested: str) -> None:
    from .models import identity

    hosted = identity(model.repo_id)
    if requested != hosted:
        raise TraceRefused(
            f"this worker hosts model {hosted!r}, but the trace is for model {requested!r}; "
            "start a worker for that model (runner.Worker(model=...)) or open the client "
            "model from the worker's spec (runner.models.path(spec))"
        )


def _compile_block(request: dict) -> types.CodeType:
    """Compile the block under the user's file name, at its original lines and columns.

    nnsight caches each file's source and each block compiled from it forever, keyed by
    file name; a worker outlives many requests whose files change, so those caches are
    reset and given this request's text, from which a nested block (``tracer.invoke``)
    is read back. Tracebacks then show the user's own file, lines and text.
    """
    filename, first = request["file"], request["line"]
    # `if 1:` takes the line above the block (its `with` line), so the block keeps its
    # indentation and every statement its line number.
    padded = "\n" * (first - 2) + "if 1:\n" + request["source"]
    code = compile(padded, filename, "exec").replace(co_name=request["name"])
    compat.reset_source_caches(filename, padded)
    # Into capture's sparse, bounded registry (dropped when the request ends), not a
    # padded copy of the file per block.
    from capture.source import Segment, register_lines
    register_lines(Segment(filename, first, 0, "def", request["source"], ()))
    return code


def _resolve_call(model: Any, name: str) -> Any:
    call = getattr(model, name, None)
    if not callable(call):
        raise TraceRefused(f"the model on this worker has no method {name!r} to trace")
    return call


def _worker_objects(model: Any, tracer: Any):
    """``persistent_load`` for capture: tokens become the worker's own objects."""
    envoys: dict = {}  # path -> envoy, listed on the first envoy or module token (most traces send none)

    def persistent_load(token: str) -> Any:
        if token == _MODEL:
            return model
        if token == _TRACER:
            return tracer
        if token == _TOKENIZER:
            return model.tokenizer
        for prefix, part in ((_ENVOY, lambda envoy: envoy), (_MODULE, compat.envoy_module)):
            if token.startswith(prefix):
                path = token[len(prefix):]
                if not envoys:
                    envoys.update((envoy.path, envoy) for envoy in model.modules())
                if path not in envoys:
                    raise TraceRefused(f"the worker's model has no module at {path!r}")
                return part(envoys[path])
        raise TraceRefused(f"unknown object token {token!r} in a trace request")

    return persistent_load


@contextlib.contextmanager
def _captured_output():
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        yield stdout, stderr


handlers.register(TRACE_REQUEST, handle_trace)


# --- opting in -----------------------------------------------------------------------

# Workers installed by `install`, innermost last; nnsight's own method while any is.
_installed_workers: list = []
_nnsight_backends: list = []


def install(worker: Any) -> None:
    """Make ``remote='local'`` on nnsight models run through ``worker``.

    Undone by `uninstall`; installs nest (a test can install its own worker inside a
    session that installed one). Other ``remote=`` values (NDIF, a host URL) are untouched.
    """
    if not _installed_workers:
        def route_local(original):
            def remote_backend(self, remote, blocking, job_id, verbose):
                if remote == "local":
                    return WorkerBackend(_installed_workers[-1])
                return original(self, remote, blocking, job_id, verbose)

            return remote_backend

        _nnsight_backends.append(compat.replace_remote_backend(route_local))
    _installed_workers.append(worker)


def uninstall() -> None:
    """Undo the latest `install`; nnsight's own ``remote='local'`` is back after the last.

    A no-op when nothing is installed.
    """
    if not _installed_workers:
        return
    _installed_workers.pop()
    if not _installed_workers:
        compat.restore_remote_backend(_nnsight_backends.pop())


def installed_worker() -> Any:
    """The worker ``remote='local'`` currently routes to, or ``None``."""
    return _installed_workers[-1] if _installed_workers else None
