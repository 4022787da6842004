"""The client side: ``Worker`` (a connection to a worker server), ``SandboxExecutor``, and
pure-bytes helpers for job runners that carry their own payloads.

A ``Worker`` starts a server (``python -m runner serve``) on a private socket, or
connects to one already listening at ``socket``. Calls are thread-safe and may overlap:
replies are matched to requests by id by a reader thread. Source the worker already
holds is sent by digest alone (docs/RUNNER.md, "Repeated code").
"""
from __future__ import annotations

import atexit
import collections
import concurrent.futures
import itertools
import math
import os
import platform
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Sequence

import capture
import msgpack

from . import envs, errors, shm
from .defaults import check_seconds
from .errors import WorkerCrashed, rebuild
from .frames import (Outcome, encode_call_frames, encode_payload, load_policy, model_placeholder as _model_placeholder,
                     outcome_bytes, outcome_of, result_view)
from .owned_server import OwnedServer, listening
from .protocol import (CLIENT, DEFAULT_SHM_THRESHOLD, ERROR, MISS, PING, REPLY, REQUEST, SERVER, STATUS, STOP,
                       WAIT_READY, answers)
from .server_connection import ServerConnection
from .source_memory import SourceMemory
# How long a Worker connected to someone else's server waits for it to come back.
DEFAULT_RECONNECT_SECONDS = 30.0


def encode_call(fn: Callable, args: tuple = (), kwargs: dict | None = None, *, policy: Any = None) -> bytes:
    """A call ``fn(*args, **kwargs)`` as bundle bytes, for ``Worker.run_bytes``.

    ``policy`` is the worker's policy (what it can import; a spec or ``Policy``), which
    decides what travels as source. ``runner.MODEL`` in the arguments is the model.
    """
    return encode_call_frames(fn, args, kwargs, policy=policy).to_bytes()


def decode_result(data: bytes) -> Any:
    """The value in ``Worker.run_bytes``'s output, or raise the error it holds.

    The outcome is read as data only (``capture.DATA_ONLY``): nothing in it runs here.
    """
    view = result_view(data)  # our own outcome bytes: the bundle is read in place, not copied out
    if view is not None:
        return capture.loads(view, policy=capture.DATA_ONLY, persistent_load=_model_placeholder, label="result")
    try:
        outcome = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack reports malformed input with assorted types
        raise ValueError(f"not an outcome from Worker.run_bytes: {exc}") from None
    if not isinstance(outcome, dict) or not ({"result"} == outcome.keys() or {"error"} == outcome.keys()):
        raise ValueError("not an outcome from Worker.run_bytes: expected a map with 'result' or 'error'")
    if "error" in outcome:
        raise rebuild(outcome["error"])
    return capture.loads(outcome["result"], policy=capture.DATA_ONLY, persistent_load=_model_placeholder,
                         label="result")


@dataclass(eq=False)
class _Pending:
    future: concurrent.futures.Future
    meta: dict
    frames: list
    # Encodes the request again, omitting the texts of the given source digests (None:
    # bytes from elsewhere, which cannot be encoded again).
    encode: Callable[[Container[str]], capture.Bundle] | None = None
    source_digests: tuple = ()         # every source segment the request names
    resent: bool = False               # sent again with all its text after a miss
    raw_reply: bool = False            # run_bytes: hand back the outcome bytes
    outcome: bool = False              # run_frames: hand back the Outcome, decoding nothing
    # What the frames view (capture's compact copy of a sliced tensor, say): the frames
    # are raw views that do not keep it alive themselves.
    keepalive: list = field(default_factory=list)


class Worker:
    """A long-lived sandboxed worker holding a model, as a context manager.

    ``model``: ``"tiny-gpt2"`` (embedded), a local Hugging Face directory, or ``"none"``
    for a worker that runs plain functions and loads no model. ``policy``: a profile name
    or policy file (default: sandbox's default profile). ``socket``: connect to the server
    listening there, or start one there if none is. ``device``: ``"cpu"``, ``"cuda"``,
    ``"auto"``. ``timeout``: seconds a request may run before the worker is killed and
    restarted; for a server this ``Worker`` starts, also that server's maximum (else the
    server's ``--timeout`` caps it). ``threads``: the worker's torch thread budget
    (``serve --threads``). ``memory_limit``: bytes of RSS (and of CUDA memory) past which the worker
    is killed and restarted. ``confine``: ``"best-effort"``, ``"required"`` or ``"off"``.
    ``isolate_clients``: a fresh worker whenever the next request is of another client
    than the last (tenants who must not share even one process; a worker start per switch).
    ``python``: run the worker on another interpreter (an environment's python from
    ``python -m runner env create``, or a version such as ``"3.12"`` whose interpreter has
    the worker's packages). ``profile``: simulate a server from its environment snapshot
    (``"ndif-env"``): its policy and a worker on its Python version (``python``, or the
    profile's environment).
    ``start_server``: ``False`` connects only to a server already listening at ``socket``
    and never starts one (``WorkerCrashed`` when none listens; on a lost connection it
    reconnects, within ``reconnect`` seconds, as to anyone else's server).
    The server-side settings apply only when this ``Worker`` starts the server.

    The server is authenticated before any request goes out (docs/RUNNER.md,
    "Authentication"). When the connection is lost, the call then running fails with
    ``WorkerCrashed`` and the next call recovers: a server this ``Worker`` started is
    started again (with a new secret); someone else's is reconnected to, waiting for it
    to come back for up to ``reconnect`` seconds.

    It composes the pieces of the client side: the server it started
    (``owned_server.OwnedServer``), its connection (``server_connection.ServerConnection``,
    with its ``leases.LeaseTable``) and what it believes the worker holds of its source
    (``source_memory.SourceMemory``).
    """

    def __init__(self, model: str = "tiny-gpt2", policy: Any = None, socket: str | None = None,
                 device: str = "auto", timeout: float | None = None, memory_limit: int | None = None,
                 confine: str = "best-effort", *, shm_threshold: int = DEFAULT_SHM_THRESHOLD,
                 start_timeout: float = 600.0, handlers: tuple[str, ...] = (),
                 reconnect: float = DEFAULT_RECONNECT_SECONDS, threads: int | None = None,
                 isolate_clients: bool = False, python: str | os.PathLike | None = None,
                 profile: str | None = None, start_server: bool = True):
        self.shm_threshold = shm_threshold
        self.reconnect = reconnect
        self.timeout = None if timeout is None else check_seconds(timeout, "timeout")
        self._server: OwnedServer | None = None
        self._link: ServerConnection | None = None
        #: Whether the server took this client as its owner (it proved the secret).
        self.owner = False
        self._recovering = threading.Lock()
        self._known = SourceMemory()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        #: Bytes of request frames (bundle headers and tensor frames) this client has sent.
        self.bytes_sent = 0
        self._requests = self._resends = self._bytes_in_place = 0
        _open_workers.add(self)
        self.socket_path = os.path.abspath(socket) if socket is not None else None
        self.policy = None
        if profile is not None:
            policy = profile if policy is None else policy
        try:
            running = socket is not None and listening(socket)  # asked once: both branches see one answer
            if not running and not start_server:
                raise WorkerCrashed(f"no worker server listens at {socket!r}, and start_server=False: this Worker "
                                    "only connects to a running one")
            if not running:
                # Another interpreter for the worker (docs/RUNNER.md, "Another Python"),
                # resolved and checked before a server starts.
                python = envs.simulation(profile, python) if profile is not None else \
                    python and envs.find_python(python)
                if python:
                    envs.check(python)
                self._server = OwnedServer(socket, _server_options(
                    model, policy, device, timeout, memory_limit, confine, shm_threshold, start_timeout,
                    handlers, threads, isolate_clients, python))
                self.socket_path = self._server.socket_path
            self._connect()
            self.info = self._control(WAIT_READY)
            # What the worker can import decides what travels as source: its policy.
            self.policy = load_policy(policy if policy is not None else self.info.get("policy"))
        except BaseException:
            self.close()
            raise

    @property
    def versions(self) -> dict:
        """The Python versions of this client, of the server and of its worker."""
        return {"client": platform.python_version(), "server": self.info.get("server_python"),
                "worker": self.info.get("python")}

    def _connect(self) -> None:
        # The server is checked before anything is sent (auth.py): by its secret, or by uid
        # and directory where this client holds none.
        self._known.forget()
        self._link = ServerConnection(
            self.socket_path, self._server.secret if self._server is not None else None,
            shm_threshold=self.shm_threshold, on_answer=self._settle, on_lost=self._failure)
        self.owner = self._link.owner
        self.server_pid = self._link.server_pid

    # -- requests ----------------------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` in the worker; return a Future of its result."""
        def encode(known: Container[str]) -> capture.Bundle:
            return encode_call_frames(fn, args, kwargs, policy=self.policy, known_sources=known)

        return self._submit("call", self.timeout, encode=encode)

    def call(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the worker and return its result.

        Put ``runner.MODEL`` where ``fn`` takes the model. User exceptions are raised
        here with the worker's traceback as their cause.
        """
        return self.submit(fn, *args, **kwargs).result()

    def request(self, kind: str, payload: Any = None, *, timeout: float | None = None,
                build: Callable[[Container[str]], tuple[Any, Sequence[str]]] | None = None) -> Any:
        """Send ``payload`` to the handler of request ``kind`` and return its result.

        ``build(known)`` instead of ``payload``: the payload for a worker holding the texts
        whose digests are ``known``, and the digests of the texts it keeps for later
        requests (a handler that keeps texts in ``context.sources`` and raises
        ``capture.MissingSources`` for one it lacks gets them again: ``build(())``).
        """
        def encode(known: Container[str]) -> capture.Bundle:
            return encode_payload(payload, known, policy=self.policy, build=build)

        return self._submit(kind, self.timeout if timeout is None else timeout, encode=encode).result()

    def run_bytes(self, data: bytes, kind: str = "call", *, timeout: float | None = None) -> bytes:
        """Run a request given as bundle bytes (``encode_call``); return outcome bytes.

        For job runners that carry payloads themselves (Celery, Dask, Ray): the outcome
        holds the result or the error, and ``decode_result`` turns it back into either,
        wherever it ends up. Runner failures (a crash, a timeout) are outcomes too.
        """
        return self._submit(kind, self.timeout if timeout is None else timeout, data=data).result()

    def run_frames(self, header: Any, frames: Any = (), kind: str = "call", *,
                   timeout: float | None = None) -> Outcome:
        """Run a request given as a bundle's header and frames (``encode_call_frames``);
        return the worker's answer as an ``Outcome``, undecoded.

        The pass-through for job runners: nothing of the request or the answer is decoded
        here, and no frame is copied beyond what the transport does for ``call``. A
        ``miss`` is handed back too (the caller resends with every source text); runner
        failures (a crash, a timeout) are ``error`` outcomes, like user errors.
        """
        return self._submit(kind, self.timeout if timeout is None else timeout, frames=[header, *frames]).result()

    def _submit(self, kind: str, timeout: float | None, *, encode: Callable | None = None,
                data: bytes | None = None, frames: list | None = None) -> concurrent.futures.Future:
        """Send a request given as an ``encode`` function (frames form), as bundle bytes
        (``data``, bytes form: the reply is outcome bytes) or as ready ``frames`` (the
        reply is an ``Outcome``)."""
        self._recover_if_lost()
        meta = {"kind": kind, "form": "frames" if data is None else "bytes", "reply": "frames"}
        if timeout is not None:
            meta["timeout"] = check_seconds(timeout, "timeout")
        entry = _Pending(concurrent.futures.Future(), meta, [], encode=encode, raw_reply=data is not None,
                         outcome=frames is not None)
        if frames is not None:
            entry.frames = frames
        elif encode is None:
            entry.frames = [memoryview(data)]
        else:
            # Encoded here, so a CaptureError reaches the caller at once. The known set
            # may change meanwhile: a digest sent alone that the worker lacks is a miss.
            self._encode(entry, self._known)
        request_id = next(self._ids)
        link = self._usable_link()
        link.expect(request_id, entry)
        with self._lock:
            self._requests += 1
        self._transmit(link, request_id, entry)
        return entry.future

    def _usable_link(self) -> ServerConnection:
        if self._closed:
            raise WorkerCrashed("this Worker is closed")
        return self._link

    @staticmethod
    def _encode(entry: _Pending, known: Container[str]) -> None:
        bundle = entry.encode(known)
        entry.frames = [bundle.header, *bundle.frames]
        entry.keepalive = bundle.keepalive
        entry.source_digests = tuple(bundle.source_digests)

    def _transmit(self, link: ServerConnection, request_id: int, entry: _Pending) -> None:
        frames = entry.frames
        in_place = link.send(REQUEST, request_id, entry.meta, frames)
        with self._lock:
            self.bytes_sent += sum(memoryview(f).nbytes for f in frames)
            self._bytes_in_place += in_place

    def _control(self, kind: str) -> dict:
        self._recover_if_lost()
        entry = _Pending(concurrent.futures.Future(), {}, [])
        request_id = next(self._ids)
        link = self._usable_link()
        link.expect(request_id, entry)
        link.send(kind, request_id)
        return entry.future.result()

    def status(self) -> dict:
        """The server's state: pids, model, device, policy, queue, restarts, memory..."""
        return self._control(STATUS)

    def stats(self) -> dict:
        """This client's own counters: ``requests`` submitted, ``bytes_sent`` (request
        frames, resends included), ``resends`` (requests sent again with their source
        text after the worker answered ``miss``) and ``known_sources`` (source segments
        it believes the worker holds, so sends by digest alone) and ``bytes_in_place`` (request
        frames that travelled in the transport memory they were made in, ``empty``: not copied)."""
        with self._lock:
            return {"requests": self._requests, "bytes_sent": self.bytes_sent, "resends": self._resends,
                    "known_sources": len(self._known), "bytes_in_place": self._bytes_in_place}

    def empty(self, shape, dtype=None) -> Any:
        """A CPU ``torch`` tensor of ``shape`` (uninitialized) in transport memory: passed in
        a request (it, or a view of all of it), its bytes travel as a handle, never copied.

        The worker reads it in place while the request runs: do not write to it until that
        request's result is back (``call`` returns, or ``submit``'s future is done). Writing
        to it afterwards changes nothing the worker returned: results arrive in memory of
        their own. The memory is freed when the tensor and its views are gone.
        """
        import torch

        dtype = torch.float32 if dtype is None else dtype
        count = math.prod(shape) if isinstance(shape, (tuple, list)) else int(shape)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(shm.allocate(nbytes), dtype=dtype, count=count).view(shape)

    def empty_array(self, shape, dtype=float) -> Any:
        """``empty`` for ``numpy``: an uninitialized ndarray in transport memory, same rules."""
        import numpy

        dtype = numpy.dtype(dtype)
        count = math.prod(shape) if isinstance(shape, (tuple, list)) else int(shape)
        if count * dtype.itemsize == 0:
            return numpy.empty(shape, dtype=dtype)
        return numpy.frombuffer(shm.allocate(count * dtype.itemsize), dtype=dtype, count=count).reshape(shape)

    def ping(self) -> float:
        """Round-trip time to the server in seconds."""
        started = time.perf_counter()
        self._control(PING)
        return time.perf_counter() - started

    # -- answers (on the connection's reader thread) ------------------------------------
    def _settle(self, message, entry: _Pending) -> None:
        kind, future = message.kind, entry.future
        if kind in answers(CLIENT, SERVER, REQUEST):  # the worker stamps these with its store
            self._known.note_store(message.meta.get("sources"))
        if entry.outcome and kind in answers(CLIENT, SERVER, REQUEST):
            future.set_result(outcome_of(message))
            return
        if kind == MISS:
            self._miss(message, entry)
            return
        if kind == REPLY:
            self._known.held(entry.source_digests)  # decoded there: its store has them now
            try:
                result = self._decode(message, entry)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
        elif kind == ERROR:
            info = message.meta.get("error", {})
            if entry.raw_reply:
                future.set_result(msgpack.packb({"error": info}, use_bin_type=True))
            else:
                future.set_exception(rebuild(info))
        else:  # a control answer: pong, status, ready, stopping
            future.set_result(message.meta)

    def _decode(self, message, entry: _Pending) -> Any:
        # Frames in memfds become the result's memory without a copy: sealed by the worker,
        # mapped copy-on-write here, and unmapped when nothing views them any more.
        outcome = outcome_of(message)
        if entry.raw_reply:
            return outcome_bytes(outcome)  # the one copy a bytes API forces
        return capture.decode(outcome.frames[0], outcome.frames[1:], policy=capture.DATA_ONLY,
                              persistent_load=_model_placeholder, label="result")

    def _miss(self, message, entry: _Pending) -> None:
        missing = message.meta.get("missing")
        self._known.missing(missing)
        if entry.encode is None or entry.resent:
            # A resend carries every text of the request, so a second miss cannot be
            # cured by sending again: fail instead of looping.
            what = "bytes from elsewhere cannot be encoded again" if entry.encode is None else \
                "it was already resent with all of its source text"
            entry.future.set_exception(errors.RunnerError(
                f"the worker asked for {len(missing) if isinstance(missing, list) else 'some'} source "
                f"segment(s) of this request that it does not hold, and {what}; the worker server at "
                f"{self.socket_path} is not behaving as this client expects: restart it "
                f"(python -m runner stop {self.socket_path}) and run the same sourcebox release on both sides"))
            return
        entry.resent = True
        link = self._link
        try:
            link.expect(message.id, entry)
        except WorkerCrashed as exc:
            entry.future.set_exception(exc)
            return
        with self._lock:
            self._resends += 1
        # Sending from this thread could wait on the server while nobody reads.
        threading.Thread(target=self._resend, args=(link, message.id, entry), daemon=True, name="resend").start()

    def _resend(self, link: ServerConnection, request_id: int, entry: _Pending) -> None:
        """Encode the request again with every source text (not only the missing ones,
        so texts evicted from the worker's store meanwhile cannot cause a second miss)."""
        try:
            self._encode(entry, ())
            self._transmit(link, request_id, entry)
        except BaseException as exc:
            entry.future.set_exception(exc)

    def _failure(self, reason: str) -> Callable[[], BaseException]:
        """What the requests still waiting on a lost connection fail with."""
        if self._closed:
            return lambda: errors.WorkerStopped("the Worker was closed before this request finished")
        returncode = None
        if self._server is not None:
            try:
                returncode = self._server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        tail = self._server.output_tail() if self._server is not None else ""
        return lambda: WorkerCrashed(reason, returncode, tail)

    # -- recovery ----------------------------------------------------------------------
    def _recover_if_lost(self) -> None:
        """After the connection was lost: start a new server if this Worker started the
        last one, else reconnect to the socket once a server listens there again (for up
        to ``self.reconnect`` seconds). One thread recovers; the others wait for it."""
        if self._closed or self._link is None or not self._link.lost:
            return
        with self._recovering:
            if self._closed or not self._link.lost:
                return
            self._link.close()
            try:
                if self._server is not None:
                    self._server.restart()  # a new secret too
                    self.socket_path = self._server.socket_path
                    self._connect()
                else:
                    self._reconnect()
                self.info = self._control(WAIT_READY)
            except BaseException:
                # Connected, but not ready: leave it for the next call.
                self._link.mark_lost(f"the worker server at {self.socket_path} did not become ready")
                raise

    def _reconnect(self) -> None:
        deadline = time.monotonic() + self.reconnect
        pause = 0.05
        while True:
            try:
                self._connect()
                break
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                if time.monotonic() + pause > deadline:
                    raise WorkerCrashed(
                        f"the worker server at {self.socket_path} is gone and did not come back within "
                        f"{self.reconnect:g}s ({exc.strerror}); start it again (python -m runner serve "
                        f"--socket {self.socket_path}) and call again") from None
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Disconnect; stop the server too if this ``Worker`` started it. Requests still
        waiting fail with ``WorkerStopped``."""
        if self._closed:
            return
        self._closed = True
        link, server = self._link, self._server
        if server is not None and link is not None and link.owner and server.alive():
            try:
                link.post(STOP)
                server.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if link is not None:
            link.close()
        if server is not None:
            server.close()
        if link is not None:
            link.fail_pending(lambda: errors.WorkerStopped("the Worker was closed before this request finished"))

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<runner.Worker {self.socket_path} server pid {getattr(self, 'server_pid', '?')}>"


def _server_options(model, policy, device, timeout, memory_limit, confine, shm_threshold, start_timeout,
                    handlers, threads, isolate_clients, python) -> list[str]:
    """``python -m runner serve`` flags for a server a ``Worker`` starts."""
    options = ["--model", model, "--device", device, "--confine", confine, "--shm-threshold", str(shm_threshold),
               "--start-timeout", str(start_timeout)]
    if isolate_clients:
        options.append("--isolate-clients")
    if policy is not None:
        options += ["--policy", os.fspath(policy)]
    if timeout is not None:
        options += ["--timeout", str(timeout)]
    if memory_limit is not None:
        options += ["--memory-limit", str(memory_limit)]
    if handlers:
        options += ["--handlers", ",".join(handlers)]
    if threads is not None:
        options += ["--threads", str(threads)]
    if python:
        options += ["--python", os.fspath(python)]
    return options


# Workers still open at interpreter exit are closed then, so any server they started
# does not outlive the process.
_open_workers: "weakref.WeakSet[Worker]" = weakref.WeakSet()


@atexit.register
def _close_open_workers() -> None:
    for worker in list(_open_workers):
        worker.close()


@dataclass(eq=False)
class _WorkItem:
    future: concurrent.futures.Future
    fn: Callable
    args: tuple
    kwargs: dict


class SandboxExecutor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose work runs in a sandboxed worker.

    ``SandboxExecutor(worker=existing)`` uses a ``Worker`` you manage; otherwise the
    keyword arguments start one (``SandboxExecutor(model="none")``) that ``shutdown``
    closes. Submitted calls wait here, where ``cancel()`` works, until one of the
    ``max_in_flight`` slots at the worker is free; a call handed to the worker is
    running and can no longer be cancelled.
    """

    def __init__(self, worker: Worker | None = None, *, max_in_flight: int = 1, **worker_options: Any):
        if worker is not None and worker_options:
            raise TypeError("pass either worker= or options to start one, not both")
        self.worker = worker if worker is not None else Worker(**worker_options)
        self._owns_worker = worker is None
        self._queue: collections.deque[_WorkItem] = collections.deque()
        self._max_in_flight = max_in_flight
        self._slots = threading.Semaphore(max_in_flight)
        self._wakeup = threading.Condition()
        self._shutdown = False
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True, name="sandbox-executor")
        self._dispatcher.start()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        with self._wakeup:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            item = _WorkItem(concurrent.futures.Future(), fn, args, kwargs)
            self._queue.append(item)
            self._wakeup.notify()
        return item.future

    def _dispatch(self) -> None:
        while True:
            with self._wakeup:
                while not self._queue and not self._shutdown:
                    self._wakeup.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            self._slots.acquire()
            try:
                remote = self.worker.submit(item.fn, *item.args, **item.kwargs)
            except BaseException as exc:
                self._slots.release()
                item.future.set_exception(exc)
                continue
            remote.add_done_callback(lambda done, item=item: self._finish(done, item))

    def _finish(self, done: concurrent.futures.Future, item: _WorkItem) -> None:
        self._slots.release()
        exc = done.exception()
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(done.result())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._wakeup:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft().future.cancel()
            self._wakeup.notify()
        if wait:
            self._wind_down()
        else:
            threading.Thread(target=self._wind_down, daemon=True, name="sandbox-executor-shutdown").start()

    def _wind_down(self) -> None:
        self._dispatcher.join()
        # Holding every slot means nothing is still running at the worker.
        for _ in range(self._max_in_flight):
            self._slots.acquire()
        for _ in range(self._max_in_flight):
            self._slots.release()
        if self._owns_worker:
            self.worker.close()
