"""The supervisor: the process behind a worker socket (``python -m runner serve``).

Clients connect to the supervisor, never to the worker. It owns the listening socket
and the request queue, so a worker crash loses nothing but the request that was
running. It

- starts the worker (``runner.worker``) over a private socket pair and waits for it to be
  ready; restarts it when it dies, hangs (no answer to a ping), runs a request past its
  time limit, or grows past the memory limit (RSS via psutil; CUDA memory as the worker
  reports it);
- queues requests per client and takes them round-robin across clients, one at a time;
- forwards requests and replies (``miss`` answers too: repeated code is deduplicated
  between the client and the worker's source store). Large frames are not touched: their
  memfd descriptors pass through unmapped, and the supervisor closes its copies once
  answered (or when their sender or receiver is gone), so it holds no one's memory;
- proves its secret to every client and takes ``stop`` only from its owner (``auth``);
- trusts nothing on the worker's channel, where user code can write: each message must
  arrive whole within ``_CHANNEL_READ_SECONDS`` and answer the request being run (its
  random id, an answer's kind), or the worker is killed as compromised.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import glob
import hmac
import itertools
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

import msgpack
import psutil

from . import auth
from . import errors
from . import shm
from .errors import BadMessage, ProtocolError, ProtocolVersionError, cut, describe_exit, failure
from .protocol import (DEFAULT_SHM_THRESHOLD, GREETING_MAGIC, PROTOCOL_VERSION, Connection, ConnectionClosed, Message,
                       SharedRef)

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How often the scheduler wakes to check the worker's memory, deadline and health.
_POLL_SECONDS = 0.05
_PING_INTERVAL = 5.0
_PING_TIMEOUT = 10.0
_STOP_GRACE = 10.0
_TAIL_LINES = 30
# Limits (docs/RUNNER.md, "Limits"): what one request or one connection may hold of the
# server, each checked before memory is given or a thread waits.
DEFAULT_TIMEOUT = 600.0            # --timeout: the most a request may run; a client may ask less
DEFAULT_MAX_CLIENTS = 64           # --max-clients: connections at once, handshaking ones included
DEFAULT_MAX_QUEUED_BYTES = 256 << 20  # --max-queued-bytes: per client, also its largest message
DEFAULT_HANDSHAKE_SECONDS = 10.0   # --handshake-timeout: greeting and hello of a new connection
DEFAULT_SEND_SECONDS = 30.0        # --send-timeout: a peer that does not read for this long is dropped
MAX_QUEUED_FDS = 256               # descriptors queued per client (a request carries up to 8)
MAX_OUTBOX_BYTES = 64 << 20        # replies waiting to go out to one client
MAX_KIND_CHARS = 256               # a request kind's name
MAX_LINE_CHARS = 4096              # one line of the worker's output, as logged and in tails
_SLOT_WAIT = 0.5                   # a new connection at the cap waits this long for a slot
_REFUSED_GRACE = 1.0               # a refused connection is held this long so it can read why
_ACCEPT_BACKOFF = (0.05, 2.0)      # first and longest pause after a failed accept (EMFILE...)
_RESTART_ATTEMPTS = 3
# A message the worker has begun must be whole within this (1 GiB inline at 200 MB/s):
# user code can write part of one on the channel and stop.
_CHANNEL_READ_SECONDS = 5.0
# What answers what on the worker's channel.
_ANSWERS = {"request": ("reply", "error", "miss"), "ping": ("pong",), "start": ("ready", "failed")}


class _Outbox:
    """Messages to one client, sent by a thread of its own, so that a client that stops
    reading holds up no one: not the scheduler, not other clients. Bounded: past
    ``MAX_OUTBOX_BYTES`` waiting (beyond a first answer, which may be as large as a message
    may be), or a send stuck for the send timeout (``SO_SNDTIMEO``), the client is dropped
    (``on_fail``). A posted ``Message`` (a forwarded reply) is the
    outbox's to close, sent or not."""

    def __init__(self, conn: Connection, on_fail, name: str):
        self._conn, self._on_fail = conn, on_fail
        self._cond = threading.Condition()
        self._items: collections.deque = collections.deque()
        self._bytes = 0
        self._sending = False
        self._closed = False
        threading.Thread(target=self._run, daemon=True, name=name).start()

    def post(self, kind: str, request_id: int, meta: dict | None = None, message: Message | None = None) -> None:
        frames = message.frames if message is not None else []
        try:
            size = len(msgpack.packb(meta or {}, use_bin_type=True)) + \
                sum(memoryview(f).nbytes for f in frames if not isinstance(f, SharedRef))
        except (TypeError, ValueError, OverflowError):
            size = 0  # sending fails the same way, and says so
        with self._cond:
            # One answer of any size the protocol allows may wait; more may not pile up.
            if not self._closed and (self._bytes == 0 or self._bytes + size <= MAX_OUTBOX_BYTES):
                self._items.append((kind, request_id, meta, message, size))
                self._bytes += size
                self._cond.notify()
                return
            full = not self._closed
        if message is not None:
            message.close()
        if full:
            self._on_fail(f"more than {MAX_OUTBOX_BYTES} bytes of replies waited for it to read them")

    def close(self, flush_seconds: float = 0.0) -> None:
        """Stop; what is still waiting after ``flush_seconds`` is dropped."""
        deadline = time.monotonic() + flush_seconds
        with self._cond:
            while (self._items or self._sending) and not self._closed and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            self._closed = True
            dropped, self._items = list(self._items), collections.deque()
            self._cond.notify_all()
        for item in dropped:
            if item[3] is not None:
                item[3].close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                kind, request_id, meta, message, size = self._items.popleft()
                self._sending = True
            try:
                if message is None:
                    self._conn.send(kind, request_id, meta)
                else:
                    self._conn.send(kind, request_id, meta, message.frames, message.fds)
            except (TypeError, ValueError, OverflowError) as exc:  # nothing went out: say why instead
                try:
                    self._conn.send("error", request_id, {"error": failure(errors.RUNNER, cut(
                        f"the server could not send its {kind!r} answer: {type(exc).__name__}: {exc}"))})
                except OSError:
                    self._fail("a send to it failed")
                    return
            except OSError as exc:
                self._fail(f"a send to it failed or took longer than the send timeout ({exc.strerror or exc})")
                return
            finally:
                if message is not None:
                    message.close()
                with self._cond:
                    self._bytes -= size
                    self._sending = False
                    self._cond.notify_all()

    def _fail(self, why: str) -> None:
        self.close()
        self._on_fail(why)


@dataclass(eq=False)
class ClientSession:
    id: int
    conn: Connection
    pid: int
    queue: collections.deque = field(default_factory=collections.deque)
    alive: bool = True
    nonces: tuple = (b"", b"")  # the client's and ours, from the hello and the welcome
    owner: bool = False         # it proved it holds the server's secret
    rerun: set = field(default_factory=set)  # ids of its requests already run a second time
    outbox: _Outbox | None = None
    queued_bytes: int = 0       # of its queued requests (headers and inline frames)
    queued_fds: int = 0

    def post(self, kind: str, request_id: int, meta: dict | None = None, message: Message | None = None) -> None:
        self.outbox.post(kind, request_id, meta, message)


@dataclass(eq=False)
class WorkerHandle:
    popen: subprocess.Popen
    conn: Connection
    scratch: str
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_TAIL_LINES))
    info: dict = field(default_factory=dict)
    pump: threading.Thread | None = None
    gpu_bytes: int | None = None
    last_ping: float = 0.0
    watch: "_ChannelDeadline | None" = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output_tail(self) -> str:
        return "".join(self.tail).rstrip()


class _WorkerLost(Exception):
    """The worker died or was killed; ``category`` and ``reason`` say how. ``rerun``: the
    request running then is not to blame and runs again, once, on the next worker."""

    def __init__(self, category: str, reason: str, *, rerun: bool = False):
        super().__init__(reason)
        self.category = category
        self.reason = reason
        self.rerun = rerun


class _ChannelDeadline:
    """Bounds blocking reads of the worker's channel without touching how they read: past
    the deadline the channel is shut down under the read, which then ends like a dead
    worker's, and ``tripped`` says why. One thread per worker."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self.tripped = False
        threading.Thread(target=self._run, daemon=True, name="channel-deadline").start()

    @contextlib.contextmanager
    def bound(self, seconds: float):
        with self._cond:
            self._deadline = time.monotonic() + seconds
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                elif time.monotonic() < self._deadline:
                    self._cond.wait(self._deadline - time.monotonic())
                else:
                    self.tripped = True
                    self._deadline = None
                    try:
                        self._sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


class StartFailed(Exception):
    """The worker could not start; the message holds its error and output."""


#: Worker scratch directories are named after their server, so that a later server can
#: remove those whose server was killed before it could (``kill -9``).
_SCRATCH_PREFIX = "sourcebox-scratch-"


def _sweep_orphan_scratch() -> list[str]:
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), _SCRATCH_PREFIX + "*")):
        owner = os.path.basename(path)[len(_SCRATCH_PREFIX):].partition("-")[0]
        if owner.isdigit() and not shm.alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class Supervisor:
    """Serve ``socket_path`` until stopped (``serve()`` returns the exit status)."""

    def __init__(self, socket_path: str, *, model: str = "tiny-gpt2", device: str = "auto",
                 policy: str | None = None, confine: str = "best-effort", timeout: float = DEFAULT_TIMEOUT,
                 memory_limit: int | None = None, shm_threshold: int = DEFAULT_SHM_THRESHOLD,
                 handlers: tuple[str, ...] = (), start_timeout: float = 600.0,
                 owner_pid: int | None = None, secret: bytes | None = None, threads: int | None = None,
                 max_clients: int = DEFAULT_MAX_CLIENTS, max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_SECONDS, send_timeout: float = DEFAULT_SEND_SECONDS,
                 trust_worker_channel: bool = False, isolate_clients: bool = False, log=sys.stderr):
        self.socket_path = os.path.abspath(socket_path)
        # Given by the Worker that starts us, or made here and written beside the socket.
        self._secret = secret if secret is not None else auth.new_secret()
        self._secret_file = secret is None
        # TEST ONLY (--test-only-trust-worker-channel, tests/test_boundary_peer.py's
        # controls): read the worker's channel without deadline, with predictable ids, and
        # forward whatever matches an id, as before these checks existed.
        self._trust_worker_channel = trust_worker_channel
        self.model, self.device, self.policy, self.confine = model, device, policy, confine
        self.timeout, self.memory_limit = timeout, memory_limit
        self.threads = threads if threads is not None else default_threads()
        self.max_clients, self.max_queued_bytes = max_clients, max_queued_bytes
        self.handshake_timeout, self.send_timeout = handshake_timeout, send_timeout
        self._connections = 0  # accepted and not yet gone, handshaking ones included
        self._refused: collections.deque = collections.deque()  # (socket, when to close it)
        self._refusals, self._refusal_logged = 0, float("-inf")
        self.shm_threshold, self.handlers, self.start_timeout = shm_threshold, handlers, start_timeout
        self.owner_pid = owner_pid
        # A fresh worker whenever the next request is of another client (--isolate-clients).
        self.isolate_clients = isolate_clients
        self._last_client: int | None = None  # whom the current worker served
        self._owner_checked = 0.0
        self.log = log
        self.worker: WorkerHandle | None = None
        self.state = "starting"
        self.started_at = time.time()
        self.served = self.restarts = self.retirements = 0
        self.last_crash: str | None = None
        self._ready = threading.Event()
        self._start_error: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Condition()
        self._rotation: collections.deque[ClientSession] = collections.deque()
        self._clients: dict[int, ClientSession] = {}
        self._client_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._running: tuple[ClientSession, int] | None = None
        self._listener: socket.socket | None = None

    def _say(self, text: str) -> None:
        try:
            print(f"sourcebox supervisor {os.getpid()}: {text}", file=self.log, flush=True)
        except (OSError, ValueError):
            pass  # whoever read our output is gone; serving goes on

    # -- entry -------------------------------------------------------------------------
    def serve(self) -> int:
        self._listener = _listen(self.socket_path, self._secret if self._secret_file else None)
        removed = _sweep_orphan_scratch()
        if removed:
            self._say(f"removed {len(removed)} scratch directories of dead servers")
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())
        threading.Thread(target=self._accept, daemon=True, name="accept").start()
        try:
            self._schedule()
            return 0
        except StartFailed as exc:
            self._start_error = str(exc)
            self._ready.set()
            self._say(f"the worker could not start: {exc}")
            self._fail_queued(failure(errors.START, str(exc)))
            return 3
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()

    # -- the worker --------------------------------------------------------------------
    def _start_worker(self) -> None:
        self.state = "starting" if not self._ready.is_set() else "restarting"
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # A worker that stops reading must not stall our sends to it either.
        _set_send_timeout(parent_end, self.send_timeout)
        scratch = tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-")
        argv = [sys.executable, "-m", "runner.worker", "--channel-fd", str(child_end.fileno()),
                "--parent-pid", str(os.getpid()), "--model", self.model, "--device", self.device,
                "--confine", self.confine, "--handlers", ",".join(self.handlers),
                "--shm-threshold", str(self.shm_threshold), "--scratch", scratch, "--threads", str(self.threads)]
        if self.policy:
            argv += ["--policy", self.policy]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), PACKAGE_ROOT]))
        # Temporary files the worker's libraries make before confinement (torch's
        # torchinductor_<user> cache at import) land in its scratch, removed with it.
        env["TMPDIR"] = scratch
        # cwd is the scratch directory so `-m` puts nothing of the user's on sys.path.
        popen = subprocess.Popen(argv, pass_fds=(child_end.fileno(),), cwd=scratch, env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        child_end.close()
        worker = WorkerHandle(popen, Connection(parent_end), scratch, watch=_ChannelDeadline(parent_end))
        worker.pump = threading.Thread(target=self._pump_output, args=(worker,), daemon=True, name="worker-output")
        worker.pump.start()
        try:
            with worker.watch.bound(self.start_timeout):
                worker.conn.greet(peer=f"worker pid {worker.pid}")
            message = self._wait_message(worker, time.monotonic() + self.start_timeout, "start")
            message.close()
        except (_WorkerLost, ProtocolError, OSError) as exc:
            self._dispose(worker)
            raise StartFailed(f"{exc}\n{worker.output_tail()}".strip()) from None
        if message.kind != "ready":
            self._dispose(worker)
            raise StartFailed(f"{message.meta.get('error')}\n{worker.output_tail()}".strip())
        worker.info = message.meta
        worker.last_ping = time.monotonic()
        self.worker = worker
        self._last_client = None
        self.state = "ready"
        self._ready.set()
        self._say(f"worker {worker.pid} ready in {message.meta.get('load_seconds', 0):.1f}s")

    def _pump_output(self, worker: WorkerHandle) -> None:
        """Log the worker's output and keep its tail, a line at a time, each line cut to
        ``MAX_LINE_CHARS`` and its control characters escaped: user code writes there."""
        fd = worker.popen.stdout.fileno()
        line, cut_bytes = bytearray(), 0
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                if line or cut_bytes:
                    self._log_worker_line(worker, line, cut_bytes)
                return
            pieces = chunk.split(b"\n")
            for index, piece in enumerate(pieces):
                room = MAX_LINE_CHARS - len(line)
                line += piece[:room]
                cut_bytes += len(piece) - len(piece[:room])
                if index < len(pieces) - 1:  # a newline ended this line
                    self._log_worker_line(worker, line, cut_bytes)
                    line, cut_bytes = bytearray(), 0

    def _log_worker_line(self, worker: WorkerHandle, raw: bytearray, cut_bytes: int) -> None:
        text = escape_controls(raw.decode("utf-8", "replace"))
        if cut_bytes:
            text += f"[... {cut_bytes} more bytes of this line cut]"
        worker.tail.append(text + "\n")
        try:
            self.log.write(text + "\n")
            self.log.flush()
        except (OSError, ValueError):
            pass

    def _wait_message(self, worker: WorkerHandle, deadline: float, what: str,
                      wanted_id: int | None = None) -> Message:
        """The next message from the worker that is not a stats report, checking its
        health, memory and ``deadline`` while waiting. Raises ``_WorkerLost``."""
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise _WorkerLost(errors.TIMEOUT if what == "request" else errors.CRASHED,
                                  {"request": "the request ran past its time limit",
                                   "start": f"the worker did not become ready in {self.start_timeout:g}s",
                                   "ping": f"the worker did not answer a ping in {_PING_TIMEOUT:g}s"}[what])
            self._check_memory(worker)
            readable, _, _ = select.select([worker.conn.sock], [], [], min(_POLL_SECONDS, deadline - now))
            if not readable:
                if worker.popen.poll() is not None:
                    raise _WorkerLost(errors.CRASHED, "the worker died")
                continue
            message = self._read(worker)
            if message.kind == "stats":
                message.close()
                continue
            if self._trust_worker_channel:  # TEST ONLY: the old, trusting match by id alone
                if wanted_id is not None and message.id != wanted_id:
                    message.close()
                    continue
                return message
            if message.kind in _ANSWERS[what] and (wanted_id is None or message.id == wanted_id):
                return message
            message.close()
            # A ping's pong cannot come late (no pong in time kills the worker) and ids are
            # random: this answers nothing we asked. User code wrote it; never forward it.
            raise _WorkerLost(errors.CRASHED, f"the worker sent {message.kind!r} for id {message.id} while "
                                              f"waiting for its answer to the {what}: it was killed as "
                                              "compromised (user code writing on the worker's channel)",
                              rerun=True)

    def _read(self, worker: WorkerHandle) -> Message:
        """One message from the worker, whole within ``_CHANNEL_READ_SECONDS`` of its
        first byte. Raises ``_WorkerLost``."""
        try:
            if self._trust_worker_channel:
                message = worker.conn.recv()  # TEST ONLY: no deadline
            else:
                with worker.watch.bound(_CHANNEL_READ_SECONDS):
                    message = worker.conn.recv()
        except BadMessage as exc:
            raise _WorkerLost(errors.CRASHED, f"the worker sent a malformed message ({exc}): it was killed as "
                                              "compromised") from None
        except (ProtocolError, OSError):
            if worker.watch.tripped:
                raise _WorkerLost(errors.CRASHED, f"the worker left a message on its channel unfinished for "
                                                  f"{_CHANNEL_READ_SECONDS:g}s (user code writing on the "
                                                  "worker's channel?): it was killed") from None
            raise _WorkerLost(errors.CRASHED, "the worker died") from None
        if message.kind == "stats":
            gpu = message.meta.get("gpu")
            worker.gpu_bytes = gpu if type(gpu) is int else None
        return message

    def _drain(self, worker: WorkerHandle) -> None:
        """Before a request goes out, nothing but stats may be waiting on the channel: the
        worker was asked nothing, so anything else was written by user code."""
        while select.select([worker.conn.sock], [], [], 0)[0]:
            message = self._read(worker)
            message.close()
            if message.kind != "stats":
                raise _WorkerLost(errors.CRASHED, f"the worker sent {message.kind!r} for id {message.id} "
                                                  "unasked: it was killed as compromised (user code writing "
                                                  "on the worker's channel)", rerun=True)

    def _new_id(self) -> int:
        """A request or ping id the worker cannot guess, so nothing written on the channel
        before a request was sent can name it."""
        if self._trust_worker_channel:
            return next(self._request_ids)  # TEST ONLY: predictable
        return int.from_bytes(os.urandom(7), "little")

    def _check_memory(self, worker: WorkerHandle) -> None:
        if self.memory_limit is None:
            return
        try:
            rss = psutil.Process(worker.pid).memory_info().rss
        except psutil.NoSuchProcess:
            return  # its death shows up on the socket
        # Memfds it holds only by descriptor are in no RSS: they count too.
        for what, used in (("RSS and memfds", rss + shm.memfd_bytes(worker.pid)), ("GPU memory", worker.gpu_bytes)):
            if used is not None and used > self.memory_limit:
                raise _WorkerLost(errors.MEMORY, f"the worker's {what} of {_mib(used)} went past "
                                                 f"the memory limit of {_mib(self.memory_limit)}")

    def _kill(self, worker: WorkerHandle) -> int:
        if worker.popen.poll() is None:
            worker.popen.kill()
        return worker.popen.wait()

    def _dispose(self, worker: WorkerHandle) -> int:
        """Kill (if needed) and reap a worker, and remove what it leaves behind."""
        returncode = self._kill(worker)
        worker.watch.close()
        worker.conn.close()
        worker.pump.join(timeout=5)  # its last lines belong in the crash report
        worker.popen.stdout.close()
        shutil.rmtree(worker.scratch, ignore_errors=True)
        return returncode

    def _lose_worker(self, lost: _WorkerLost) -> dict:
        worker, self.worker = self.worker, None
        returncode = self._dispose(worker)
        self.restarts += 1
        self.last_crash = f"{lost.reason} ({describe_exit(returncode)})"
        self._say(f"worker {worker.pid}: {self.last_crash}; restarting")
        return failure(lost.category, lost.reason, returncode=returncode, stderr_tail=worker.output_tail())

    def _restart(self) -> None:
        for attempt in range(1, _RESTART_ATTEMPTS + 1):
            try:
                self._start_worker()
                return
            except StartFailed as exc:
                if attempt == _RESTART_ATTEMPTS:
                    raise
                self._say(f"restart attempt {attempt} failed: {exc}")
                time.sleep(attempt)

    # -- scheduling --------------------------------------------------------------------
    def _schedule(self) -> None:
        self._start_worker()
        while not self._stopping.is_set():
            if self.worker is None:
                self._restart()
            item = self._take()
            try:
                if item is None:
                    self._idle_check()
                else:
                    self._execute(*item)
            except Exception as exc:
                if not isinstance(exc, _WorkerLost):
                    # Our own bug, met on this request or while idle: the channel's state
                    # is unknown, so the worker starts afresh; serving goes on.
                    self._say(f"internal error: {cut(traceback.format_exc())}")
                    exc = _WorkerLost(errors.CRASHED, cut(f"the server met an internal error ({type(exc).__name__}: "
                                                          f"{exc}); the worker was restarted", 4096))
                outcome = self._lose_worker(exc)
                if item is not None and not (exc.rerun and self._rerun(*item)):
                    item[1].close()
                    self._reply_failure(item[0], item[1].id, outcome)

    def _take(self) -> tuple[ClientSession, Message] | None:
        with self._lock:
            if not self._rotation and not self._stopping.is_set():
                self._lock.wait(_POLL_SECONDS * 4)
            while self._rotation:
                client = self._rotation.popleft()
                if not client.queue:
                    continue
                message = client.queue.popleft()
                client.queued_bytes -= _held(message)
                client.queued_fds -= len(message.fds)
                if client.queue:
                    self._rotation.append(client)
                self._running = (client, message.id)
                return client, message
            return None

    def _rerun(self, client: ClientSession, message: Message) -> bool:
        """Queue a request again at the head of its client's queue, once: the worker it ran
        on was caught sending what it was not asked, which earlier user code can plant."""
        with self._lock:
            self._running = None
            if not client.alive or message.id in client.rerun:
                return False
            client.rerun.add(message.id)
            client.queue.appendleft(message)
            client.queued_bytes += _held(message)
            client.queued_fds += len(message.fds)
            if client not in self._rotation:
                self._rotation.appendleft(client)
            self._lock.notify_all()
        self._say(f"running request {message.id} of client pid {client.pid} again on a new worker")
        return True

    def _idle_check(self) -> None:
        now = time.monotonic()
        if self.owner_pid is not None and now - self._owner_checked > 1.0:
            self._owner_checked = now
            if not shm.alive(self.owner_pid):
                self._say(f"owner process {self.owner_pid} is gone; stopping")
                self.stop()
                return
        worker = self.worker
        if worker.popen.poll() is not None:
            raise _WorkerLost(errors.CRASHED, "the worker died while idle")
        self._check_memory(worker)
        if time.monotonic() - worker.last_ping < _PING_INTERVAL:
            return
        ping_id = self._new_id()
        worker.conn.send("ping", ping_id)
        self._wait_message(worker, time.monotonic() + _PING_TIMEOUT, "ping", ping_id).close()
        worker.last_ping = time.monotonic()

    def _execute(self, client: ClientSession, message: Message) -> None:
        if not client.alive:  # it left after its request was taken from the queue
            message.close()
            with self._lock:
                self._running = None
            return
        if self.isolate_clients and self._last_client not in (None, client.id):
            self.retirements += 1
            self._retire(self.worker, client, "the next request is of another client (--isolate-clients)")
            self._restart()
        self._last_client = client.id
        worker = self.worker
        meta = message.meta
        request_id = self._new_id()
        # The server's timeout is a maximum: a client may ask for less, never more.
        deadline = time.monotonic() + min(meta.get("timeout") or self.timeout, self.timeout)
        if not self._trust_worker_channel:
            self._drain(worker)
        try:
            worker.conn.send("request", request_id, {
                "kind": meta["kind"], "form": meta.get("form", "frames"), "reply": meta.get("reply", "frames"),
                "client": client.id,  # the tenant: the worker keeps each client's sources apart
            }, message.frames, message.fds)
        except (TypeError, ValueError, OverflowError) as exc:  # refused before a byte went out
            message.close()
            self._reply_failure(client, message.id, failure(errors.RUNNER, cut(
                f"bad request: it cannot be forwarded to the worker ({exc})")))
            return
        except OSError:
            raise _WorkerLost(errors.CRASHED, "the worker died") from None
        reply = self._wait_message(worker, deadline, "request", request_id)
        worker.last_ping = time.monotonic()
        if "sources" in reply.meta:
            worker.info["sources"] = reply.meta["sources"]
        self.served += 1
        with self._lock:
            self._running = None
            client.rerun.discard(message.id)
        message.close()  # answered: the worker had its own copies of its descriptors
        retire = reply.meta.get("retire")
        if retire:
            self.retirements += 1  # before the reply goes out: a status after it shows it
        # Out through the client's outbox, which closes the reply's descriptors once sent;
        # its inline frames are copied out of the channel's receive buffer first.
        client.post(reply.kind, message.id, reply.meta, reply.detach())
        if retire:
            self._retire(worker, client, str(retire))

    def _retire(self, worker: WorkerHandle, client: ClientSession, reason: str) -> None:
        """The worker found itself changed after a request (``runner.hygiene``), or serves
        another client next under ``isolate_clients``: replace it before the next request
        runs. Planned, not a crash: nobody's request fails."""
        self.worker = None
        self._dispose(worker)
        self._say(f"worker {worker.pid} retired: {reason} (client pid {client.pid})")

    def _reply_failure(self, client: ClientSession, request_id: int, info: dict) -> None:
        with self._lock:
            self._running = None
        client.post("error", request_id, {"error": info})

    def _fail_queued(self, info: dict) -> None:
        with self._lock:
            pending = [(client, message) for client in self._clients.values() for message in client.queue]
            for client in self._clients.values():
                client.queue.clear()
            self._rotation.clear()
        for client, message in pending:
            message.close()
            self._reply_failure(client, message.id, info)

    # -- clients -----------------------------------------------------------------------
    def _accept(self) -> None:
        """Accept until stopped. A failed accept (out of descriptors: EMFILE, ENFILE; out
        of memory) is waited out with a growing pause, never the end of accepting."""
        pause = 0.0
        self._listener.settimeout(_REFUSED_GRACE / 2)  # to close refused connections on time
        while not self._stopping.is_set():
            self._close_refused(time.monotonic())
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stopping.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    return  # the listener was closed: we are stopping
                pause = min(max(pause * 2, _ACCEPT_BACKOFF[0]), _ACCEPT_BACKOFF[1])
                self._say(f"accept failed ({exc.strerror or exc}); trying again in {pause:g}s")
                self._stopping.wait(pause)
                continue
            pause = 0.0
            sock.settimeout(None)
            with self._lock:
                # A slot held by a connection just closing (a client's probe of the path
                # before it connects for real) is worth a moment's wait.
                busy = not self._lock.wait_for(lambda: self._connections < self.max_clients, _SLOT_WAIT)
                if not busy:
                    self._connections += 1
            if busy:
                self._refuse(sock)
                continue
            threading.Thread(target=self._serve_client, args=(sock,), daemon=True, name="client").start()

    def _refuse(self, sock: socket.socket) -> None:
        """Tell a connection over the cap why, without a thread: our greeting and a busy
        error go out at once (they fit the socket's buffer), then the socket is held
        half-closed for ``_REFUSED_GRACE`` so the client's hello lands and it reads them."""
        self._refusals += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 1.0:  # a flood of connections must not flood the log
            self._refusal_logged = now
            self._say(f"refused {self._refusals} connection(s) so far: {self.max_clients} are open (--max-clients)")
        try:
            sock.setblocking(False)
            conn = Connection(sock)
            conn.sock.send(struct.pack("<8sI", GREETING_MAGIC, PROTOCOL_VERSION))
            conn.send("error", 0, {"error": failure(errors.BUSY, (
                f"the worker server at {self.socket_path} is busy: it serves {self.max_clients} connections "
                "already (its --max-clients); try again later"))})
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self._refused.append((sock, time.monotonic() + _REFUSED_GRACE))
        while len(self._refused) > self.max_clients:  # held ones are bounded too
            self._refused.popleft()[0].close()

    def _close_refused(self, now: float) -> None:
        while self._refused and self._refused[0][1] <= now:
            self._refused.popleft()[0].close()

    def _serve_client(self, sock: socket.socket) -> None:
        client = None
        try:
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
            # Replies to a client that stopped reading must not stall its outbox for ever.
            _set_send_timeout(sock, self.send_timeout)
            # A message larger than the client may queue is refused before it is read.
            conn = Connection(sock, max_inline_bytes=self.max_queued_bytes)
            try:
                with _deadline(sock, self.handshake_timeout):  # a connection that says nothing is dropped
                    conn.greet(peer=f"client pid {pid}")
                    client = self._welcome(conn, pid)
            except (ProtocolError, OSError) as exc:
                if isinstance(exc, ProtocolVersionError):
                    self._say(f"refused client pid {pid}: {exc}")
                if client is not None:
                    return  # the deadline struck just after the welcome: gone in finally
                conn.close()
                return
            self._read_client(client)  # an idle client may stay (it holds a connection)
        except Exception:  # our own bug: this connection ends, serving goes on
            self._say(f"dropped a client connection after an internal error: {cut(traceback.format_exc())}")
            if client is None:
                sock.close()
        finally:
            if client is not None:
                self._client_gone(client)
            with self._lock:
                self._connections -= 1
                self._lock.notify_all()

    def _read_client(self, client: ClientSession) -> None:
        conn = client.conn
        try:
            while True:
                try:
                    message = conn.recv()
                except BadMessage as exc:
                    client.post("error", exc.request_id or 0, {"error": failure(errors.RUNNER, cut(str(exc)))})
                    continue
                if message.kind != "request":
                    message.close()  # only requests carry memory
                if not self._handle(client, message):
                    return
        except ProtocolError as exc:
            if not isinstance(exc, ConnectionClosed):
                self._say(f"dropped client pid {client.pid}: {exc}")
                client.post("error", 0, {"error": failure(errors.RUNNER, cut(f"connection dropped: {exc}"))})
                client.outbox.close(flush_seconds=1.0)
        except OSError:
            pass

    def _welcome(self, conn: Connection, pid: int) -> ClientSession:
        hello = conn.recv()
        hello.close()
        nonce = hello.meta.get("nonce")
        if hello.kind != "hello" or not (isinstance(nonce, bytes) and len(nonce) == auth.NONCE_BYTES):
            raise BadMessage(f"the first message must be a hello carrying a {auth.NONCE_BYTES}-byte nonce")
        ours = auth.new_nonce()
        conn.send("welcome", hello.id, {
            "protocol": PROTOCOL_VERSION, "server_pid": os.getpid(), "model": self.model, "policy": self.policy,
            "device": self.device, "shm_threshold": self.shm_threshold, "state": self.state,
            "nonce": ours, "proof": auth.proof(self._secret, b"server", nonce, ours, os.getpid(), pid),
        })
        client = ClientSession(next(self._client_ids), conn, pid, nonces=(nonce, ours))
        client.outbox = _Outbox(conn, lambda why: self._drop(client, why), name=f"client-{client.id}-outbox")
        with self._lock:
            self._clients[client.id] = client
        return client

    def _drop(self, client: ClientSession, why: str) -> None:
        if client.alive:
            self._say(f"dropped client pid {client.pid}: {why}")
        self._client_gone(client)

    def _handle(self, client: ClientSession, message: Message) -> bool:
        """Act on one client message; ``False`` ends the connection."""
        kind = message.kind
        if kind == "request":
            self._enqueue(client, message)
        elif kind == "ping":
            client.post("pong", message.id)
        elif kind == "status":
            client.post("status", message.id, self.status())
        elif kind == "wait_ready":
            self._ready.wait()
            if self._start_error is not None:
                client.post("error", message.id, {"error": failure(errors.START, cut(self._start_error))})
                client.outbox.close(flush_seconds=1.0)
                return False
            client.post("ready", message.id, self.status())
        elif kind == "auth":
            answer = message.meta.get("proof")
            expected = auth.proof(self._secret, b"client", *client.nonces, os.getpid(), client.pid)
            if isinstance(answer, bytes) and hmac.compare_digest(answer, expected):
                client.owner = True
                client.post("owner", message.id)
            else:
                client.post("error", message.id, {"error": failure(
                    errors.RUNNER, "the proof of this server's secret does not match: this client is not its owner")})
        elif kind == "stop":
            if not client.owner:
                self._say(f"refused stop from client pid {client.pid}, which is not the owner")
                client.post("error", message.id, {"error": failure(
                    errors.RUNNER, f"stop refused: only the owner of the worker server at {self.socket_path} may "
                                   "stop it (the runner.Worker that started it, or a client that can read "
                                   f"{auth.secret_path(self.socket_path)} when it was started from the command "
                                   "line); it goes on serving")})
            else:
                self.stop()  # first: the answer may not reach a client that already left
                client.post("stopping", message.id)
        else:
            client.post("error", message.id, {"error": failure(
                errors.RUNNER, cut(f"unknown message kind {kind!r} (expected request, ping, "
                                   "status, wait_ready, auth or stop)", 1024))})
        return True

    def _enqueue(self, client: ClientSession, message: Message) -> None:
        problem = _request_problem(message)
        if problem is None:
            try:
                for index, fd in enumerate(message.fds):
                    shm.check_request_fd(fd, f"file descriptor {index}")
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            message.close()
            client.post("error", message.id, {"error": failure(errors.RUNNER, cut(f"bad request: {problem}"))})
            return
        detached = message.detach()
        # Only what is used is kept while it waits: the rest of its metadata may be large.
        detached.meta = {key: message.meta[key] for key in ("kind", "form", "reply", "timeout") if key in message.meta}
        size = _held(detached)
        refusal = None
        with self._lock:
            if self._stopping.is_set():
                refusal = failure(errors.STOPPED, "the worker server is stopping")
            elif client.queued_bytes + size > self.max_queued_bytes or \
                    client.queued_fds + len(detached.fds) > MAX_QUEUED_FDS:
                refusal = failure(errors.BUSY, (
                    f"the worker server is busy: this client's queued requests would hold more than "
                    f"{self.max_queued_bytes} bytes (its --max-queued-bytes) or {MAX_QUEUED_FDS} descriptors; "
                    "wait for replies before sending more"))
            else:
                client.queue.append(detached)
                client.queued_bytes += size
                client.queued_fds += len(detached.fds)
                if client not in self._rotation:
                    self._rotation.append(client)
                self._lock.notify_all()
        if refusal is not None:
            message.close()
            client.post("error", message.id, {"error": refusal})

    def _client_gone(self, client: ClientSession) -> None:
        with self._lock:
            if not client.alive:
                return
            client.alive = False
            queued = list(client.queue)
            client.queue.clear()
            self._clients.pop(client.id, None)
        for message in queued:
            message.close()
        if client.outbox is not None:
            client.outbox.close()
        client.conn.close()

    # -- status and shutdown -----------------------------------------------------------
    def status(self) -> dict:
        worker = self.worker
        rss = None
        if worker is not None:
            try:
                rss = psutil.Process(worker.pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        with self._lock:
            queued = sum(len(client.queue) for client in self._clients.values())
            clients = len(self._clients)
            running = self._running is not None
        info = worker.info if worker is not None else {}
        return {
            "protocol": PROTOCOL_VERSION, "state": self.state, "socket": self.socket_path,
            "server_pid": os.getpid(), "worker_pid": worker.pid if worker is not None else None,
            "model": self.model, "device": info.get("device", self.device),
            "policy": info.get("policy", self.policy), "sandbox": info.get("sandbox"),
            "kinds": info.get("kinds", []), "uptime": time.time() - self.started_at,
            "served": self.served, "restarts": self.restarts,
            "retirements": self.retirements, "last_crash": self.last_crash,
            "clients": clients, "queued": queued, "running": running, "rss": rss,
            "gpu": worker.gpu_bytes if worker is not None else None,
            "memory_limit": self.memory_limit, "timeout": self.timeout, "threads": self.threads,
            "max_clients": self.max_clients, "max_queued_bytes": self.max_queued_bytes,
            "shm_threshold": self.shm_threshold, "sources": info.get("sources"),
        }

    def _shutdown(self) -> None:
        self.state = "stopping"
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            if self._secret_file and auth.read_secret(self.socket_path)[0] == self._secret:
                auth.clear_secret(self.socket_path)
            directory = os.path.dirname(self.socket_path)
            if os.path.basename(directory).startswith("sourcebox-"):
                # The private directory a Worker made for this socket: gone with us even
                # when that client was killed before it could remove it.
                try:
                    os.rmdir(directory)
                except OSError:
                    pass
        self._fail_queued(failure(errors.STOPPED, "the worker server stopped before this request ran"))
        worker, self.worker = self.worker, None
        if worker is not None:
            try:
                worker.conn.send("stop", 0)
                worker.popen.wait(_STOP_GRACE)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._dispose(worker)
        with self._lock:
            clients = list(self._clients.values())
        flushed_by = time.monotonic() + 1.0  # answers already posted (stopping, errors) go out
        for client in clients:
            client.outbox.close(flush_seconds=max(0.0, flushed_by - time.monotonic()))
            self._client_gone(client)


_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f, *range(0x80, 0xa0)) if c != 0x09}


def escape_controls(text: str) -> str:
    """``text`` with terminal control characters (escape sequences, carriage returns...)
    written out as ``\\xNN``, so user output cannot drive the terminal it reaches."""
    return text.translate(_CONTROLS)


def default_threads() -> int:
    """The worker's thread budget unless ``--threads`` says otherwise: half the CPUs this
    process may run on, at least 1, so a worker leaves room for its clients and for
    other servers on the machine (docs/RUNNER.md, "Threads")."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


def check_seconds(value, what: str) -> float:
    """``value`` as a finite positive number of seconds, or a ``ValueError`` saying so."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{what} must be a finite positive number of seconds, got {value!r}")
    return float(value)


def _request_problem(message: Message) -> str | None:
    meta = message.meta
    kind, form = meta.get("kind"), meta.get("form", "frames")
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_CHARS:
        return f"meta 'kind' (the request kind) must be a string of 1 to {MAX_KIND_CHARS} characters"
    if form not in ("frames", "bytes") or meta.get("reply", "frames") not in ("frames", "bytes"):
        return "meta 'form' and 'reply' must be 'frames' or 'bytes'"
    if form == "bytes" and len(message.frames) != 1:
        return f"a request in bytes form carries one frame (the bundle's bytes), not {len(message.frames)}"
    if not message.frames:
        return ("a request carries at least one frame (the bundle's header, then its tensor frames) and this "
                "one has none; encode it with capture.encode and send bundle.header and bundle.frames")
    if meta.get("timeout") is not None:
        try:
            check_seconds(meta["timeout"], "meta 'timeout'")
        except ValueError as exc:
            return str(exc)
    return None


def _held(message: Message) -> int:
    """Bytes a queued request holds of the server: its inline frames, and about what its
    frames' objects and its kept metadata (a kind of at most ``MAX_KIND_CHARS``) take."""
    return sum(len(f) for f in message.frames if isinstance(f, bytes)) + 128 * len(message.frames) + 512


@contextlib.contextmanager
def _deadline(sock: socket.socket, seconds: float):
    """Bound everything inside by ``seconds`` in all: past it the socket is shut down
    under whatever waits on it, which then fails."""
    lock, state = threading.Lock(), []

    def expire() -> None:
        with lock:
            if not state:
                state.append("expired")
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            expired = bool(state)
            state.append("done")
    if expired:
        raise ProtocolError(f"the connection did not finish its handshake within {seconds:g}s")


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def _listen(path: str, secret: bytes | None) -> socket.socket:
    """Listen at ``path``; ``secret`` is written beside it first (None: a secret file left
    there by a killed server is removed), so no client can find the socket without it."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left over from a server that died
        else:
            raise RuntimeError(f"a worker server already listens at {path}; stop it first "
                               f"(python -m runner stop {path}) or pick another socket path")
        finally:
            probe.close()
    if secret is not None:
        auth.write_secret(path, secret)
    else:
        auth.clear_secret(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is the worker's front door: owner only
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    return listener


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"
