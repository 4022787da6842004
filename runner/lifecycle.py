"""The worker's life cycle, as the supervisor runs it: start, health, memory, restart,
retirement, stop (``runner.supervisor`` owns the sockets, clients and queue).

A worker (``python -m runner.worker``) is started over a private socket pair and waited
for until it is ready; it is replaced when it dies, hangs (no answer to a ping), runs a
request past its time limit, grows past the memory limit (RSS and memfds via psutil;
CUDA memory as the worker reports it) or retires itself after a request (``runner.hygiene``).

Nothing on the worker's channel is trusted, since user code can write there: each
message must arrive whole within ``CHANNEL_READ_SECONDS`` and answer what was asked (its
random id, a kind ``protocol.ROUTES`` allows as the answer), or the worker is killed as
compromised.
"""
from __future__ import annotations

import contextlib
import glob
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
from dataclasses import dataclass, field
from typing import Callable

import psutil

from . import envs, errors, shm
from .child import Child
from .errors import BadMessage, ProtocolError, describe_exit, failure
from .protocol import (PING, PROMOTE, REQUEST, STANDBY, STANDING_BY, STARTED, STATS, STOP, SUPERVISOR, WORKER,
                       VERDICT, Connection, Message, READY, answers)

# How often a wait on the worker wakes to check its memory, deadline and health.
POLL_SECONDS = 0.05
_PING_INTERVAL = 5.0
_PING_TIMEOUT = 10.0
_STOP_GRACE = 10.0
RESTART_ATTEMPTS = 3
# A message the worker has begun must be whole within this (1 GiB inline at 200 MB/s):
# user code can write part of one on the channel and stop.
CHANNEL_READ_SECONDS = 5.0
# How often the channel's watchdog looks at the deadline: a read past it ends this much late at most.
_DEADLINE_TICK = 0.1
#: Worker scratch directories are named after their server, so that a later server can
#: remove those whose server was killed before it could (``kill -9``).
_SCRATCH_PREFIX = "sourcebox-scratch-"
# What _wait_message waits for at start-up: not a message the supervisor sent, the
# worker's one STARTED message (a standby's STANDING_BY first).
_START = "start"
_STANDBY = "standby"
# What _wait_message waits for after an answer: the worker's VERDICT on itself.
_VERDICT = "verdict"


class StartFailed(Exception):
    """The worker could not start; the message holds its error and output."""


class WorkerLost(Exception):
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
    worker's, and ``tripped`` says why. One thread per worker, which looks every
    ``_DEADLINE_TICK``: setting a deadline wakes nobody, so a read costs no thread switch."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self.tripped = False
        threading.Thread(target=self._run, daemon=True, name="channel-deadline").start()

    @contextlib.contextmanager
    def bound(self, seconds: float):
        self._deadline = time.monotonic() + seconds  # one assignment: read by the watchdog's next look
        try:
            yield
        finally:
            self._deadline = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                self._cond.wait(_DEADLINE_TICK)
                deadline = self._deadline
                if deadline is not None and time.monotonic() >= deadline and self._deadline is deadline:
                    self.tripped = True
                    self._deadline = None
                    try:
                        self._sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


@dataclass(eq=False)
class WorkerHandle:
    """One worker process and its channel."""

    child: Child
    conn: Connection
    scratch: str
    watch: _ChannelDeadline
    info: dict = field(default_factory=dict)
    gpu_bytes: int | None = None
    last_ping: float = 0.0
    standby: bool = False  # started with --standby: waits for PROMOTE before its model
    greeted: bool = False  # versions exchanged
    entered: bool = False  # a standby that said it is imported and confined

    @property
    def pid(self) -> int:
        return self.child.pid

    def output_tail(self) -> str:
        return self.child.output_tail()


class WorkerLifecycle:
    """The supervisor's one worker at a time (``worker``; None between a loss and the
    next ``start``), with the counters ``status`` reports. Used from the supervisor's
    scheduling thread only. ``say`` logs a line of the supervisor's; ``log`` is where the
    worker's own output goes (each line bounded and escaped, ``runner.child``)."""

    def __init__(self, *, model: str, device: str, policy: str | None, confine: str, handlers: tuple[str, ...],
                 shm_threshold: int, threads: int, start_timeout: float, send_timeout: float,
                 memory_limit: int | None, trust_worker_channel: bool, verbose: bool,
                 say: Callable[[str], None], log, python: str | None = None, standby: bool = True):
        self.model, self.device, self.policy, self.confine = model, device, policy, confine
        self.handlers, self.shm_threshold, self.threads = handlers, shm_threshold, threads
        self.start_timeout, self.send_timeout, self.memory_limit = start_timeout, send_timeout, memory_limit
        # TEST ONLY (see Supervisor): no channel deadline, predictable ids, match by id alone.
        self._trust_worker_channel = trust_worker_channel
        self._verbose = verbose
        self._say, self._log = say, log
        self.python = python  # the worker's interpreter (serve --python); None: ours
        self.worker: WorkerHandle | None = None
        # A worker started ahead (imported, confined, waiting for its model): a restart
        # promotes it instead of starting from nothing (serve --no-standby: none is kept).
        self.keep_standby = standby
        self.standby: WorkerHandle | None = None
        self.restarts = self.retirements = 0
        self.last_crash: str | None = None
        self._request_ids = itertools.count(1)
        self._answered: int | None = None  # the request whose answer came last: its VERDICT is next

    # -- start -------------------------------------------------------------------------
    def start(self, attempts: int = 1) -> None:
        """Start a worker and wait until it is ready; ``StartFailed`` after ``attempts``
        failed tries, a growing pause between them."""
        for attempt in range(1, attempts + 1):
            try:
                self._start()
                return
            except StartFailed as exc:
                if attempt == attempts:
                    raise
                self._say(f"restart attempt {attempt} failed: {exc}")
                time.sleep(attempt)

    def _spawn(self, *, standby: bool = False, replaces: int | None = None) -> WorkerHandle:
        """A new worker process; it greets, imports, confines itself and (a ``standby``)
        waits for PROMOTE before it loads the model. Nothing is read from it here."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # A worker that stops reading must not stall our sends to it either.
        set_send_timeout(parent_end, self.send_timeout)
        scratch = tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-")
        argv = [self.python or sys.executable, "-m", "runner.worker", "--channel-fd", str(child_end.fileno()),
                "--parent-pid", str(os.getpid()), "--model", self.model, "--device", self.device,
                "--confine", self.confine, "--handlers", ",".join(self.handlers),
                "--shm-threshold", str(self.shm_threshold), "--scratch", scratch, "--threads", str(self.threads)]
        if self.policy:
            argv += ["--policy", self.policy]
        if standby:
            argv.append("--standby")
        if replaces is not None:
            # Its task bound is what a first worker gets: the serving worker's tasks will be gone.
            argv += ["--replaces", str(replaces)]
        # Temporary files the worker's libraries make before confinement (torch's
        # torchinductor_<user> cache at import) land in its scratch, removed with it.
        # cwd is the scratch directory so `-m` puts nothing of the user's on sys.path.
        # Another interpreter gets our code and none of our interpreter's paths (envs).
        base = {**envs.clean_env(), **envs.worker_pythonpath()} if self.python else None
        child = Child(argv, on_line=self._log_line, merge_stdout=True, pass_fds=(child_end.fileno(),),
                      cwd=scratch, env={"TMPDIR": scratch}, base_env=base, name="worker-output")
        child_end.close()
        return WorkerHandle(child, Connection(parent_end), scratch, _ChannelDeadline(parent_end), standby=standby)

    def _start(self) -> None:
        worker, self.standby = self.standby or self._spawn(), None
        try:
            self._greet(worker)
            message = None
            if worker.standby:
                if not worker.entered:
                    message = self._wait_message(worker, time.monotonic() + self.start_timeout, _STANDBY)
                    message.close()
                if message is None or message.kind == STANDBY:
                    _unnice(worker.pid)
                    worker.conn.send(PROMOTE, 0)
                    message = None
            if message is None:
                message = self._wait_message(worker, time.monotonic() + self.start_timeout, _START)
                message.close()
        except (WorkerLost, ProtocolError, OSError) as exc:
            self._dispose(worker)
            raise StartFailed(f"{exc}\n{worker.output_tail()}".strip()) from None
        if message.kind != READY:
            self._dispose(worker)
            raise StartFailed(f"{message.meta.get('error')}\n{worker.output_tail()}".strip())
        worker.info = message.meta
        worker.last_ping = time.monotonic()
        self.worker = worker
        info = message.meta
        # One line per start; the full sandbox report with --verbose, or from `status`.
        self._say(f"worker {worker.pid} ready in {info.get('load_seconds', 0):.1f}s"
                  f"{' (a standby, promoted)' if worker.standby else ''}: model {info.get('model')} on "
                  f"{info.get('device')}, policy {info.get('policy')}, {info.get('confinement')}")
        if self._verbose and info.get("sandbox"):
            self._say(str(info["sandbox"]))

    def _greet(self, worker: WorkerHandle) -> None:
        if not worker.greeted:
            with worker.watch.bound(self.start_timeout):
                worker.conn.greet(peer=f"worker pid {worker.pid}")
            worker.greeted = True

    def check_standby(self) -> None:
        """Start a standby when there is none (a worker is ready and the supervisor has told
        its clients so: it never slows a start; it runs at a lower CPU priority until
        promoted, runner/worker.py), and take its word that it is confined and waiting when
        that has come (no wait); one that failed or died is dropped, and the next restart
        starts afresh."""
        standby = self.standby
        if standby is None and self.keep_standby and self.worker is not None:
            try:
                self.standby = self._spawn(standby=True, replaces=self.worker.pid)
            except OSError as exc:  # no process or descriptors to spare: restarts start from nothing
                self._say(f"no standby worker: {exc}")
                self.keep_standby = False
            return
        if standby is None or standby.entered:
            return
        try:
            if standby.child.poll() is not None:
                raise WorkerLost(errors.CRASHED, "it died")
            if not select.select([standby.conn.sock], [], [], 0)[0]:
                return
            self._greet(standby)
            if not select.select([standby.conn.sock], [], [], 0)[0]:
                return
            message = self._read(standby)
            message.close()
            if message.kind != STANDBY:
                raise WorkerLost(errors.CRASHED, f"it sent {message.kind!r}: {message.meta.get('error')}")
            standby.entered = True
        except (WorkerLost, ProtocolError, OSError) as exc:
            self.standby = None
            self._dispose(standby)
            self._say(f"standby worker {standby.pid} dropped: {exc}\n{standby.output_tail()}".rstrip())

    def _log_line(self, text: str) -> None:
        try:
            self._log.write(text)
            self._log.flush()
        except (OSError, ValueError):
            pass

    # -- the channel -------------------------------------------------------------------
    def _wait_message(self, worker: WorkerHandle, deadline: float, what: str,
                      wanted_id: int | None = None) -> Message:
        """The next message from the worker that is not a stats report, checking its
        health, memory and ``deadline`` while waiting. ``what``: ``start``, or the kind of
        message it answers. Raises ``WorkerLost``."""
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise WorkerLost(errors.TIMEOUT if what == REQUEST else errors.CRASHED,
                                 {REQUEST: "the request ran past its time limit",
                                  _START: f"the worker did not become ready in {self.start_timeout:g}s",
                                  _STANDBY: f"the standby worker did not confine itself in {self.start_timeout:g}s",
                                  _VERDICT: "the worker did not finish checking itself after a request in time",
                                  PING: f"the worker did not answer a ping in {_PING_TIMEOUT:g}s"}[what])
            self.check_memory(worker)
            readable, _, _ = select.select([worker.conn.sock], [], [], min(POLL_SECONDS, deadline - now))
            if not readable:
                if worker.child.poll() is not None:
                    raise WorkerLost(errors.CRASHED, "the worker died")
                continue
            message = self._read(worker)
            if message.kind == STATS:
                message.close()
                continue
            if self._trust_worker_channel:  # TEST ONLY: the old, trusting match by id alone
                if wanted_id is not None and message.id != wanted_id:
                    message.close()
                    continue
                return message
            expected = {_START: STARTED, _STANDBY: STANDING_BY, _VERDICT: (VERDICT,)}.get(what) or \
                answers(SUPERVISOR, WORKER, what)
            if message.kind in expected and (wanted_id is None or message.id == wanted_id):
                return message
            message.close()
            # A ping's pong cannot come late (no pong in time kills the worker) and ids are
            # random: this answers nothing we asked. User code wrote it; never forward it.
            raise WorkerLost(errors.CRASHED, f"the worker sent {message.kind!r} for id {message.id} while "
                                             f"waiting for its answer to the {what}: it was killed as "
                                             "compromised (user code writing on the worker's channel)",
                             rerun=True)

    def _read(self, worker: WorkerHandle) -> Message:
        """One message from the worker, whole within ``CHANNEL_READ_SECONDS`` of its
        first byte. Raises ``WorkerLost``."""
        try:
            if self._trust_worker_channel:
                message = worker.conn.recv()  # TEST ONLY: no deadline
            else:
                with worker.watch.bound(CHANNEL_READ_SECONDS):
                    message = worker.conn.recv()
        except BadMessage as exc:
            raise WorkerLost(errors.CRASHED, f"the worker sent a malformed message ({exc}): it was killed as "
                                             "compromised") from None
        except (ProtocolError, OSError):
            if worker.watch.tripped:
                raise WorkerLost(errors.CRASHED, f"the worker left a message on its channel unfinished for "
                                                 f"{CHANNEL_READ_SECONDS:g}s (user code writing on the "
                                                 "worker's channel?): it was killed") from None
            raise WorkerLost(errors.CRASHED, "the worker died") from None
        if message.kind == STATS:
            gpu = message.meta.get("gpu")
            worker.gpu_bytes = gpu if type(gpu) is int else None
        return message

    def _drain(self, worker: WorkerHandle) -> None:
        """Before a request goes out, nothing but stats may be waiting on the channel: the
        worker was asked nothing, so anything else was written by user code."""
        while select.select([worker.conn.sock], [], [], 0)[0]:
            try:
                message = self._read(worker)
            except WorkerLost as lost:
                lost.rerun = True  # the request about to be sent did nothing to it
                raise
            message.close()
            if message.kind != STATS:
                raise WorkerLost(errors.CRASHED, f"the worker sent {message.kind!r} for id {message.id} "
                                                 "unasked: it was killed as compromised (user code writing "
                                                 "on the worker's channel)", rerun=True)

    def _new_id(self) -> int:
        """A request or ping id the worker cannot guess, so nothing written on the channel
        before a request was sent can name it."""
        if self._trust_worker_channel:
            return next(self._request_ids)  # TEST ONLY: predictable
        return int.from_bytes(os.urandom(7), "little")

    # -- requests and health -----------------------------------------------------------
    def run(self, meta: dict, frames: list, fds: list, deadline: float) -> Message:
        """Send one request to the worker and wait for its answer until ``deadline``.
        ``TypeError``/``ValueError``/``OverflowError``: it could not be sent (nothing went
        out); ``WorkerLost``: the worker is gone or was killed."""
        worker = self.worker
        request_id = self._new_id()
        if not self._trust_worker_channel:
            self._drain(worker)
        if worker.child.poll() is not None:
            # It died while idle, before this request reached it: the request runs on the next one.
            raise WorkerLost(errors.CRASHED, "the worker died while idle", rerun=True)
        try:
            worker.conn.send(REQUEST, request_id, meta, frames, fds)
        except OSError:  # its end was closed: it died before this request reached it
            raise WorkerLost(errors.CRASHED, "the worker died", rerun=True) from None
        reply = self._wait_message(worker, deadline, REQUEST, request_id)
        worker.last_ping = time.monotonic()
        if "sources" in reply.meta:
            worker.info["sources"] = reply.meta["sources"]
        self._answered = request_id
        return reply

    def verdict(self, deadline: float) -> str | None:
        """After ``run``'s answer: the worker's VERDICT on itself, why it must retire or
        ``None``. Nothing else may come meanwhile. Raises ``WorkerLost``."""
        message = self._wait_message(self.worker, deadline, _VERDICT, self._answered)
        message.close()
        retire = message.meta.get("retire")
        return None if retire is None else str(retire)

    def check_idle(self) -> None:
        """Between requests: is the worker alive, within its memory limit, answering pings?"""
        worker = self.worker
        if worker.child.poll() is not None:
            raise WorkerLost(errors.CRASHED, "the worker died while idle")
        self.check_memory(worker)
        if time.monotonic() - worker.last_ping < _PING_INTERVAL:
            return
        ping_id = self._new_id()
        worker.conn.send(PING, ping_id)
        self._wait_message(worker, time.monotonic() + _PING_TIMEOUT, PING, ping_id).close()
        worker.last_ping = time.monotonic()

    def check_memory(self, worker: WorkerHandle) -> None:
        if self.memory_limit is None:
            return
        try:
            rss = psutil.Process(worker.pid).memory_info().rss
        except psutil.NoSuchProcess:
            return  # its death shows up on the socket
        # Memfds it holds only by descriptor are in no RSS: they count too.
        for what, used in (("RSS and memfds", rss + shm.memfd_bytes(worker.pid)), ("GPU memory", worker.gpu_bytes)):
            if used is not None and used > self.memory_limit:
                raise WorkerLost(errors.MEMORY, f"the worker's {what} of {_mib(used)} went past "
                                                f"the memory limit of {_mib(self.memory_limit)}")

    def rss(self) -> int | None:
        """The worker's resident memory now (None without a worker)."""
        if self.worker is None:
            return None
        try:
            return psutil.Process(self.worker.pid).memory_info().rss
        except psutil.NoSuchProcess:
            return None

    # -- ends --------------------------------------------------------------------------
    def lose(self, lost: WorkerLost) -> dict:
        """The worker is lost: dispose of it; the failure for the request it ran."""
        worker, self.worker = self.worker, None
        returncode = self._dispose(worker)
        self.restarts += 1
        self.last_crash = f"{lost.reason} ({describe_exit(returncode)})"
        self._say(f"worker {worker.pid}: {self.last_crash}; restarting")
        reason = lost.reason
        if returncode == -signal.SIGSEGV and lost.category == errors.CRASHED:
            reason += (" of a memory fault; the model's parameters are read-only in the worker, so a request "
                       "that writes to one (an in-place op on a weight: .data.add_, copy_, load_state_dict) "
                       "ends this way: compute with a copy (weight.clone()) instead")
        return failure(lost.category, reason, returncode=returncode, stderr_tail=worker.output_tail())

    def retiring(self) -> None:
        """Count a retirement now (a ``status`` asked after the answer waits for it);
        ``retire`` follows."""
        self.retirements += 1

    def retire(self, reason: str) -> None:
        """Replace the worker before the next request runs, as planned, not as a crash:
        it found itself changed after a request (``runner.hygiene``), or serves another
        client next under ``isolate_clients``. Nobody's request fails."""
        worker, self.worker = self.worker, None
        self._dispose(worker)
        self._say(f"worker {worker.pid} retired: {reason}")

    def stop(self) -> None:
        """Ask the worker to end, kill it after a grace period, clean up after it (and the standby)."""
        standby, self.standby = self.standby, None
        if standby is not None:
            self._dispose(standby)
        worker, self.worker = self.worker, None
        if worker is None:
            return
        try:
            worker.conn.send(STOP, 0)
            worker.child.wait(_STOP_GRACE)
        except (OSError, subprocess.TimeoutExpired):
            pass  # killed below
        self._dispose(worker)

    def _dispose(self, worker: WorkerHandle) -> int:
        """Kill (if needed) and reap a worker, and remove what it leaves behind."""
        returncode = worker.child.kill()
        worker.watch.close()
        worker.conn.close()
        worker.child.close()  # reads its last lines: they belong in the crash report
        shutil.rmtree(worker.scratch, ignore_errors=True)
        return returncode


def sweep_orphan_scratch() -> list[str]:
    """Remove the scratch directories of servers that were killed before they could."""
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), _SCRATCH_PREFIX + "*")):
        owner = os.path.basename(path)[len(_SCRATCH_PREFIX):].partition("-")[0]
        if owner.isdigit() and not shm.alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _unnice(pid: int) -> None:
    """Give a promoted standby (still its only thread) the normal CPU priority back; where
    this server may not raise priorities (not root), it keeps the lower one."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 0)
    except OSError:
        pass


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"
