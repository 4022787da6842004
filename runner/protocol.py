"""The runner's wire protocol, in one place (docs/RUNNER.md is the prose version).

A connection starts with a greeting each way, ``GREETING_MAGIC`` + u32 protocol version,
so two releases that frame messages differently still understand each other's refusal.
Then messages, each::

    prefix  "SBXM" | u32 header length | u64 inline-frame bytes      (16 bytes, little-endian)
    header  msgpack map {"k": kind, "i": request id, "m": metadata map, "f": frame descriptors}
    inline frames, back to back, in descriptor order

A message carries a list of *frames* (raw buffers: a capture bundle's header and its
tensor frames). Each frame is described by one descriptor:

    [INLINE, length]                     bytes follow in the inline area
    [SHARED, segment, offset, length]    bytes lie in a POSIX shared-memory segment

Repeated code is not deduplicated here but inside the bundle: capture sends a source
segment the worker already holds by its digest alone (docs/RUNNER.md, "Repeated code").

The prefix's inline total lets a reader skip a message whose header it cannot parse and
stay in step: such a message fails alone (``BadMessage``); only broken framing
(``ProtocolError``) ends a connection.
"""
from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import msgpack

from .errors import BadMessage, ProtocolError, ProtocolVersionError
from .shm import Lease, SegmentMap, SegmentPool, aligned

# 2: per-source-segment dedup (``miss`` lists source digests); no cached-frame descriptor.
# 3: the server proves its secret (``hello`` nonce, ``welcome`` nonce + proof, ``auth``).
PROTOCOL_VERSION = 3
GREETING_MAGIC = b"SBXRUN\r\n"
_GREETING = struct.Struct("<8sI")
MESSAGE_MAGIC = b"SBXM"
_PREFIX = struct.Struct("<4sIQ")

INLINE, SHARED = 0, 1

MAX_HEADER_BYTES = 16 << 20
MAX_INLINE_BYTES = 1 << 30
MAX_FRAMES = 1 << 16
# Frames at least this large travel through shared memory (docs/RUNNER.md, "Threshold").
DEFAULT_SHM_THRESHOLD = 128 << 10
# Inline areas above this get a one-off buffer instead of growing the reused one for good.
_REUSED_BUFFER_LIMIT = 64 << 20
_IOV_BATCH = 512


@dataclass(frozen=True)
class SharedRef:
    """A frame in a peer's shared-memory segment, passed along without being mapped."""

    name: str
    offset: int
    length: int


@dataclass
class Message:
    """One received message.

    Inline frames are read-only views of the connection's reused receive buffer: valid
    until the next ``recv`` on that connection (``detach`` copies them out). Shared-memory
    frames are writable views of the peer's segment (or ``SharedRef`` where the
    connection maps nothing); ``segments`` maps frame index to the shared-memory segment
    that frame lies in.
    """

    kind: str
    id: int
    meta: dict
    frames: list
    segments: dict

    def detach(self) -> "Message":
        """A copy whose inline frames no longer borrow the receive buffer."""
        frames = [bytes(f) if isinstance(f, memoryview) and f.readonly else f for f in self.frames]
        return Message(self.kind, self.id, self.meta, frames, dict(self.segments))


class ConnectionClosed(ProtocolError, EOFError):
    """The peer closed the connection between messages."""


def frame_view(frame: Any) -> memoryview:
    """A flat byte view of a buffer, or a clear error for anything that is not one."""
    try:
        view = memoryview(frame)
    except TypeError:
        raise TypeError(f"a frame must be a bytes-like buffer, got {type(frame).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("a frame must be C-contiguous; copy it with bytes() or .contiguous() first")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class Connection:
    """Framed messages over a connected stream socket.

    ``pool``: this side's shared-memory pool; frames of at least ``shm_threshold`` bytes
    are copied into a leased segment instead of being sent inline (no pool: everything
    inline). ``segments``: where received shared-memory frames are mapped (no map: they
    stay ``SharedRef``). ``send`` may be called from several threads; ``recv`` from one.
    """

    def __init__(self, sock: socket.socket, *, pool: SegmentPool | None = None,
                 segments: SegmentMap | None = None, shm_threshold: int = DEFAULT_SHM_THRESHOLD,
                 max_inline_bytes: int = MAX_INLINE_BYTES):
        self.sock = sock
        self.pool = pool
        self.segments = segments
        self.shm_threshold = shm_threshold
        self.max_inline_bytes = max_inline_bytes
        self._send_lock = threading.Lock()
        self._prefix = bytearray(_PREFIX.size)
        self._header = bytearray(4096)
        self._inline = bytearray(1 << 20)

    # -- greeting ---------------------------------------------------------------------
    def greet(self, *, peer: str) -> None:
        """Exchange protocol versions; raise ``ProtocolVersionError`` naming both on mismatch.

        ``peer`` names the other side in messages ("worker at /tmp/w.sock", "client pid 42").
        """
        self.sock.sendall(_GREETING.pack(GREETING_MAGIC, PROTOCOL_VERSION))
        data = bytearray(_GREETING.size)
        try:
            self._recv_exact(memoryview(data))
        except ConnectionClosed:
            raise ProtocolError(f"{peer} closed the connection before greeting") from None
        magic, version = _GREETING.unpack(data)
        if magic != GREETING_MAGIC:
            raise ProtocolError(
                f"{peer} is not a sourcebox runner endpoint (greeting {bytes(data)!r}); "
                "check the socket path")
        if version != PROTOCOL_VERSION:
            raise ProtocolVersionError(
                f"protocol version mismatch: this side speaks runner protocol {PROTOCOL_VERSION}, "
                f"{peer} speaks {version}; run the same sourcebox release on both sides")

    # -- sending ----------------------------------------------------------------------
    def send(self, kind: str, request_id: int = 0, meta: dict | None = None,
             frames: Sequence[Any] = ()) -> Lease | None:
        """Send one message; return the shared-memory lease its large frames went into.

        The caller gives the lease back to ``pool.release`` once the peer is done with it
        (for a request: when its reply arrives).
        """
        descriptors, inline, large = [], [], []
        for index, frame in enumerate(frames):
            if isinstance(frame, SharedRef):
                descriptors.append([SHARED, frame.name, frame.offset, frame.length])
            else:
                view = frame_view(frame)
                if self.pool is not None and view.nbytes >= self.shm_threshold:
                    descriptors.append(None)  # filled in once the lease exists
                    large.append((index, view))
                else:
                    descriptors.append([INLINE, view.nbytes])
                    inline.append(view)
        lease = None
        if large:
            try:
                lease = self.pool.lease(sum(aligned(view.nbytes) for _, view in large))
            except OSError:  # /dev/shm is full or missing: these frames go inline instead
                for index, view in large:
                    descriptors[index] = [INLINE, view.nbytes]
                inline = [frame_view(f) for f, d in zip(frames, descriptors) if d[0] == INLINE]
                large = []
        if large:
            try:
                for index, view in large:
                    descriptors[index] = [SHARED, lease.name, lease.put(view), view.nbytes]
            except BaseException:
                self.pool.release(lease.name)
                raise
        header = msgpack.packb({"k": kind, "i": request_id, "m": meta or {}, "f": descriptors},
                               use_bin_type=True)
        if len(header) > MAX_HEADER_BYTES:
            raise ValueError(f"message header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
        inline_total = sum(view.nbytes for view in inline)
        buffers = [_PREFIX.pack(MESSAGE_MAGIC, len(header), inline_total), header, *inline]
        try:
            with self._send_lock:
                _send_all(self.sock, buffers)
        except BaseException:
            if lease is not None:
                self.pool.release(lease.name)
            raise
        return lease

    # -- receiving --------------------------------------------------------------------
    def recv(self) -> Message:
        """Read one message. ``ConnectionClosed`` at a clean end of stream, ``ProtocolError``
        when framing is broken, ``BadMessage`` when one message is bad but skipped."""
        self._recv_exact(memoryview(self._prefix))
        magic, header_len, inline_total = _PREFIX.unpack(self._prefix)
        if magic != MESSAGE_MAGIC:
            raise ProtocolError(f"bad message prefix {bytes(self._prefix)!r}: the stream is out of step")
        if header_len > MAX_HEADER_BYTES:
            raise ProtocolError(f"message header of {header_len} bytes exceeds the limit of {MAX_HEADER_BYTES}")
        if inline_total > self.max_inline_bytes:
            raise ProtocolError(
                f"message declares {inline_total} inline bytes, over the limit of {self.max_inline_bytes}")
        header = self._fill(header_len, "_header")
        inline = self._fill(inline_total, "_inline")
        header_view = memoryview(header)[:header_len]
        try:
            return self._parse(header_view, memoryview(inline)[:inline_total].toreadonly())
        finally:
            header_view.release()

    def _fill(self, nbytes: int, attribute: str) -> bytearray:
        buffer = getattr(self, attribute)
        if nbytes > len(buffer):
            buffer = bytearray(nbytes)
            if nbytes <= _REUSED_BUFFER_LIMIT:
                setattr(self, attribute, buffer)
        self._recv_exact(memoryview(buffer)[:nbytes], mid_message=True)
        return buffer

    def _parse(self, header_bytes: memoryview, inline: memoryview) -> Message:
        try:
            header = msgpack.unpackb(header_bytes, raw=False, use_list=True, strict_map_key=True)
        except Exception as exc:  # msgpack reports malformed input with assorted types
            raise BadMessage(f"malformed message header: {exc}") from None
        if not isinstance(header, dict):
            raise BadMessage(f"message header must be a map, got {type(header).__name__}")
        request_id = header.get("i")
        if type(request_id) is not int or request_id < 0:
            raise BadMessage(f"message id must be a non-negative integer, got {request_id!r}")
        kind, meta, descriptors = header.get("k"), header.get("m"), header.get("f")
        if not isinstance(kind, str):
            raise BadMessage(f"message kind must be a string, got {kind!r}", request_id)
        if not isinstance(meta, dict):
            raise BadMessage(f"message metadata must be a map, got {type(meta).__name__}", request_id)
        if not isinstance(descriptors, list) or len(descriptors) > MAX_FRAMES:
            raise BadMessage(f"frame descriptors must be a list of at most {MAX_FRAMES}", request_id)
        frames, segments, position = [], {}, 0
        for index, descriptor in enumerate(descriptors):
            frame = self._frame(descriptor, inline, position, request_id)
            if descriptor[0] == INLINE:
                position += frame.nbytes
            elif descriptor[0] == SHARED:
                segments[index] = descriptor[1]
            frames.append(frame)
        if position != inline.nbytes:
            raise BadMessage(
                f"frame descriptors account for {position} inline bytes but the message holds "
                f"{inline.nbytes}", request_id)
        return Message(kind, request_id, meta, frames, segments)

    def _frame(self, descriptor: Any, inline: memoryview, position: int, request_id: int):
        def bad(why: str) -> BadMessage:
            return BadMessage(f"bad frame descriptor {descriptor!r}: {why}", request_id)

        if not isinstance(descriptor, list) or not descriptor:
            raise bad("expected a non-empty list")
        tag = descriptor[0]
        if tag == INLINE and len(descriptor) == 2:
            length = descriptor[1]
            if type(length) is not int or length < 0 or position + length > inline.nbytes:
                raise bad(f"length must fit in the {inline.nbytes} inline bytes")
            return inline[position:position + length]
        if tag == SHARED and len(descriptor) == 4:
            _, name, offset, length = descriptor
            if not isinstance(name, str) or not all(type(v) is int and v >= 0 for v in (offset, length)):
                raise bad("expected [SHARED, name, offset >= 0, length >= 0]")
            if self.segments is None:
                return SharedRef(name, offset, length)
            try:
                return self.segments.view(name, offset, length)
            except (OSError, ValueError) as exc:
                raise bad(str(exc)) from None
        raise bad("unknown tag or wrong number of fields")

    def _recv_exact(self, view: memoryview, *, mid_message: bool = False) -> None:
        received = 0
        while received < view.nbytes:
            try:
                count = self.sock.recv_into(view[received:])
            except ConnectionResetError:
                count = 0  # a peer that closed with our data unread: closed all the same
            if count == 0:
                if received or mid_message:
                    raise ProtocolError("the peer closed the connection in the middle of a message")
                raise ConnectionClosed("the peer closed the connection")
            received += count

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _send_all(sock: socket.socket, buffers: Iterable[Any]) -> None:
    """``sendall`` for a list of buffers, gathered by ``sendmsg`` without joining them."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        sent = sock.sendmsg(pending[:_IOV_BATCH])
        while sent:
            head = pending[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[sent:]
                sent = 0
