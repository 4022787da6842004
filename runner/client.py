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
import os
import shutil
import socket as socket_module
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Container

import capture
import msgpack
import sandbox

from . import auth, errors, shm
from .errors import ProtocolError, WorkerCrashed, WorkerStartError, describe_exit, rebuild
from .handlers import MODEL, MODEL_TOKEN
from .protocol import DEFAULT_SHM_THRESHOLD, Connection, SharedRef
from .cli import DEFAULT_POLICY
from .supervisor import PACKAGE_ROOT, check_seconds

_OUTPUT_TAIL_LINES = 30
_HANDSHAKE_SECONDS = 30.0
# How long a Worker connected to someone else's server waits for it to come back.
DEFAULT_RECONNECT_SECONDS = 30.0


def _model_token(obj: Any) -> str | None:
    return MODEL_TOKEN if obj is MODEL else None


def _model_placeholder(token: str) -> Any:
    if token != MODEL_TOKEN:
        raise capture.BundleError(f"unknown object token {token!r} in a result")
    return MODEL


def encode_call(fn: Callable, args: tuple = (), kwargs: dict | None = None, *, policy: Any = None) -> bytes:
    """A call ``fn(*args, **kwargs)`` as bundle bytes, for ``Worker.run_bytes``.

    ``policy`` is the worker's policy (what it can import; a spec or ``Policy``), which
    decides what travels as source. ``runner.MODEL`` in the arguments is the model.
    """
    return capture.encode_variables(
        {"fn": fn, "args": tuple(args), "kwargs": dict(kwargs or {})},
        policy=_load_policy(policy) if policy is not None else None, persistent_id=_model_token,
    ).to_bytes()


def decode_result(data: bytes) -> Any:
    """The value in ``Worker.run_bytes``'s output, or raise the error it holds.

    The outcome is read as data only (``capture.DATA_ONLY``): nothing in it runs here.
    """
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


def _load_policy(spec: Any):
    return sandbox.Policy.load(spec if spec is not None else DEFAULT_POLICY)


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
    lease: shm.Buffer | None = None    # our memfd holding its large frames
    answered: bool = False             # its reply (or error, or miss) has been read
    raw_reply: bool = False            # run_bytes: hand back the outcome bytes


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
    The server-side settings apply only when this ``Worker`` starts the server.

    The server is authenticated before any request goes out (docs/RUNNER.md,
    "Authentication"). When the connection is lost, the call then running fails with
    ``WorkerCrashed`` and the next call recovers: a server this ``Worker`` started is
    started again (with a new secret); someone else's is reconnected to, waiting for it
    to come back for up to ``reconnect`` seconds.
    """

    def __init__(self, model: str = "tiny-gpt2", policy: Any = None, socket: str | None = None,
                 device: str = "auto", timeout: float | None = None, memory_limit: int | None = None,
                 confine: str = "best-effort", *, shm_threshold: int = DEFAULT_SHM_THRESHOLD,
                 start_timeout: float = 600.0, handlers: tuple[str, ...] = (),
                 reconnect: float = DEFAULT_RECONNECT_SECONDS, threads: int | None = None,
                 isolate_clients: bool = False):
        self.shm_threshold = shm_threshold
        self.reconnect = reconnect
        self.timeout = None if timeout is None else check_seconds(timeout, "timeout")
        self._server: subprocess.Popen | None = None
        self._server_output: collections.deque = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
        self._own_dir: str | None = None
        self._secret: bytes | None = None   # of the server this Worker started
        #: Whether the server took this client as its owner (it proved the secret).
        self.owner = False
        self._recovering = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        # Source digests the worker's store held after our last replies from it, and
        # the id of that store (a restarted worker has a new, empty one).
        self._known: set[str] = set()
        self._store_id: str | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        self._lost: str | None = None
        #: Bytes of request frames (bundle headers and tensor frames) this client has sent.
        self.bytes_sent = 0
        self._requests = self._resends = 0
        _open_workers.add(self)
        if socket is not None and _listening(socket):
            self.socket_path = os.path.abspath(socket)
        else:
            if socket is None:
                self._own_dir = tempfile.mkdtemp(prefix="sourcebox-")
                socket = os.path.join(self._own_dir, "worker.sock")
            self.socket_path = os.path.abspath(socket)
            self._start_args = (model, policy, device, timeout, memory_limit, confine, shm_threshold,
                                start_timeout, handlers, threads, isolate_clients)
            self._start_server(*self._start_args)
        self.policy = None
        try:
            self._connect()
            self.info = self._control("wait_ready")
            # What the worker can import decides what travels as source: its policy.
            self.policy = _load_policy(policy if policy is not None else self.info.get("policy"))
        except BaseException:
            self.close()
            raise

    # -- set-up ------------------------------------------------------------------------
    def _start_server(self, model, policy, device, timeout, memory_limit, confine, shm_threshold,
                      start_timeout, handlers, threads, isolate_clients) -> None:
        argv = [sys.executable, "-m", "runner", "serve", "--socket", self.socket_path, "--model", model,
                "--device", device, "--confine", confine, "--shm-threshold", str(shm_threshold),
                "--owner", str(os.getpid()), "--start-timeout", str(start_timeout)]
        if isolate_clients:
            argv.append("--isolate-clients")
        if policy is not None:
            argv += ["--policy", os.fspath(policy)]
        if timeout is not None:
            argv += ["--timeout", str(timeout)]
        if memory_limit is not None:
            argv += ["--memory-limit", str(memory_limit)]
        if handlers:
            argv += ["--handlers", ",".join(handlers)]
        if threads is not None:
            argv += ["--threads", str(threads)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), PACKAGE_ROOT]))
        # The secret travels through a pipe the server reads once: not in argv or the
        # environment, where other processes could read it.
        self._secret = auth.new_secret()
        secret_in, secret_out = os.pipe()
        try:
            os.write(secret_out, self._secret)
            os.close(secret_out)
            argv += ["--secret-fd", str(secret_in)]
            self._server = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, pass_fds=(secret_in,))
        finally:
            os.close(secret_in)
        self._server_pump = threading.Thread(target=self._pump_server_output, daemon=True, name="server-output")
        self._server_pump.start()
        deadline = time.monotonic() + 60
        while not _listening(self.socket_path):
            if self._server.poll() is not None or time.monotonic() > deadline:
                self._server.kill()
                self._server.wait()
                time.sleep(0.1)  # let the output pump catch the last lines
                raise WorkerStartError(
                    f"the worker server for {self.socket_path} exited before listening "
                    f"({describe_exit(self._server.returncode)}):\n" + "".join(self._server_output))
            time.sleep(0.02)

    def _pump_server_output(self) -> None:
        for raw in iter(self._server.stderr.readline, b""):
            line = raw.decode("utf-8", "replace")
            self._server_output.append(line)
            try:
                sys.stderr.write(line)
            except (OSError, ValueError):
                pass  # our own stderr is gone (interpreter shutdown); keep the tail

    def _connect(self) -> None:
        # The server is checked before anything is sent (auth.py): by its secret, or by uid
        # and directory where this client holds none.
        sock, secret = auth.connect(self.socket_path, self._secret)
        sock.settimeout(_HANDSHAKE_SECONDS)  # something listening there may not be a runner
        self._pool = shm.BufferPool()
        self._conn = Connection(sock, pool=self._pool, shm_threshold=self.shm_threshold)
        self._conn.greet(peer=f"the worker server at {self.socket_path}")
        welcome, self.owner = auth.client_handshake(self._conn, self.socket_path, secret)
        self.server_pid = welcome["server_pid"]
        sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_replies, daemon=True, name="worker-replies")
        self._reader.start()

    # -- requests ----------------------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` in the worker; return a Future of its result."""
        variables = {"fn": fn, "args": args, "kwargs": kwargs}

        def encode(known: Container[str]) -> capture.Bundle:
            return capture.encode_variables(variables, policy=self.policy, persistent_id=_model_token,
                                            known_sources=known)

        return self._submit("call", self.timeout, encode=encode)

    def call(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the worker and return its result.

        Put ``runner.MODEL`` where ``fn`` takes the model. User exceptions are raised
        here with the worker's traceback as their cause.
        """
        return self.submit(fn, *args, **kwargs).result()

    def request(self, kind: str, payload: Any, *, timeout: float | None = None) -> Any:
        """Send ``payload`` to the handler of request ``kind`` and return its result."""
        def encode(known: Container[str]) -> capture.Bundle:
            return capture.encode(payload, policy=self.policy, persistent_id=_model_token, label="payload",
                                  known_sources=known)

        return self._submit(kind, self.timeout if timeout is None else timeout, encode=encode).result()

    def run_bytes(self, data: bytes, kind: str = "call", *, timeout: float | None = None) -> bytes:
        """Run a request given as bundle bytes (``encode_call``); return outcome bytes.

        For job runners that carry payloads themselves (Celery, Dask, Ray): the outcome
        holds the result or the error, and ``decode_result`` turns it back into either,
        wherever it ends up. Runner failures (a crash, a timeout) are outcomes too.
        """
        return self._submit(kind, self.timeout if timeout is None else timeout, data=data).result()

    def _submit(self, kind: str, timeout: float | None, *, encode: Callable | None = None,
                data: bytes | None = None) -> concurrent.futures.Future:
        """Send a request given as an ``encode`` function (frames form) or as bundle
        bytes (``data``, bytes form: the reply is outcome bytes)."""
        self._recover_if_lost()
        form = "frames" if data is None else "bytes"
        meta = {"kind": kind, "form": form, "reply": form}
        if timeout is not None:
            meta["timeout"] = check_seconds(timeout, "timeout")
        entry = _Pending(concurrent.futures.Future(), meta, [], encode=encode, raw_reply=data is not None)
        if encode is None:
            entry.frames = [memoryview(data)]
        else:
            # Encoded here, so a CaptureError reaches the caller at once. The known set
            # may change meanwhile: a digest sent alone that the worker lacks is a miss.
            self._encode(entry, self._known)
        request_id = next(self._ids)
        with self._lock:
            if self._closed or self._lost:
                raise WorkerCrashed(self._lost or "this Worker is closed")
            self._pending[request_id] = entry
            self._requests += 1
        self._transmit(request_id, entry)
        return entry.future

    @staticmethod
    def _encode(entry: _Pending, known: Container[str]) -> None:
        bundle = entry.encode(known)
        entry.frames = [bundle.header, *bundle.frames]
        entry.source_digests = tuple(bundle.source_digests)

    def _transmit(self, request_id: int, entry: _Pending) -> None:
        frames = entry.frames
        try:
            lease = self._conn.send("request", request_id, entry.meta, frames)
        except BaseException as exc:
            with self._lock:
                self._pending.pop(request_id, None)
            if isinstance(exc, OSError):
                raise self._send_failed(exc) from None
            raise
        if lease is not None:
            # The reply may already have been read: then the buffer is free right away.
            with self._lock:
                answered = entry.answered
                entry.lease = None if answered else lease
            if answered:
                self._pool.release(lease)
        with self._lock:
            self.bytes_sent += sum(memoryview(f).nbytes for f in frames)

    def _control(self, kind: str) -> dict:
        self._recover_if_lost()
        entry = _Pending(concurrent.futures.Future(), {}, [])
        request_id = next(self._ids)
        with self._lock:
            if self._lost:
                raise WorkerCrashed(self._lost)
            self._pending[request_id] = entry
        try:
            self._conn.send(kind, request_id)
        except OSError as exc:
            with self._lock:
                self._pending.pop(request_id, None)
            raise self._send_failed(exc) from None
        return entry.future.result()

    def _send_failed(self, exc: OSError) -> WorkerCrashed:
        """The error for a send the server did not take; the next call recovers (the
        reader may not have seen the connection drop yet)."""
        reason = f"lost the connection to the worker server at {self.socket_path}: {exc}"
        with self._lock:
            self._lost = self._lost or reason
        return WorkerCrashed(reason)

    def status(self) -> dict:
        """The server's state: pids, model, device, policy, queue, restarts, memory..."""
        return self._control("status")

    def stats(self) -> dict:
        """This client's own counters: ``requests`` submitted, ``bytes_sent`` (request
        frames, resends included), ``resends`` (requests sent again with their source
        text after the worker answered ``miss``) and ``known_sources`` (source segments
        it believes the worker holds, so sends by digest alone)."""
        with self._lock:
            return {"requests": self._requests, "bytes_sent": self.bytes_sent, "resends": self._resends,
                    "known_sources": len(self._known)}

    def ping(self) -> float:
        """Round-trip time to the server in seconds."""
        started = time.perf_counter()
        self._control("ping")
        return time.perf_counter() - started

    # -- replies -----------------------------------------------------------------------
    def _read_replies(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                with self._lock:
                    entry = self._pending.pop(message.id, None)
                try:
                    if entry is None:
                        # Id 0 is the connection itself; any other unknown id answers a
                        # request already settled (or never made): nothing to do.
                        if message.kind == "error" and message.id == 0:
                            self._lost = str(rebuild(message.meta.get("error")))
                        continue
                    self._settle(message, entry)
                except Exception as exc:  # a malformed answer fails its own request, not the reader
                    if entry is not None and not entry.future.done():
                        entry.future.set_exception(errors.ProtocolError(
                            f"the worker server at {self.socket_path} sent an answer this client cannot "
                            f"read: {exc!r}"))
                finally:
                    message.close()
                    entry = None  # its future holds the result: no longer than the caller does
        except (ProtocolError, OSError) as exc:
            self._connection_lost(exc)

    def _settle(self, message, entry: _Pending) -> None:
        with self._lock:
            entry.answered = True
            lease, entry.lease = entry.lease, None
        if lease is not None:
            self._pool.release(lease)
        kind, future = message.kind, entry.future
        if kind in ("reply", "miss", "error"):  # answers to requests, which the worker stamps
            self._note_store(message.meta.get("sources"))
        if kind == "miss":
            self._miss(message, entry)
            return
        if kind == "reply":
            self._known.update(entry.source_digests)  # decoded there: its store has them now
            try:
                result = self._decode(message, entry)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
        elif kind == "error":
            info = message.meta.get("error", {})
            if entry.raw_reply:
                future.set_result(msgpack.packb({"error": info}, use_bin_type=True))
            else:
                future.set_exception(rebuild(info))
        else:  # a control answer: pong, status, ready, stopping
            future.set_result(message.meta)

    def _decode(self, message, entry: _Pending) -> Any:
        # Inline frames borrow the receive buffer: they get a private copy. Frames in
        # memfds become the result's memory without a copy: sealed by the worker, mapped
        # copy-on-write here, and unmapped when nothing views them any more.
        shared = iter(shm.map_result(message.shared(), message.fds))
        views = [next(shared) if isinstance(frame, SharedRef) else memoryview(bytearray(frame))
                 for frame in message.frames]
        if entry.raw_reply:
            return msgpack.packb({"result": bytes(views[0])}, use_bin_type=True)
        return capture.decode(views[0], views[1:], policy=capture.DATA_ONLY, persistent_load=_model_placeholder,
                              label="result")

    def _note_store(self, sources: Any) -> None:
        """Forget what a previous worker held once replies come from a new one (a
        restart). Replies arrive in the order the worker served them, so an old store's
        id never follows a new one's."""
        store_id = sources.get("id") if isinstance(sources, dict) else None
        if store_id is not None and store_id != self._store_id:
            self._known.clear()
            self._store_id = store_id

    def _miss(self, message, entry: _Pending) -> None:
        missing = message.meta.get("missing")
        if isinstance(missing, list):
            self._known.difference_update(m for m in missing if isinstance(m, str))
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
        with self._lock:
            entry.answered = False
            self._pending[message.id] = entry
            self._resends += 1
        # Sending from this thread could wait on the server while nobody reads.
        threading.Thread(target=self._resend, args=(message.id, entry), daemon=True, name="resend").start()

    def _resend(self, request_id: int, entry: _Pending) -> None:
        """Encode the request again with every source text (not only the missing ones,
        so texts evicted from the worker's store meanwhile cannot cause a second miss)."""
        try:
            self._encode(entry, ())
            self._transmit(request_id, entry)
        except BaseException as exc:
            with self._lock:
                self._pending.pop(request_id, None)
            entry.future.set_exception(exc)

    def _connection_lost(self, exc: BaseException) -> None:
        reason = self._lost or f"lost the connection to the worker server at {self.socket_path}"
        returncode = None
        if self._server is not None:
            try:
                returncode = self._server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        with self._lock:
            self._lost = reason
            pending, self._pending = list(self._pending.values()), {}
        for entry in pending:
            entry.future.set_exception(
                errors.WorkerStopped("the Worker was closed before this request finished") if self._closed
                else WorkerCrashed(reason, returncode, "".join(self._server_output).rstrip()))

    # -- recovery ----------------------------------------------------------------------
    def _recover_if_lost(self) -> None:
        """After the connection was lost: start a new server if this Worker started the
        last one, else reconnect to the socket once a server listens there again (for up
        to ``self.reconnect`` seconds). One thread recovers; the others wait for it."""
        if not self._lost or self._closed:
            return
        with self._recovering:
            if not self._lost or self._closed:
                return
            self._drop_connection()
            try:
                if self._server is not None:
                    self._restart_server()
                else:
                    self._reconnect()
                self.info = self._control("wait_ready")
            except BaseException:
                if not self._lost:  # connected, but not ready: leave it for the next call
                    self._lost = f"the worker server at {self.socket_path} did not become ready"
                raise

    def _drop_connection(self) -> None:
        """Let go of a lost connection and what belonged to it. Result tensors still
        viewing the old worker's memory stay valid (mappings outlive their close)."""
        self._conn.close()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=10)
        self._pool.close()
        self._known.clear()
        self._store_id = None

    def _restart_server(self) -> None:
        server = self._server
        if server.poll() is None:  # it dropped us but lives on: it is no longer ours to trust
            server.kill()
        server.wait()
        self._server_pump.join(timeout=5)
        server.stderr.close()
        if self._own_dir is not None and not os.path.isdir(self._own_dir):
            # The old server removed its directory on its way out: make a fresh one.
            self._own_dir = tempfile.mkdtemp(prefix="sourcebox-")
            self.socket_path = os.path.join(self._own_dir, "worker.sock")
        self._server_output.clear()
        self._start_server(*self._start_args)  # a new secret too
        self._connect()
        self._lost = None

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
        self._lost = None

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Disconnect; stop the server too if this ``Worker`` started it. Requests still
        waiting fail with ``WorkerStopped``."""
        if self._closed:
            return
        self._closed = True
        conn = getattr(self, "_conn", None)
        if self._server is not None and conn is not None and self.owner and self._server.poll() is None:
            try:
                conn.send("stop", 0)
                self._server.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if conn is not None:
            conn.close()
        # No thread of ours may outlive close(): one still alive while the interpreter
        # exits made torch's C++ teardown abort the process ("terminate called without an
        # active exception") in about one client exit in fifteen.
        reader = getattr(self, "_reader", None)
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=10)
        if self._server is not None:
            if self._server.poll() is None:
                self._server.kill()
            self._server.wait()
            self._server_pump.join(timeout=5)
            self._server.stderr.close()
        if hasattr(self, "_pool"):
            self._pool.close()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for entry in pending:
            entry.future.set_exception(errors.WorkerStopped("the Worker was closed before this request finished"))
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<runner.Worker {self.socket_path} server pid {getattr(self, 'server_pid', '?')}>"


# Workers still open at interpreter exit are closed then, so any server they started
# does not outlive the process.
_open_workers: "weakref.WeakSet[Worker]" = weakref.WeakSet()


@atexit.register
def _close_open_workers() -> None:
    for worker in list(_open_workers):
        worker.close()


def _listening(path: str) -> bool:
    probe = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


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
