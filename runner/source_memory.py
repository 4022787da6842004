"""What a client believes the worker's source store holds (docs/RUNNER.md, "Repeated code").

A source segment the worker already holds is sent by its digest alone. The belief is
updated from the worker's answers: a reply means the request's segments were decoded
there (so are held now), a ``miss`` names those it lacks, and a store id that changes
means a new worker with an empty store (a restart). Replies arrive in the order the
worker served them, so an old store's id never follows a new one's.
"""
from __future__ import annotations

import threading
from typing import Any, Iterable


class SourceMemory:
    """Digests of the source segments the worker is believed to hold; thread-safe.

    It is passed as ``known_sources`` to ``capture.encode``, which only tests membership."""

    def __init__(self):
        self._lock = threading.Lock()
        self._digests: set[str] = set()
        self._store_id: str | None = None

    def __contains__(self, digest: object) -> bool:
        return digest in self._digests

    def __len__(self) -> int:
        return len(self._digests)

    def note_store(self, sources: Any) -> None:
        """An answer's ``sources`` summary: forget everything once it names a new store."""
        store_id = sources.get("id") if isinstance(sources, dict) else None
        with self._lock:
            if store_id is not None and store_id != self._store_id:
                self._digests.clear()
                self._store_id = store_id

    def held(self, digests: Iterable[str]) -> None:
        """The worker decoded a request with these segments: its store has them now."""
        with self._lock:
            self._digests.update(digests)

    def missing(self, digests: Any) -> None:
        """The worker answered ``miss`` naming these: it does not hold them."""
        if isinstance(digests, list):
            with self._lock:
                self._digests.difference_update(d for d in digests if isinstance(d, str))

    def forget(self) -> None:
        """A new connection, maybe to a new worker: believe nothing."""
        with self._lock:
            self._digests.clear()
            self._store_id = None
