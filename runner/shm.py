"""POSIX shared-memory segments for large frames: a pool of our own, a map of the peer's.

Every process owns the segments it creates and is the only one to unlink them while it
lives. Names are ``sbx-<owner pid>-<pool token>-<serial>``, so whoever survives a
``kill -9`` of the owner can find and unlink what the dead process left behind
(``unlink_pool``, ``sweep_orphans``).

The multiprocessing resource tracker is deliberately not involved: it unlinks segments
when *any* process that opened them exits, including a peer that only mapped them.
Segments are created with ``_posixshmem.shm_open`` (what ``multiprocessing.shared_memory``
uses underneath) and mapped with ``mmap``; their lifecycle is ours alone.
"""
from __future__ import annotations

import collections
import mmap
import os
import re
import secrets
import threading

import _posixshmem
import psutil

PREFIX = "sbx"
SHM_DIR = "/dev/shm"
NAME_PATTERN = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]{{8}})-(\d+)$")
ALIGN = 64
# Segments are sized in powers of two from here, so a pool serves varied sizes by reuse.
MIN_SEGMENT_BYTES = 1 << 20
# Idle segments kept for reuse beyond this many bytes are unlinked (tmpfs is RAM).
DEFAULT_MAX_IDLE_BYTES = 512 << 20


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def owner_pid(name: str) -> int | None:
    """The pid in one of our segment names, or ``None`` for any other name."""
    match = NAME_PATTERN.match(name)
    return int(match.group(1)) if match else None


class Segment:
    """One mapped POSIX shared-memory segment."""

    __slots__ = ("name", "size", "_mmap", "view")

    def __init__(self, name: str, size: int, mapping: mmap.mmap):
        self.name = name
        self.size = size
        self._mmap = mapping
        self.view = memoryview(mapping)

    @classmethod
    def create(cls, name: str, size: int) -> "Segment":
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            # Reserve the pages now: a full /dev/shm then fails here with ENOSPC instead
            # of killing whoever first writes to the page with SIGBUS.
            os.posix_fallocate(fd, 0, size)
            return cls(name, size, mmap.mmap(fd, size))
        except BaseException:
            _posixshmem.shm_unlink("/" + name)
            raise
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, name: str) -> "Segment":
        """Map a segment another process created (its size is read from the segment)."""
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise ValueError(f"shared-memory segment {name} is empty")
            return cls(name, size, mmap.mmap(fd, size))
        finally:
            os.close(fd)

    def close(self) -> None:
        """Unmap, unless views of it are still alive (zero-copy tensors a user kept):
        then the mapping goes away with the last of them."""
        try:
            self.view.release()
            self._mmap.close()
        except BufferError:
            pass

    def unlink(self) -> None:
        unlink(self.name)


def unlink(name: str) -> bool:
    """Remove a segment's name; ``False`` if it was already gone."""
    try:
        _posixshmem.shm_unlink("/" + name)
        return True
    except FileNotFoundError:
        return False


class Lease:
    """A pooled segment handed out for one message; give it back with ``SegmentPool.release``."""

    __slots__ = ("segment", "used")

    def __init__(self, segment: Segment):
        self.segment = segment
        self.used = 0

    @property
    def name(self) -> str:
        return self.segment.name

    def put(self, frame: memoryview) -> int:
        """Copy ``frame`` in at the next aligned offset; return that offset."""
        offset = aligned(self.used)
        self.segment.view[offset:offset + frame.nbytes] = frame
        self.used = offset + frame.nbytes
        return offset


class SegmentPool:
    """The segments this process owns, reused across messages.

    ``lease(n)`` hands out the smallest idle segment of at least ``n`` bytes (creating one
    when none fits); ``release(name)`` takes it back once the peer is done with it. Idle
    segments beyond ``max_idle_bytes`` are unlinked. ``close()`` unlinks everything.
    ``dropped()`` returns (and forgets) the names unlinked since the last call, so the
    peer can be told to unmap them.
    """

    def __init__(self, *, max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES):
        self.pid = os.getpid()
        self.token = secrets.token_hex(4)
        self.max_idle_bytes = max_idle_bytes
        self._serial = 0
        self._idle: list[Segment] = []
        self._leased: dict[str, Segment] = {}
        self._dropped: list[str] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def prefix(self) -> str:
        """The name prefix of every segment of this pool."""
        return f"{PREFIX}-{self.pid}-{self.token}-"

    def lease(self, nbytes: int) -> Lease:
        with self._lock:
            if self._closed:
                raise RuntimeError("the shared-memory pool is closed")
            fitting = [segment for segment in self._idle if segment.size >= nbytes]
            if fitting:
                segment = min(fitting, key=lambda s: s.size)
                self._idle.remove(segment)
            else:
                size = max(MIN_SEGMENT_BYTES, 1 << (max(nbytes, 1) - 1).bit_length())
                self._serial += 1
                segment = Segment.create(f"{self.prefix}{self._serial}", size)
            self._leased[segment.name] = segment
            return Lease(segment)

    def release(self, name: str) -> bool:
        """Return a leased segment to the idle set; ``False`` for a name not leased here."""
        with self._lock:
            segment = self._leased.pop(name, None)
            if segment is None:
                return False
            if self._closed:
                self._discard(segment)
                return True
            self._idle.append(segment)
            while sum(s.size for s in self._idle) > self.max_idle_bytes:
                self._discard(max(self._idle, key=lambda s: s.size))
            return True

    def _discard(self, segment: Segment) -> None:
        if segment in self._idle:
            self._idle.remove(segment)
        segment.close()
        segment.unlink()
        self._dropped.append(segment.name)

    def dropped(self) -> list[str]:
        with self._lock:
            names, self._dropped = self._dropped, []
            return names

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefix)

    def stats(self) -> dict:
        with self._lock:
            return {
                "idle": len(self._idle), "leased": len(self._leased),
                "bytes": sum(s.size for s in self._idle) + sum(s.size for s in self._leased.values()),
            }

    def close(self) -> None:
        """Unmap and unlink every segment, leased or idle."""
        with self._lock:
            self._closed = True
            for segment in [*self._idle, *self._leased.values()]:
                segment.close()
                segment.unlink()
            self._idle.clear()
            self._leased.clear()


class SegmentMap:
    """Segments owned by peers, mapped on first use and kept mapped for reuse.

    Mapping is the expensive part (a fresh mapping of 64 MiB costs page-table work on
    every first touch), so mappings are cached by name, the ``max_mapped`` most recently
    used of them. The owner says when a name is unlinked (``forget``) or the peer is gone
    (``forget_prefix``); the bound covers the rest (a segment another client's reply
    dropped), so an unlinked segment's memory is never held for long.
    """

    def __init__(self, max_mapped: int = 16):
        self.max_mapped = max_mapped
        self._segments: collections.OrderedDict[str, Segment] = collections.OrderedDict()
        self._lock = threading.Lock()

    def view(self, name: str, offset: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at ``offset`` in the peer's segment ``name``."""
        if owner_pid(name) is None:
            raise ValueError(f"{name!r} is not a sourcebox shared-memory segment name")
        with self._lock:
            segment = self._segments.get(name)
            if segment is None:
                try:
                    segment = Segment.attach(name)
                except FileNotFoundError:
                    raise ValueError(f"shared-memory segment {name} does not exist") from None
                self._segments[name] = segment
                while len(self._segments) > self.max_mapped:
                    self._segments.popitem(last=False)[1].close()
            else:
                self._segments.move_to_end(name)
        if offset < 0 or length < 0 or offset + length > segment.size:
            raise ValueError(
                f"frame at offset {offset} of {length} bytes runs past the end of segment "
                f"{name} ({segment.size} bytes)")
        return segment.view[offset:offset + length]

    def forget(self, names) -> None:
        with self._lock:
            for name in names:
                segment = self._segments.pop(name, None)
                if segment is not None:
                    segment.close()

    def forget_prefix(self, prefix: str) -> None:
        with self._lock:
            names = [name for name in self._segments if name.startswith(prefix)]
        self.forget(names)

    def close(self) -> None:
        with self._lock:
            names = list(self._segments)
        self.forget(names)


def unlink_matching(prefix: str) -> list[str]:
    """Unlink every segment whose name starts with ``prefix``; return the names removed."""
    removed = []
    for name in _listing():
        if name.startswith(prefix) and unlink(name):
            removed.append(name)
    return removed


def owned_by(pid: int) -> list[str]:
    """Names of our segments whose owner is ``pid``."""
    return [name for name in _listing() if owner_pid(name) == pid]


def sweep_orphans() -> list[str]:
    """Unlink our segments whose owner process no longer exists; return their names."""
    removed = []
    for name in _listing():
        pid = owner_pid(name)
        if pid is not None and not alive(pid) and unlink(name):
            removed.append(name)
    return removed


def _listing() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited."""
    # A zombie (dead, not yet reaped by its parent) owns nothing any more.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
