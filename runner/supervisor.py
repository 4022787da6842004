"""The supervisor: the process behind a worker socket (``python -m runner serve``).

Clients connect to the supervisor, never to the worker. It owns the listening socket
and the request queue, so a worker crash loses nothing but the request that was
running. It

- runs the worker's life cycle (``runner.lifecycle``: start, health and memory checks,
  restart, retirement);
- queues requests per client and takes them round-robin across clients, one at a time;
- forwards requests and replies (``miss`` answers too: repeated code is deduplicated
  between the client and the worker's source store). Large frames are not touched: their
  memfd descriptors pass through unmapped, and the supervisor closes its copies once
  answered (or when their sender or receiver is gone), so it holds no one's memory;
- proves its secret to every client and takes ``stop`` only from its owner (``auth``);
- trusts nothing on the worker's channel, where user code can write (``runner.lifecycle``).
"""
from __future__ import annotations

import collections
import contextlib
import errno
import hmac
import itertools
import os
import platform
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import msgpack

from . import auth
from . import errors
from . import shm
from .child import escape_controls
from .defaults import check_seconds
from .errors import BadMessage, ProtocolError, ProtocolVersionError, cut, failure
from .lifecycle import (POLL_SECONDS, RESTART_ATTEMPTS, StartFailed, WorkerLifecycle, WorkerLost, set_send_timeout,
                        sweep_orphan_scratch)
from .protocol import (AUTH, CLIENT, DEFAULT_SHM_THRESHOLD, ERROR, GREETING_MAGIC, HELLO, OWNER, PING, PONG,
                       PROTOCOL_VERSION, READY, REQUEST, SERVER, STATUS, STOP, STOPPING, WAIT_READY, WELCOME,
                       Connection, ConnectionClosed, Message, SharedRef, kinds)

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
_SLOT_WAIT = 0.5                   # a new connection at the cap waits this long for a slot
_REFUSED_GRACE = 1.0               # a refused connection is held this long so it can read why
_ACCEPT_BACKOFF = (0.05, 2.0)      # first and longest pause after a failed accept (EMFILE...)
_STATUS_WAIT = 10.0                # a status waits at most this long for the last request's verdict


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
        if self._send_now(kind, request_id, meta, message):
            return
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

    def _send_now(self, kind: str, request_id: int, meta: dict | None, message: Message | None) -> bool:
        """A small answer when nothing waits before it: sent from the posting thread if the
        client's socket takes it at once (no hand-off to the outbox thread, no waiting);
        ``False`` leaves it to the outbox, which also reports any error."""
        with self._cond:
            if self._closed or self._items or self._sending:
                return False
            self._sending = True
        try:
            if message is None:
                sent = self._conn.try_send(kind, request_id, meta)
            else:
                sent = self._conn.try_send(kind, request_id, meta, message.frames, message.fds)
        except (TypeError, ValueError, OverflowError, OSError):
            sent = False
        finally:
            with self._cond:
                self._sending = False
                self._cond.notify_all()
        if sent and message is not None:
            message.close()
        return sent

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
                    self._conn.send(ERROR, request_id, {"error": failure(errors.RUNNER, cut(
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


class Supervisor:
    """Serve ``socket_path`` until stopped (``serve()`` returns the exit status)."""

    def __init__(self, socket_path: str, *, model: str = "tiny-gpt2", device: str = "auto",
                 policy: str | None = None, confine: str = "best-effort", timeout: float = DEFAULT_TIMEOUT,
                 memory_limit: int | None = None, shm_threshold: int = DEFAULT_SHM_THRESHOLD,
                 handlers: tuple[str, ...] = (), start_timeout: float = 600.0,
                 owner_pid: int | None = None, secret: bytes | None = None, threads: int | None = None,
                 max_clients: int = DEFAULT_MAX_CLIENTS, max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_SECONDS, send_timeout: float = DEFAULT_SEND_SECONDS,
                 trust_worker_channel: bool = False, isolate_clients: bool = False, verbose: bool = False,
                 standby: bool = True, log=sys.stderr, python: str | None = None):
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
        self.log = log
        self.life = WorkerLifecycle(
            model=model, device=device, policy=policy, confine=confine, handlers=handlers,
            shm_threshold=shm_threshold, threads=self.threads, start_timeout=start_timeout,
            send_timeout=send_timeout, memory_limit=memory_limit, trust_worker_channel=trust_worker_channel,
            verbose=verbose, say=self._say, log=log, python=python,
            standby=standby)
        # The worker's interpreter (serve --python; docs/RUNNER.md, "Another Python"); None: ours.
        self.python = python
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
        self.state = "starting"
        self.started_at = time.time()
        self.served = 0
        self._ready = threading.Event()
        self._start_error: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Condition()
        self._rotation: collections.deque[ClientSession] = collections.deque()
        self._clients: dict[int, ClientSession] = {}
        self._client_ids = itertools.count(1)
        self._running: tuple[ClientSession, int] | None = None
        self._checking = False  # a request was answered and the worker's verdict is awaited
        self._listener: socket.socket | None = None

    def _say(self, text: str) -> None:
        try:
            print(f"sourcebox supervisor {os.getpid()}: {text}", file=self.log, flush=True)
        except (OSError, ValueError):
            pass  # whoever read our output is gone; serving goes on

    # -- entry -------------------------------------------------------------------------
    def serve(self) -> int:
        self._listener = _listen(self.socket_path, self._secret if self._secret_file else None)
        removed = sweep_orphan_scratch()
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

    # -- the worker (its life cycle: runner.lifecycle) ----------------------------------
    def _start_worker(self, attempts: int = 1) -> None:
        self.state = "starting" if not self._ready.is_set() else "restarting"
        self.life.start(attempts)
        self._last_client = None
        self.state = "ready"
        self._ready.set()

    # -- scheduling --------------------------------------------------------------------
    def _schedule(self) -> None:
        self._start_worker()
        while not self._stopping.is_set():
            if self.life.worker is None:
                self._start_worker(RESTART_ATTEMPTS)
            self.life.check_standby()
            item = self._take()
            try:
                if item is None:
                    self._idle_check()
                else:
                    self._execute(*item)
            except Exception as exc:
                if not isinstance(exc, WorkerLost):
                    # Our own bug, met on this request or while idle: the channel's state
                    # is unknown, so the worker starts afresh; serving goes on.
                    self._say(f"internal error: {cut(traceback.format_exc())}")
                    exc = WorkerLost(errors.CRASHED, cut(f"the server met an internal error ({type(exc).__name__}: "
                                                          f"{exc}); the worker was restarted", 4096))
                outcome = self.life.lose(exc)
                if item is not None and not (exc.rerun and self._rerun(*item)):
                    item[1].close()
                    self._reply_failure(item[0], item[1].id, outcome)

    def _take(self) -> tuple[ClientSession, Message] | None:
        with self._lock:
            if not self._rotation and not self._stopping.is_set():
                self._lock.wait(POLL_SECONDS * 4)
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
        self.life.check_idle()

    def _execute(self, client: ClientSession, message: Message) -> None:
        if not client.alive:  # it left after its request was taken from the queue
            message.close()
            with self._lock:
                self._running = None
            return
        if self.isolate_clients and self._last_client not in (None, client.id):
            self.life.retiring()
            self.life.retire(f"the next request is of another client (--isolate-clients) (client pid {client.pid})")
            self._start_worker(RESTART_ATTEMPTS)
        self._last_client = client.id
        meta = message.meta
        # The server's timeout is a maximum: a client may ask for less, never more.
        deadline = time.monotonic() + min(meta.get("timeout") or self.timeout, self.timeout)
        try:
            reply = self.life.run({
                "kind": meta["kind"], "form": meta.get("form", "frames"), "reply": meta.get("reply", "frames"),
                "client": client.id,  # the tenant: the worker keeps each client's sources apart
            }, message.frames, message.fds, deadline)
        except (TypeError, ValueError, OverflowError) as exc:  # refused before a byte went out
            message.close()
            self._reply_failure(client, message.id, failure(errors.RUNNER, cut(
                f"bad request: it cannot be forwarded to the worker ({exc})")))
            return
        self.served += 1
        with self._lock:
            self._running = None
            client.rerun.discard(message.id)
            self._checking = True  # a status asked after this answer waits for the verdict
        message.close()  # answered: the worker had its own copies of its descriptors
        try:
            # Out through the client's outbox, which closes the reply's descriptors once
            # sent; its inline frames are copied out of the channel's receive buffer first.
            client.post(reply.kind, message.id, reply.meta, reply.detach())
            # The worker checks itself after answering; nothing more goes to it before its verdict.
            try:
                retire = self.life.verdict(time.monotonic() + self.timeout)
            except WorkerLost as lost:  # the request was answered: only the worker is lost
                self.life.lose(lost)
                return
            if retire:
                self.life.retiring()
                self.life.retire(f"{retire} (client pid {client.pid})")
        finally:
            with self._lock:
                self._checking = False
                self._lock.notify_all()

    def _reply_failure(self, client: ClientSession, request_id: int, info: dict) -> None:
        with self._lock:
            self._running = None
        client.post(ERROR, request_id, {"error": info})

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
            conn.send(ERROR, 0, {"error": failure(errors.BUSY, (
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
            set_send_timeout(sock, self.send_timeout)
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
                    client.post(ERROR, exc.request_id or 0, {"error": failure(errors.RUNNER, cut(str(exc)))})
                    continue
                if message.kind != REQUEST:
                    message.close()  # only requests carry memory
                if not self._handle(client, message):
                    return
        except ProtocolError as exc:
            if not isinstance(exc, ConnectionClosed):
                self._say(f"dropped client pid {client.pid}: {exc}")
                client.post(ERROR, 0, {"error": failure(errors.RUNNER, cut(f"connection dropped: {exc}"))})
                client.outbox.close(flush_seconds=1.0)
        except OSError:
            pass

    def _welcome(self, conn: Connection, pid: int) -> ClientSession:
        hello = conn.recv()
        hello.close()
        nonce = hello.meta.get("nonce")
        if hello.kind != HELLO or not (isinstance(nonce, bytes) and len(nonce) == auth.NONCE_BYTES):
            raise BadMessage(f"the first message must be a hello carrying a {auth.NONCE_BYTES}-byte nonce")
        ours = auth.new_nonce()
        worker_python = self.life.worker.info.get("python") if self.life.worker is not None else None
        conn.send(WELCOME, hello.id, {
            "protocol": PROTOCOL_VERSION, "server_pid": os.getpid(), "model": self.model, "policy": self.policy,
            "device": self.device, "shm_threshold": self.shm_threshold, "state": self.state,
            "python": platform.python_version(), "worker_python": worker_python,
            "nonce": ours, "proof": auth.proof(self._secret, b"server", nonce, ours, os.getpid(), pid),
        })
        client = ClientSession(next(self._client_ids), conn, pid, nonces=(nonce, ours))
        if self.python and worker_python and \
                str(hello.meta.get("python")).split(".")[:2] != worker_python.split(".")[:2]:
            self._say(f"client pid {pid} runs Python {escape_controls(str(hello.meta.get('python'))[:32])}, "
                      f"the worker {worker_python}")
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
        if kind == REQUEST:
            self._enqueue(client, message)
        elif kind == PING:
            client.post(PONG, message.id)
        elif kind == STATUS:
            with self._lock:  # what the last answered request did to the worker is counted first
                self._lock.wait_for(lambda: not self._checking, timeout=_STATUS_WAIT)
            client.post(STATUS, message.id, self.status())
        elif kind == WAIT_READY:
            self._ready.wait()
            if self._start_error is not None:
                client.post(ERROR, message.id, {"error": failure(errors.START, cut(self._start_error))})
                client.outbox.close(flush_seconds=1.0)
                return False
            client.post(READY, message.id, self.status())
        elif kind == AUTH:
            answer = message.meta.get("proof")
            expected = auth.proof(self._secret, b"client", *client.nonces, os.getpid(), client.pid)
            if isinstance(answer, bytes) and hmac.compare_digest(answer, expected):
                client.owner = True
                client.post(OWNER, message.id)
            else:
                client.post(ERROR, message.id, {"error": failure(
                    errors.RUNNER, "the proof of this server's secret does not match: this client is not its owner")})
        elif kind == STOP:
            if not client.owner:
                self._say(f"refused stop from client pid {client.pid}, which is not the owner")
                client.post(ERROR, message.id, {"error": failure(
                    errors.RUNNER, f"stop refused: only the owner of the worker server at {self.socket_path} may "
                                   "stop it (the runner.Worker that started it, or a client that can read "
                                   f"{auth.secret_path(self.socket_path)} when it was started from the command "
                                   "line); it goes on serving")})
            else:
                self.stop()  # first: the answer may not reach a client that already left
                client.post(STOPPING, message.id)
        else:
            client.post(ERROR, message.id, {"error": failure(
                errors.RUNNER, cut(f"unknown message kind {kind!r} (expected one of "
                                   f"{', '.join(k for k in kinds(CLIENT, SERVER) if k != HELLO)})", 1024))})
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
            client.post(ERROR, message.id, {"error": failure(errors.RUNNER, cut(f"bad request: {problem}"))})
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
            client.post(ERROR, message.id, {"error": refusal})

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
        worker, standby = self.life.worker, self.life.standby
        rss = self.life.rss()
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
            "served": self.served, "restarts": self.life.restarts,
            "retirements": self.life.retirements, "last_crash": self.life.last_crash,
            "clients": clients, "queued": queued, "running": running, "rss": rss,
            "gpu": worker.gpu_bytes if worker is not None else None,
            "memory_limit": self.memory_limit, "timeout": self.timeout, "threads": self.threads,
            "max_clients": self.max_clients, "max_queued_bytes": self.max_queued_bytes,
            "shm_threshold": self.shm_threshold, "sources": info.get("sources"),
            "python": info.get("python"), "server_python": platform.python_version(),
            "standby": None if standby is None else {"pid": standby.pid,
                                                     "state": "ready" if standby.entered else "starting"},
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
        self.life.stop()
        with self._lock:
            clients = list(self._clients.values())
        flushed_by = time.monotonic() + 1.0  # answers already posted (stopping, errors) go out
        for client in clients:
            client.outbox.close(flush_seconds=max(0.0, flushed_by - time.monotonic()))
            self._client_gone(client)


def default_threads() -> int:
    """The worker's thread budget unless ``--threads`` says otherwise: half the CPUs this
    process may run on, at least 1, so a worker leaves room for its clients and for
    other servers on the machine (docs/RUNNER.md, "Threads")."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


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
