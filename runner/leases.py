"""Shared memory a client lends its requests (``runner.Worker``'s lease table).

A request's large frames are copied into a memfd leased from a ``shm.BufferPool``, whose
descriptor travels with the request; the server maps it while the request runs. The lease
ends when the request's answer arrives (the server is done with it), which may be before
the send has even returned: this table settles that race.
"""
from __future__ import annotations

import itertools
import threading

from . import shm

# A send's state until its lease ends: being sent, or answered while being sent (its
# lease, if any, ends as soon as the send returns it).
_SENDING, _ANSWERED = object(), object()


class LeaseTable:
    """Leases of the requests in flight on one connection; thread-safe.

    State is kept per send, not per request id: a request resent after a ``miss`` goes out
    again under the same id while the first send may not have returned its lease yet."""

    def __init__(self):
        self.pool = shm.BufferPool()
        self._lock = threading.Lock()
        self._sends = itertools.count(1)
        self._latest: dict[int, int] = {}     # request id -> its latest send
        self._held: dict[int, object] = {}    # send -> _SENDING, _ANSWERED or its shm.Buffer

    def sending(self, request_id: int) -> int:
        """A message for ``request_id`` is about to go out (its answer may beat ``sent``);
        returns the send's number, for ``sent`` or ``forget``."""
        with self._lock:
            send = next(self._sends)
            self._latest[request_id] = send
            self._held[send] = _SENDING
            return send

    def sent(self, send: int, lease: shm.Buffer | None) -> None:
        """The send returned ``lease`` (None: all inline): hold it until the answer."""
        with self._lock:
            if self._held.pop(send, None) is _SENDING and lease is not None:
                self._held[send] = lease
                return
        if lease is not None:
            self.pool.release(lease)

    def answered(self, request_id: int) -> None:
        """The answer to ``request_id`` arrived: the lease of its latest send ends."""
        with self._lock:
            send = self._latest.pop(request_id, None)
            state = self._held.pop(send, None)
            if state is _SENDING:
                self._held[send] = _ANSWERED
                return
        if isinstance(state, shm.Buffer):
            self.pool.release(state)

    def forget(self, request_id: int, send: int) -> None:
        """The send failed: nothing of it is held (the connection released its buffer)."""
        with self._lock:
            self._held.pop(send, None)
            if self._latest.get(request_id) == send:
                del self._latest[request_id]

    def close(self) -> None:
        """End every lease (the connection is gone). Result tensors still viewing the
        server's memory stay valid: mappings outlive their descriptors."""
        with self._lock:
            self._held.clear()
            self._latest.clear()
        self.pool.close()
