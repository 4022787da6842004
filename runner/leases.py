"""Shared memory a client lends its requests (``runner.Worker``'s lease table).

A request's large frames are copied into a memfd leased from a ``shm.BufferPool``, whose
descriptor travels with the request; the server maps it while the request runs. The lease
ends when the request's answer arrives (the server is done with it), which may be before
the send has even returned: this table settles that race, one request id at a time.
"""
from __future__ import annotations

import threading

from . import shm

# A request id's state between sending() and its end: being sent, or answered while
# being sent (its lease, if any, ends as soon as the send returns it).
_SENDING, _ANSWERED = object(), object()


class LeaseTable:
    """Leases of the requests in flight on one connection; thread-safe."""

    def __init__(self):
        self.pool = shm.BufferPool()
        self._lock = threading.Lock()
        self._held: dict[int, object] = {}   # request id -> _SENDING, _ANSWERED or its shm.Buffer

    def sending(self, request_id: int) -> None:
        """A message for ``request_id`` is about to go out (its answer may beat ``sent``)."""
        with self._lock:
            self._held[request_id] = _SENDING

    def sent(self, request_id: int, lease: shm.Buffer | None) -> None:
        """The send returned ``lease`` (None: all inline): hold it until the answer."""
        with self._lock:
            answered = self._held.pop(request_id, None) is _ANSWERED
            if lease is not None and not answered:
                self._held[request_id] = lease
                return
        if lease is not None:
            self.pool.release(lease)

    def answered(self, request_id: int) -> None:
        """The answer to ``request_id`` arrived: its lease ends."""
        with self._lock:
            state = self._held.pop(request_id, None)
            if state is _SENDING:
                self._held[request_id] = _ANSWERED
                return
        if isinstance(state, shm.Buffer):
            self.pool.release(state)

    def forget(self, request_id: int) -> None:
        """The send failed: nothing of ``request_id`` is held (the connection released it)."""
        with self._lock:
            self._held.pop(request_id, None)

    def close(self) -> None:
        """End every lease (the connection is gone). Result tensors still viewing the
        server's memory stay valid: mappings outlive their descriptors."""
        with self._lock:
            self._held.clear()
        self.pool.close()
