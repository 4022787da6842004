"""A client's connection to a worker server (``runner.Worker`` holds one at a time).

Authenticated before anything is sent (``auth.handshake``). Any thread may send; one
reader thread matches each answer to its request by id and hands both on. Large request
frames travel in leased shared memory (``leases``), ended by the answer.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from . import auth
from .errors import ProtocolError, WorkerCrashed, rebuild
from .leases import LeaseTable
from .protocol import CLIENT, ERROR, SERVER, ROUTES

_HANDSHAKE_SECONDS = 30.0


class ServerConnection:
    """One connection to the server at ``socket_path`` and the requests in flight on it.

    ``secret``: the server's, when this client started it (else the one beside the socket,
    or the peer checks of ``auth.connect``). Each answer goes to ``on_answer(message,
    entry)`` with the ``entry`` its request was registered with (``expect``); one that
    raises fails that entry alone (``entry.future``). When the connection is lost,
    ``lost`` says why and every entry still waiting fails with ``on_lost(reason)()``.
    """

    def __init__(self, socket_path: str, secret: bytes | None, *, shm_threshold: int,
                 on_answer: Callable[[Any, Any], None], on_lost: Callable[[str], Callable[[], BaseException]]):
        self.socket_path = socket_path
        self.leases = LeaseTable()
        try:
            self._conn, welcome, self.owner = auth.handshake(
                socket_path, secret, pool=self.leases.pool, shm_threshold=shm_threshold, timeout=_HANDSHAKE_SECONDS)
        except BaseException:
            self.leases.close()
            raise
        self._conn.sock.settimeout(None)
        self.server_pid = welcome["server_pid"]
        self._on_answer, self._on_lost = on_answer, on_lost
        self._lock = threading.Lock()
        self._pending: dict[int, Any] = {}
        #: Why this connection can no longer be used (None while it can).
        self.lost: str | None = None
        self._reader = threading.Thread(target=self._read, daemon=True, name="worker-replies")
        self._reader.start()

    # -- sending -----------------------------------------------------------------------
    def expect(self, request_id: int, entry: Any) -> None:
        """Route the answer to ``request_id`` to ``entry``; ``WorkerCrashed`` once lost."""
        with self._lock:
            if self.lost:
                raise WorkerCrashed(self.lost)
            self._pending[request_id] = entry

    def send(self, kind: str, request_id: int, meta: dict | None = None, frames: Sequence[Any] = ()) -> int:
        """Send a message whose answer is ``expect``\\ ed; return the bytes of its frames
        that travelled in the transport memory they lay in (``Worker.empty``). A send the
        server did not take unregisters it and raises ``WorkerCrashed`` (the next call
        recovers); any other failure (nothing went out) is raised as it is."""
        send = self.leases.sending(request_id)
        try:
            staged = self._conn.stage(frames)
            lease = self._conn.send_staged(kind, request_id, meta, staged)
        except BaseException as exc:
            self.leases.forget(request_id, send)
            with self._lock:
                self._pending.pop(request_id, None)
            if isinstance(exc, OSError):
                raise self.mark_lost(f"lost the connection to the worker server at {self.socket_path}: {exc}") \
                    from None
            raise
        self.leases.sent(send, lease)
        return staged.in_place

    def post(self, kind: str) -> None:
        """Send a message that expects no answer (``stop`` on the way out)."""
        self._conn.send(kind, 0)

    def mark_lost(self, reason: str) -> WorkerCrashed:
        """Note that the connection cannot be used (the first reason stays); the error
        for the call that found out."""
        with self._lock:
            self.lost = self.lost or reason
        return WorkerCrashed(reason)

    # -- answers -----------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                with self._lock:
                    entry = self._pending.pop(message.id, None)
                try:
                    if message.kind not in ROUTES[SERVER, CLIENT]:
                        raise ProtocolError(f"unknown message kind {message.kind!r}")
                    if entry is None:
                        # Id 0 is the connection itself; any other unknown id answers a
                        # request already settled (or never made): nothing to do.
                        if message.kind == ERROR and message.id == 0:
                            self.mark_lost(str(rebuild(message.meta.get("error"))))
                        continue
                    self.leases.answered(message.id)
                    self._on_answer(message, entry)
                except Exception as exc:  # a malformed answer fails its own request, not the reader
                    if entry is not None and not entry.future.done():
                        entry.future.set_exception(ProtocolError(
                            f"the worker server at {self.socket_path} sent an answer this client cannot "
                            f"read: {exc!r}"))
                finally:
                    message.close()
                    entry = None  # its future holds the result: no longer than the caller does
        except (ProtocolError, OSError):
            reason = self.lost or f"lost the connection to the worker server at {self.socket_path}"
            error = self._on_lost(reason)
            with self._lock:
                self.lost = reason
                pending, self._pending = list(self._pending.values()), {}
            for entry in pending:
                entry.future.set_exception(error())

    # -- lifetime ----------------------------------------------------------------------
    def fail_pending(self, error: Callable[[], BaseException]) -> None:
        """Fail every request still waiting with ``error()``."""
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for entry in pending:
            entry.future.set_exception(error())

    def close(self) -> None:
        """Close the socket and wait for the reader: no thread of ours may outlive this
        (one alive while the interpreter exits made torch's C++ teardown abort the
        process, "terminate called without an active exception", in about one exit in
        fifteen). Leases end too; result tensors viewing the server's memory stay valid."""
        self._conn.close()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=10)
        self.leases.close()
