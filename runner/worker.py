"""The worker process: loads the model once, enters the sandbox, then serves requests.

It is started by the supervisor (``runner.supervisor``), never by users directly, and
talks only to it, over one inherited Unix socket. Start-up order matters:

1. imports (libraries the sandbox would refuse to load later), with no thread but the main
   one: numpy's OpenBLAS is held to one thread, a model that must first be built is built
   in a child process,
2. ``sandbox.enter``: the one seam where confinement starts (seccomp, Landlock, rlimits, an
   unprivileged uid, scrubbed ``sys.path``); nothing user-supplied has run before it, and
   it refuses (``confine="required"``) if any other thread exists: Landlock, capabilities
   and the uid are per thread,
3. the model load, confined, with its directory granted read-only, and torch's thread pool
   started: the threads they start (progress bars, OpenMP, CUDA) inherit every layer,
4. a warm-up (the tokenizer once, one forward) and the hygiene baseline
   (``runner.hygiene``), then the ``ready`` message, then one request at a time; after
   each answer is sent the worker scrubs and checks itself, and its ``verdict`` says
   whether it must retire;
   end of the channel ends the process.

Each request's bundle is decoded by ``capture`` under the policy into fresh namespaces,
handed to its handler (``runner.handlers``), and the result encoded back. Source texts
the worker was sent are kept in a bounded ``SourceStore``, per client, so a client sends a segment's
digest alone the next time; a digest the store lacks is answered with ``miss``. Large frames
of the request are zero-copy views of the client's memfds, mapped for that request only
and let go of before the reply; large frames of the result go into a fresh memfd that is
sealed read-only and whose descriptor leaves with the reply (``runner.shm``).
"""
from __future__ import annotations

import argparse
import collections
import collections.abc
import ctypes
import faulthandler
import importlib
import importlib.util
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

import capture
import sandbox

from . import handlers, hygiene, weights
from .nnsight_compat import torch_module
from . import errors as errors_module
from .errors import BadMessage, ProtocolError, describe, failure
from .protocol import (ERROR, FAILED, MISS, PING, PONG, PROMOTE, READY, REPLY, REQUEST, STANDBY, STATS, STOP,
                       SUPERVISOR, VERDICT, WORKER, Connection, ConnectionClosed, SharedRef, kinds)
from .shm import RequestMemory, SealedWriter

_PR_SET_PDEATHSIG = 1
# Frames of our own machinery are not the user's: tracebacks skip them.
_OWN_DIRS = tuple(os.path.dirname(package.__file__) + os.sep for package in (capture, sandbox, handlers))
_GPU_REPORT_SECONDS = 0.5
_STANDBY_NICE = 10  # a standby's CPU priority until promoted (higher is lower)
# The source store's bound, in characters of source text (bytes, for ASCII source): room
# for a few hundred helper modules, small next to a model (docs/RUNNER.md, "Repeated code").
SOURCE_STORE_CHARS = 32 << 20


class SourceStore(collections.abc.MutableMapping):
    """Source texts by segment digest (``capture.decode``'s ``source_store``), least
    recently used dropped first once their total length passes ``max_chars``.

    capture checks each text against its digest before storing it, so no request can
    plant text under a digest that another request will use. ``id`` is new in every
    worker process: a client that sees it change forgets what it believed was held.
    """

    def __init__(self, max_chars: int = SOURCE_STORE_CHARS):
        self.max_chars = max_chars
        self.id = os.urandom(8).hex()
        self._texts: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._chars = 0
        self.hits = self.misses = 0

    def __getitem__(self, digest: str) -> str:
        try:
            text = self._texts[digest]
        except KeyError:
            self.misses += 1
            raise
        self.hits += 1
        self._texts.move_to_end(digest)
        return text

    def __setitem__(self, digest: str, text: str) -> None:
        if len(text) > self.max_chars:
            return  # it would push out everything else; it travels with its requests
        if digest in self._texts:
            self._texts.move_to_end(digest)
            return  # same digest, same text (capture checked it)
        self._texts[digest] = text
        self._chars += len(text)
        while self._chars > self.max_chars:
            _, dropped = self._texts.popitem(last=False)
            self._chars -= len(dropped)

    def __contains__(self, digest: object) -> bool:  # a look, not a use: no count, no refresh
        return digest in self._texts

    def __delitem__(self, digest: str) -> None:
        self._chars -= len(self._texts.pop(digest))

    def __iter__(self):
        return iter(self._texts)

    def __len__(self) -> int:
        return len(self._texts)

    def tenant(self, client: object) -> "_TenantStore":
        """The store as one client sees it: a digest another client sent never resolves."""
        return _TenantStore(self, f"{client}/")

    def keep_only(self, client: object) -> None:
        """Drop every text but ``client``'s (the worker serves another client next)."""
        prefix = f"{client}/"
        for digest in [key for key in self._texts if not key.startswith(prefix)]:
            del self[digest]

    def summary(self) -> dict:
        """What clients and ``status`` see: the store's id, size and hit counts."""
        return {"id": self.id, "entries": len(self._texts), "chars": self._chars,
                "max_chars": self.max_chars, "hits": self.hits, "misses": self.misses}


class _TenantStore(collections.abc.MutableMapping):
    """One client's part of the ``SourceStore`` (shared bound, separate digests)."""

    def __init__(self, store: SourceStore, prefix: str):
        self._store, self._prefix = store, prefix

    def __getitem__(self, digest: str) -> str:
        return self._store[self._prefix + digest]

    def __setitem__(self, digest: str, text: str) -> None:
        self._store[self._prefix + digest] = text

    def __delitem__(self, digest: str) -> None:
        del self._store[self._prefix + digest]

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and self._prefix + digest in self._store

    def __iter__(self):
        return (key[len(self._prefix):] for key in list(self._store) if key.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _ClientDestination:
    """Where results go: the client, which has every module the worker could name, so
    objects from any module travel by reference."""

    name = "client"

    def provides(self, module: str) -> bool:
        return True


class RequestLoop:
    """The worker's side of its channel: one request at a time, each decoded, handed to its
    handler and answered (``serve``). Not the client's ``runner.Worker``."""

    def __init__(self, conn: Connection, context: handlers.Context, sources: SourceStore):
        self.conn = conn
        self.context = context
        self.sources = sources
        self._destination = _ClientDestination()
        self.hygiene: hygiene.Baseline | None = None  # set once start-up is over
        self._tenant: str | None = None  # the client whose texts and code the worker holds

    # -- tokens standing for the model -------------------------------------------------
    def _persistent_load(self, token: str):
        if token != handlers.MODEL_TOKEN:
            raise capture.BundleError(f"unknown object token {token!r} in a request")
        if self.context.model is None:
            raise LookupError("this worker hosts no model (started with --model none); "
                              "start one with a model to use runner.MODEL")
        return self.context.model

    def _persistent_id(self, obj):
        if obj is self.context.model and obj is not None:
            return handlers.MODEL_TOKEN
        return None

    # -- the loop ----------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except ConnectionClosed:
                return
            except BadMessage as exc:  # only the supervisor talks to us; still, fail just this one
                self.conn.send(ERROR, exc.request_id or 0, {"error": failure(errors_module.RUNNER, str(exc))})
                continue
            if message.kind == REQUEST:
                self._run(message)
                continue
            message.close()  # only requests carry memory
            if message.kind == PING:
                self.conn.send(PONG, message.id)
            elif message.kind == STOP:
                return
            else:
                self.conn.send(ERROR, message.id, {"error": failure(
                    errors_module.RUNNER, f"the worker got an unknown message kind {message.kind!r} (expected "
                                          f"{', '.join(kinds(SUPERVISOR, WORKER))})")})

    def _run(self, message) -> None:
        memory = RequestMemory()
        try:
            kind, meta, bundle = self._answer(message, memory)
        finally:
            message.close()
        # Large reply frames are copied into their memfd before the request's memory is
        # let go of (a result may view it); then nothing of the client's remains mapped.
        try:
            frames = [] if bundle is None else \
                [bundle.to_bytes()] if message.meta.get("reply") == "bytes" else [bundle.header, *bundle.frames]
            staged = self.conn.stage(frames, own=True)
        except BaseException as exc:
            kind, meta = ERROR, {"error": describe(exc, skip_dirs=_OWN_DIRS), "sources": self.sources.summary()}
            staged = self.conn.stage([])
        frames = bundle = None
        memory.release()
        capture.release_lines()  # what this request shipped is not kept for the next one
        try:
            buffer = self.conn.send_staged(kind, message.id, meta, staged)
        except (TypeError, ValueError, OverflowError) as exc:
            # The reply could not be encoded (nothing of it was sent): say so instead,
            # in a reply that always encodes, and go on serving.
            buffer = self.conn.send(ERROR, message.id, {"error": failure(
                errors_module.RUNNER, errors_module.cut(
                    f"the worker could not send its {kind} to this request: {type(exc).__name__}: {exc}; "
                    "return (or raise with) plain values of a reasonable size")),
                "sources": self.sources.summary()})
        if buffer is not None:
            self.conn.pool.release(buffer)
        # The hygiene runs after the answer is out, so the client does not wait for it; the
        # supervisor sends nothing more before this verdict, so no request meets a worker
        # that the last one changed.
        retire = self.hygiene.after_request() if self.hygiene is not None else None
        if retire:  # the supervisor replaces this worker before the next request runs
            print(f"sourcebox worker {os.getpid()}: request {message.id} of client {message.meta.get('client')} "
                  f"changed the worker, which retires: {retire}", file=sys.stderr, flush=True)
        self.conn.send(VERDICT, message.id, {"retire": retire} if retire else {})

    def _answer(self, message, memory: RequestMemory) -> tuple[str, dict, capture.Bundle | None]:
        """The reply's kind, metadata and result bundle (which keeps the storages its
        frames view alive); nothing of the request outlives it but what user code kept."""
        meta = message.meta
        try:
            handler = handlers.lookup(meta.get("kind"))
            # Inline frames borrow the receive buffer, which the next message reuses: they
            # get a private copy (writable, so capture need not copy again); memfd frames
            # are the client's memory, mapped for this request, and stay zero-copy.
            shared = iter(memory.views(message.shared(), message.fds))
            request_frames = [next(shared) if isinstance(frame, SharedRef) else memoryview(bytearray(frame))
                              for frame in message.frames]
            try:
                payload = self._decode(meta.get("form"), request_frames, meta.get("client"))
                result = handler(self.context, payload)
            except capture.MissingSources as missing:
                # Answered, never an error: the client encodes the request again with
                # those texts and resends it (the decode, or a handler's own texts).
                return MISS, {"missing": missing.digests, "sources": self.sources.summary()}, None
            bundle = capture.encode(result, policy=self._destination, persistent_id=self._persistent_id,
                                    label="result")
        except BaseException as exc:  # user code may raise anything, PolicyKill included
            return ERROR, {"error": describe(exc, skip_dirs=_OWN_DIRS), "sources": self.sources.summary()}, None
        return REPLY, {"sources": self.sources.summary()}, bundle

    def _decode(self, form, frames, client):
        """Decode a request of ``client`` with its own part of the source store and of the
        compile cache (one shared part with the test-only switch that turns isolation off,
        ``runner.hygiene.DISABLED``)."""
        tenant = "" if hygiene.DISABLED else str(client)
        if tenant != self._tenant and not hygiene.DISABLED:
            # Another client's source texts and compiled code would stay live objects here,
            # which code of this request could find (gc.get_objects): drop them on a switch.
            self.sources.keep_only(tenant)
            capture.clear_caches()  # compiled code and load plans
            self._tenant = tenant
        store = self.sources if hygiene.DISABLED else self.sources.tenant(tenant)
        self.context.sources = store
        if form == "bytes":
            if len(frames) != 1:
                raise BadMessage(f"a request in bytes form has one frame, not {len(frames)}")
            try:
                return capture.loads(frames[0], policy=self.context.policy, persistent_load=self._persistent_load,
                                     source_store=store, tenant=tenant)
            except capture.MissingSources as missing:
                # Bytes were encoded elsewhere (a job runner's payload): nobody here can
                # encode them again with the text, so this is the request's error.
                raise capture.BundleError(
                    f"{len(missing.digests)} source segment(s) of this bytes request were sent by digest "
                    "only and this worker does not hold them; encode the call with runner.encode_call, "
                    "which always includes the source text") from None
        if form != "frames" or not frames:
            raise BadMessage(f"unknown request form {form!r} (expected 'frames' or 'bytes')")
        return capture.decode(frames[0], frames[1:], policy=self.context.policy,
                              persistent_load=self._persistent_load, source_store=store, tenant=tenant)

    def report_gpu_memory(self, torch) -> None:
        """Send the CUDA memory reserved by this process every half second, so the
        supervisor can hold it to the memory limit even while a request runs."""
        while True:
            time.sleep(_GPU_REPORT_SECONDS)
            try:
                self.conn.send(STATS, 0, {"gpu": torch.cuda.memory_reserved()})
            except OSError:
                return


def confinement_summary(report: sandbox.Report) -> str:
    """The sandbox report in a few words, for the one line logged per worker start."""
    if report.confine == "off":
        return "sandbox: OS confinement OFF (confine='off'): user code has this process's full access"
    missing = [name for name in report.layers if not report.active(name)]
    summary = f"sandbox: {len(report.layers) - len(missing)}/{len(report.layers)} layers active"
    return summary + (f", missing {', '.join(missing)}" if missing else "")


def _die_with_parent(parent_pid: int) -> None:
    """Be killed when the supervisor dies, even if this process is stuck in C code."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _model_directory(spec: str) -> str | None:
    """The model's directory (``None`` for spec ``none``). An embedded model not built yet
    is built in a child process: the build's threads must not exist here at enter."""
    if spec == "none":
        return None
    from . import models

    directory = models.path(spec, build=False)
    if directory is None:
        subprocess.run([sys.executable, "-c", "import sys, runner.models; runner.models.path(sys.argv[1])", spec],
                       stdin=subprocess.DEVNULL, stdout=sys.stderr, check=True)
        directory = models.path(spec, build=False)
    return directory


def _load_model(directory: str | None, device: str):
    """The model in ``directory`` (``None``: no model) and the device it is on."""
    if directory is None:
        return None, "cpu" if device == "auto" else device
    from . import models

    model = models.load(directory, device)
    parameter = next(torch_module(model).parameters(), None)
    return model, str(parameter.device) if parameter is not None else device


def _protect_parameters(model) -> weights.ReadOnlyParameters | None:
    """Make the model's CPU parameters read-only (``runner.weights``), except with the
    test-only switch that turns the between-request isolation off."""
    module = torch_module(model)
    torch = sys.modules.get("torch")
    if hygiene.DISABLED or torch is None or not isinstance(module, torch.nn.Module):
        return None
    return weights.protect(module, torch)


def _start_thread_pool(torch) -> None:
    """Start torch's intra-op (OpenMP) pool now, confined like every thread: it then exists
    before user code can use up the task bound, and libgomp ends the process when it cannot
    create its threads."""
    torch.zeros(1 << 20).add_(1)  # past the parallel grain size: every pool thread starts


def _warm_up(model) -> None:
    """Run the tokenizer and one forward now: the pools and caches they start on first use
    (the tokenizer's threads, lazily set attributes) then belong to start-up, and the first
    request does not look like one that changed the worker (``runner.hygiene``)."""
    if model is None:
        return
    import torch

    tokenizer = getattr(model, "tokenizer", None)
    inputs = tokenizer("sourcebox", return_tensors="pt") if tokenizer is not None else \
        {"input_ids": torch.zeros((1, 1), dtype=torch.long)}
    module = torch_module(model)
    parameter = next(module.parameters(), None)
    with torch.no_grad():
        module(**{key: value.to(parameter.device) if parameter is not None else value
                         for key, value in inputs.items()})


def _import_extensions(extra: list[str]) -> None:
    for name in (*handlers.EXTENSIONS, *extra):
        if name in handlers.EXTENSIONS and importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runner.worker",
                                     description="sourcebox worker process (started by the supervisor)")
    parser.add_argument("--channel-fd", type=int, required=True, help="inherited socket to the supervisor")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--policy", default=None)
    parser.add_argument("--confine", default="best-effort", choices=("best-effort", "required", "off"))
    parser.add_argument("--handlers", default="", help="comma-separated modules that register request kinds")
    parser.add_argument("--shm-threshold", type=int, required=True)
    parser.add_argument("--scratch", required=True, help="the one directory user code may write")
    parser.add_argument("--threads", type=int, required=True, help="threads torch's (OpenMP, MKL) pools may use")
    parser.add_argument("--standby", action="store_true",
                        help="import and confine at a lower CPU priority, then wait for 'promote' to load the model")
    parser.add_argument("--replaces", type=int, action="append", default=[],
                        help="pid of the worker this standby will replace (its tasks are not counted in the bound)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _die_with_parent(args.parent_pid)
    # A fault (a request writing to the read-only parameters, ``runner.weights``) prints
    # the Python lines that made it into the output tail the client's WorkerCrashed carries.
    faulthandler.enable()
    # numpy's OpenBLAS starts its pool when loaded (through torch, below): held to one
    # thread so that this one is alone at sandbox.enter. torch's pool starts at first use.
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    # The server's thread budget (``serve --threads``), read by torch when its pools start:
    # several workers on few cores must not each start one thread per core.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    sock = socket.socket(fileno=args.channel_fd)
    sources = SourceStore()
    conn = Connection(sock, pool=SealedWriter(), shm_threshold=args.shm_threshold)
    if args.standby:
        # Started ahead of need, next to a worker that serves: yield the CPU to it. The
        # supervisor restores the priority on promotion, before any other thread exists.
        os.nice(_STANDBY_NICE)
    try:
        conn.greet(peer="the supervisor")
        try:
            started = time.monotonic()
            policy = sandbox.Policy.load(args.policy)
            _import_extensions([name for name in args.handlers.split(",") if name])
            model_dir = _model_directory(args.model)
            report = sandbox.enter(policy, scratch=args.scratch, read_paths=(model_dir,) if model_dir else (),
                                   confine=args.confine, replaces=args.replaces)
            if os.getppid() != args.parent_pid:  # it died while the uid change had disarmed PDEATHSIG
                os._exit(1)
            if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
                # Without a model too, confined as a model load is: torch's import patches
                # stdlib modules and registers picklers, which after the baseline would look
                # like tampering (runner.hygiene) and retire the worker on first use of torch.
                importlib.import_module("torch")
            if args.standby:
                # Imported and confined exactly as any worker; the rest (model load,
                # warm-up, hygiene baseline) waits until a restart needs this one.
                conn.send(STANDBY, 0, {"pid": os.getpid()})
                promotion = conn.recv()
                promotion.close()
                if promotion.kind != PROMOTE:
                    return 0
                started = time.monotonic()
            model, device = _load_model(model_dir, args.device)
            read_only = _protect_parameters(model)
            if "torch" in sys.modules:
                _start_thread_pool(sys.modules["torch"])
            _warm_up(model)
            loaded = time.monotonic() - started
        except BaseException as exc:
            conn.send(FAILED, 0, {"error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc()})
            return 3
        loop = RequestLoop(conn, handlers.Context(model=model, policy=policy, device=device, model_spec=args.model),
                        sources)
        if device.startswith("cuda"):
            import torch

            threading.Thread(target=loop.report_gpu_memory, args=(torch,), daemon=True,
                             name="gpu-memory").start()
        if not hygiene.DISABLED:
            loop.hygiene = hygiene.Baseline(model, scratch=args.scratch, read_only=read_only)
        # The supervisor logs one line per start (``confinement``); the full report is in
        # its status (``python -m runner status``) and its log with ``serve --verbose``.
        conn.send(READY, 0, {
            "pid": os.getpid(), "device": device, "policy": policy.name, "model": args.model,
            "sandbox": str(report), "confinement": confinement_summary(report), "load_seconds": loaded,
            "kinds": handlers.kinds(), "sources": sources.summary(), "python": platform.python_version(),
        })
        loop.serve()
        return 0
    except (ProtocolError, OSError) as exc:
        print(f"sourcebox worker {os.getpid()}: connection to the supervisor failed: {exc}",
              file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: it would wait for non-daemon threads user code left running, and the
    # worker must end when its channel does.
    os._exit(status)
