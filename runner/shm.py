"""Memory for large frames: anonymous memfds passed over the Unix socket, never names.

A frame of at least the threshold travels in a memfd (``memfd_create``) whose file
descriptor rides along with its message (``SCM_RIGHTS``). No process can open it by name,
and it is freed when its last holder (descriptor or mapping) goes, so a ``kill -9`` of
anyone leaves nothing behind.

- The client's requests: a pool of memfds it reuses (fresh pages per message cost 4-7x in
  page faults), sealed against shrinking so a mapping of them can never fault past the end.
- The worker maps a request's memfds for that request only (``RequestMemory``) and
  lets go of them before it replies.
- Transport memory (``allocate``): a memfd the client's own tensors live in (``Worker.empty``),
  sealed like the pool's; a request frame inside it travels as its descriptor, not copied.
- The worker's results: a fresh memfd per reply, written without mapping it, then sealed
  read-only (``F_SEAL_WRITE``); the client maps it copy-on-write (``map_result``), so its
  tensor is writable and zero-copy, and nothing in the worker can change it any more.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import threading
import weakref

import psutil

ALIGN = 64
# Pooled buffers are sized in powers of two from here, so a pool serves varied sizes by reuse.
MIN_BUFFER_BYTES = 1 << 20
# Idle pooled buffers beyond this many bytes are freed (memfd pages are RAM).
DEFAULT_MAX_IDLE_BYTES = 512 << 20
# A request's memfd may not shrink under the worker's mapping (SIGBUS); a result's may not
# change at all once the client holds it.
REQUEST_SEALS = fcntl.F_SEAL_SHRINK
RESULT_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# Test-only switches, read once at start-up (by the worker, and the client for the second):
# they turn a protection off so the tests can show its attack working without it.
KEEP_REQUEST_MEMORY = os.environ.get("SOURCEBOX_TEST_KEEP_REQUEST_MEMORY") == "1"
UNSEALED_RESULTS = os.environ.get("SOURCEBOX_TEST_UNSEALED_RESULTS") == "1"
SHARED_REQUEST_MAPPINGS = os.environ.get("SOURCEBOX_TEST_SHARED_REQUEST_MAPPINGS") == "1"
# Sealed on the client's request memfds once the client has mapped them: the client keeps
# writing through its own mapping, but whoever else holds the descriptor (a worker taken
# over by user code) can map it neither shared-writable nor write() it. The test-only
# switch above is its control, so it leaves the seal off too.
_F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
LENT_SEALS = 0 if SHARED_REQUEST_MAPPINGS else _F_SEAL_FUTURE_WRITE
# What those switches keep alive on purpose.
_kept: list = []

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
_MAP_FAILED = ctypes.c_void_p(-1).value
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        return fd
    except BaseException:
        os.close(fd)
        raise


class Buffer:
    """One pooled memfd of the client, mapped writable here, filled once per message."""

    __slots__ = ("fd", "size", "_mmap", "view", "used")

    def __init__(self, size: int):
        self.fd = _memfd("sourcebox-request", size)
        try:
            # Reserve the pages now: out of memory fails here (frames then go inline)
            # instead of killing whoever first touches a page with SIGBUS.
            os.posix_fallocate(self.fd, 0, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, REQUEST_SEALS | fcntl.F_SEAL_GROW)
            self._mmap = mmap.mmap(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, LENT_SEALS)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self.view = memoryview(self._mmap)
        self.used = 0

    def put(self, frame: memoryview) -> int:
        """Copy ``frame`` in at the next aligned offset; return that offset."""
        offset = aligned(self.used)
        self.view[offset:offset + frame.nbytes] = frame
        self.used = offset + frame.nbytes
        return offset

    def finish(self) -> None:
        """Nothing to do: the worker only reads it, during the request."""

    def close(self) -> None:
        self.view.release()
        self._mmap.close()
        os.close(self.fd)


class BufferPool:
    """The client's request buffers, reused across messages.

    ``lease(n)`` hands out the smallest idle buffer of at least ``n`` bytes (creating one
    when none fits); ``release(buffer)`` takes it back once the worker is done with it
    (its reply arrived). Idle buffers beyond ``max_idle_bytes`` are freed.
    """

    def __init__(self, *, max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES):
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[Buffer] = []
        self._leased: set[Buffer] = set()
        self._lock = threading.Lock()
        self._closed = False

    def lease(self, nbytes: int) -> Buffer:
        with self._lock:
            if self._closed:
                raise RuntimeError("the shared-memory pool is closed")
            fitting = [buffer for buffer in self._idle if buffer.size >= nbytes]
            if fitting:
                buffer = min(fitting, key=lambda b: b.size)
                self._idle.remove(buffer)
            else:
                buffer = Buffer(max(MIN_BUFFER_BYTES, 1 << (max(nbytes, 1) - 1).bit_length()))
            buffer.used = 0
            self._leased.add(buffer)
            return buffer

    def release(self, buffer: Buffer) -> None:
        with self._lock:
            if self._closed:
                return  # closed with the pool
            self._leased.discard(buffer)
            self._idle.append(buffer)
            while sum(b.size for b in self._idle) > self.max_idle_bytes:
                largest = max(self._idle, key=lambda b: b.size)
                self._idle.remove(largest)
                largest.close()

    def locate(self, view: memoryview) -> tuple[int, int] | None:
        """Where ``view`` already lies in transport memory (``allocate``): it travels as is."""
        return locate(view)

    def stats(self) -> dict:
        with self._lock:
            return {"idle": len(self._idle), "leased": len(self._leased),
                    "bytes": sum(b.size for b in (*self._idle, *self._leased))}

    def close(self) -> None:
        """Free every buffer, leased ones too: requests still out when the connection
        closes get no reply (the worker holds its own descriptor for one it still reads)."""
        with self._lock:
            self._closed = True
            for buffer in (*self._idle, *self._leased):
                buffer.close()
            self._idle.clear()
            self._leased.clear()


class _Region(mmap.mmap):
    """A memfd mapped shared whose descriptor lives exactly as long as the mapping object
    (``allocate``); a subclass so that it can carry the descriptor and be weakly referenced."""


_regions: dict[int, tuple[weakref.ref, int, int]] = {}  # start address -> (region, size, fd)
_regions_lock = threading.Lock()


def allocate(nbytes: int) -> mmap.mmap:
    """Writable transport memory of at least ``nbytes``: a memfd sealed against shrinking
    and growing (what the supervisor and the worker check), with its pages reserved, mapped
    shared here. A frame that lies inside it is sent as its descriptor and offset, without a
    copy (``locate``). The memfd is closed when the returned object (and every tensor or
    array made over it) is gone."""
    size = max(mmap.PAGESIZE, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    fd = _memfd("sourcebox-transport", size)
    try:
        os.posix_fallocate(fd, 0, size)  # out of memory fails here, not as a SIGBUS later
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUEST_SEALS | fcntl.F_SEAL_GROW)
        region = _Region(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, LENT_SEALS)
    except BaseException:
        os.close(fd)
        raise
    anchor = ctypes.c_char.from_buffer(region)
    address = ctypes.addressof(anchor)
    del anchor  # an export of the mapping; the address stays valid as long as the region
    with _regions_lock:
        _regions[address] = (weakref.ref(region), size, fd)
    weakref.finalize(region, _forget, address, fd)
    return region


def _forget(address: int, fd: int) -> None:
    with _regions_lock:
        _regions.pop(address, None)
    os.close(fd)


def locate(view: memoryview) -> tuple[int, int] | None:
    """``(fd, offset)`` when ``view`` lies inside memory from ``allocate``, else ``None``."""
    if not _regions or view.readonly or view.nbytes == 0:
        return None
    anchor = ctypes.c_char.from_buffer(view)
    start = ctypes.addressof(anchor)
    del anchor
    with _regions_lock:
        for address, (ref, size, fd) in _regions.items():
            if address <= start and start + view.nbytes <= address + size and ref() is not None:
                return fd, start - address
    return None


class SealedBuffer:
    """A fresh memfd for one reply's large frames: written with ``pwrite`` (the worker
    never maps it), then sealed read-only before its descriptor leaves."""

    __slots__ = ("fd", "size", "used")

    def __init__(self, size: int):
        self.fd = _memfd("sourcebox-result", size)
        self.size = size
        self.used = 0

    def put(self, frame: memoryview) -> int:
        offset = aligned(self.used)
        done = 0
        while done < frame.nbytes:
            done += os.pwrite(self.fd, frame[done:], offset + done)
        self.used = offset + frame.nbytes
        return offset

    def finish(self) -> None:
        if not UNSEALED_RESULTS:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, RESULT_SEALS)

    def close(self) -> None:
        os.close(self.fd)


class SealedWriter:
    """The worker's side: every reply gets its own ``SealedBuffer``; ``release`` closes
    the worker's descriptor once the message is sent, so the worker keeps nothing."""

    def lease(self, nbytes: int) -> SealedBuffer:
        return SealedBuffer(max(nbytes, 1))

    def locate(self, view: memoryview) -> None:
        """Never in place: a result goes out in a fresh memfd sealed against writes, which
        the client requires, so no frame of a reply travels in memory the worker could change."""
        return None

    def release(self, buffer: SealedBuffer) -> None:
        if UNSEALED_RESULTS:
            _kept.append(buffer)  # the test-only control: the worker keeps a writable handle
            return
        buffer.close()


def _map(fd: int, size: int, flags: int, prot: int = mmap.PROT_READ | mmap.PROT_WRITE) -> tuple[ctypes.Array, int]:
    """Map ``size`` bytes of ``fd`` (read-write unless ``prot`` says otherwise); the mapping
    lives as long as the returned ctypes array (and every view of it), not as long as ``fd``."""
    address = _libc.mmap(None, size, prot, flags, fd, 0)
    if address is None or address == _MAP_FAILED:
        error = ctypes.get_errno()
        raise OSError(error, f"mmap of a received memfd failed: {os.strerror(error)}")
    holder = (ctypes.c_char * size).from_address(address)
    weakref.finalize(holder, _libc.munmap, address, size).atexit = False
    return holder, address


def check_request_fd(fd: int, what: str) -> int:
    """The size of a memfd a client passed for a request; ``ValueError`` for anything else
    (the supervisor lets no other kind of descriptor, a socket say, into the sandbox)."""
    return _checked_size(fd, REQUEST_SEALS, what)


def _checked_size(fd: int, required_seals: int, what: str) -> int:
    """The size of a received memfd, after checking it is one and carries the seals its
    use needs; ``ValueError`` naming what is wrong otherwise."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ValueError(f"{what} is not a sealable memfd") from None
    if seals & required_seals != required_seals:
        raise ValueError(f"{what} lacks the seals it must carry ({seals:#x}, needs {required_seals:#x})")
    size = os.fstat(fd).st_size
    if size == 0:
        raise ValueError(f"{what} is empty")
    return size


def _views(refs, holders) -> list:
    views = []
    for ref in refs:
        holder, size = holders[ref.fd]
        if ref.offset + ref.length > size:
            raise ValueError(f"a frame at offset {ref.offset} of {ref.length} bytes runs past the end "
                             f"of its memfd ({size} bytes)")
        views.append(memoryview(holder).cast("B")[ref.offset:ref.offset + ref.length])
    return views


class RequestMemory:
    """A request's memfds, mapped for the request's duration only.

    ``views(refs)`` maps each memfd once, closes its descriptor at once, and returns
    writable views of the frames. The mapping is copy-on-write (``MAP_PRIVATE``): reading
    is zero-copy, and what the request writes stays in this process, so a client's own
    tensor lent in transport memory (``Worker.empty``) cannot be changed by the worker. ``release()`` drops the mappings before the reply, so no
    later request finds the client's data in ``/proc/self/fd``, ``/proc/self/maps`` or
    ``/proc/self/mem``. A mapping that user code still views (a tensor it kept) is
    replaced in place by a private copy of its bytes, so the kept tensor stays valid and
    the client's memfd is gone all the same.
    """

    def __init__(self):
        self._mapped: list[tuple[weakref.ref, int, int]] = []

    def views(self, refs: list, fds: list[int]) -> list:
        holders = {}
        try:
            for index in sorted({ref.fd for ref in refs}):
                size = check_request_fd(fds[index], f"file descriptor {index} of the request")
                holder, address = _map_request(fds[index], size)
                holders[index] = holder, size
                self._mapped.append((weakref.ref(holder), address, size))
            return _views(refs, holders)
        finally:
            if not KEEP_REQUEST_MEMORY:
                for fd in fds:
                    os.close(fd)
            else:
                _kept.append(holders)  # the test-only control: mappings and descriptors stay
            fds.clear()

    def release(self) -> None:
        if KEEP_REQUEST_MEMORY:
            return
        mapped, self._mapped = self._mapped, []
        for ref, address, size in mapped:
            if ref() is not None:
                _replace_with_copy(address, size)


def _map_request(fd: int, size: int) -> tuple[ctypes.Array, int]:
    """A request memfd mapped copy-on-write. Kernels before 6.7 refuse a writable private
    mapping of a memfd sealed against future writes (``LENT_SEALS``): there the memfd is
    mapped read-only and swapped at once for a private copy of its bytes."""
    if SHARED_REQUEST_MAPPINGS:
        return _map(fd, size, mmap.MAP_SHARED)
    try:
        return _map(fd, size, mmap.MAP_PRIVATE)
    except PermissionError:
        holder, address = _map(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        _replace_with_copy(address, size)
        return holder, address


def _replace_with_copy(address: int, size: int) -> None:
    """Swap the shared mapping at ``address`` for a private anonymous copy of its bytes,
    atomically (``mremap`` over it): whoever views it keeps the same data."""
    copy = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if copy is None or copy == _MAP_FAILED:
        raise MemoryError(f"no memory for a private copy of a kept request frame ({size} bytes)")
    ctypes.memmove(copy, address, size)
    if _libc.mremap(copy, size, size, _MREMAP_MAYMOVE | _MREMAP_FIXED, address) == _MAP_FAILED:
        error = ctypes.get_errno()
        _libc.munmap(copy, size)
        raise OSError(error, f"mremap over a kept request frame failed: {os.strerror(error)}")


def map_result(refs: list, fds: list[int]) -> list:
    """Views of a reply's large frames: each sealed memfd mapped copy-on-write (writable
    here, unchangeable by the worker), descriptors closed at once. The mapping is freed
    when the last view of it goes."""
    holders = {}
    required = 0 if UNSEALED_RESULTS else RESULT_SEALS
    try:
        for index in sorted({ref.fd for ref in refs}):
            size = _checked_size(fds[index], required, f"file descriptor {index} of the reply")
            holders[index] = _map(fds[index], size, mmap.MAP_PRIVATE)[0], size
        return _views(refs, holders)
    finally:
        for fd in fds:
            os.close(fd)
        fds.clear()


def memfd_bytes(pid: int) -> int:
    """Bytes of memfd memory that process ``pid`` holds through open descriptors (each
    memfd once). Its RSS counts only what it maps, so this is added to the RSS for the
    memory limit (a descriptor it also maps is counted twice: the limit errs strict)."""
    total, seen = 0, set()
    directory = f"/proc/{pid}/fd"
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        path = f"{directory}/{name}"
        try:
            if not os.readlink(path).startswith("/memfd:"):
                continue
            stat = os.stat(path)
        except OSError:
            continue  # closed meanwhile
        if stat.st_ino not in seen:
            seen.add(stat.st_ino)
            total += stat.st_blocks * 512
    return total


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited."""
    # A zombie (dead, not yet reaped by its parent) owns nothing any more.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
