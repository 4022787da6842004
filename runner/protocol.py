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
    [SHARED, fd, offset, length]         bytes lie in a memfd passed with the message:
                                         ``fd`` indexes the descriptors it carries
                                         (``SCM_RIGHTS``, at most ``MAX_FDS``)

Repeated code is not deduplicated here but inside the bundle: capture sends a source
segment the worker already holds by its digest alone (docs/RUNNER.md, "Repeated code").

The prefix's inline total lets a reader skip a message whose header it cannot parse and
stay in step: such a message fails alone (``BadMessage``); only broken framing
(``ProtocolError``) ends a connection.
"""
from __future__ import annotations

import array
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import msgpack

from .errors import BadMessage, ProtocolError, ProtocolVersionError
from .shm import aligned

# 2: per-source-segment dedup (``miss`` lists source digests); no cached-frame descriptor.
# 3: large frames in memfds passed as descriptors (SCM_RIGHTS), not named segments; the
#    server proves its secret (``hello`` nonce, ``welcome`` nonce + proof, ``auth``).
PROTOCOL_VERSION = 3
GREETING_MAGIC = b"SBXRUN\r\n"
_GREETING = struct.Struct("<8sI")
MESSAGE_MAGIC = b"SBXM"
_PREFIX = struct.Struct("<4sIQ")

INLINE, SHARED = 0, 1

# -- message kinds ------------------------------------------------------------------------
# The wire strings never change meaning within a protocol version; code names them by
# these constants only, and every receiver checks a kind against ``ROUTES``.
HELLO, WELCOME, AUTH, OWNER = "hello", "welcome", "auth", "owner"
REQUEST, REPLY, MISS, ERROR = "request", "reply", "miss", "error"
PING, PONG, STATUS, WAIT_READY, READY = "ping", "pong", "status", "wait_ready", "ready"
STOP, STOPPING, FAILED, STATS = "stop", "stopping", "failed", "stats"
STANDBY, PROMOTE, VERDICT = "standby", "promote", "verdict"

#: What the worker sends once when it has started, or could not.
STARTED = (READY, FAILED)
#: What a standby worker sends once it is confined and waits for PROMOTE, or could not start.
STANDING_BY = (STANDBY, FAILED)

# The four ends of the two links: client <-> server (the supervisor's socket) and
# supervisor <-> worker (the worker's private channel).
CLIENT, SERVER, SUPERVISOR, WORKER = "client", "server", "supervisor", "worker"

#: Who sends what to whom, and which kinds answer it (same id; empty: no answer, or the
#: message is itself an answer). Id 0 is the connection itself: an ``error`` with id 0
#: from the server says why it refuses or drops the connection.
ROUTES: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {
    (CLIENT, SERVER): {
        HELLO: (WELCOME, ERROR),          # first message: the client's nonce
        AUTH: (OWNER, ERROR),             # the client's proof that it holds the secret
        REQUEST: (REPLY, MISS, ERROR),    # a bundle for a handler kind
        PING: (PONG,),
        STATUS: (STATUS,),
        WAIT_READY: (READY, ERROR),       # answered once the worker has started (or failed to)
        STOP: (STOPPING, ERROR),          # from the owner only
    },
    (SERVER, CLIENT): {kind: () for kind in (WELCOME, OWNER, REPLY, MISS, ERROR, PONG, STATUS, READY, STOPPING)},
    (SUPERVISOR, WORKER): {
        REQUEST: (REPLY, MISS, ERROR),  # then, once the worker has checked itself, VERDICT
        PING: (PONG,),
        PROMOTE: STARTED,                 # a standby worker loads its model and becomes the worker
        STOP: (),                         # the worker ends
    },
    # READY or FAILED answer the worker's start (a standby's: STANDBY, then READY or FAILED
    # after PROMOTE); STATS (CUDA memory) come unasked; VERDICT follows each answer to a
    # request (with its id): whether the worker retires.
    (WORKER, SUPERVISOR): {kind: () for kind in (READY, FAILED, STANDBY, STATS, REPLY, MISS, ERROR, PONG, VERDICT)},
}


def kinds(sender: str, receiver: str) -> tuple[str, ...]:
    """The kinds ``sender`` may send ``receiver``, in the table's order."""
    return tuple(ROUTES[sender, receiver])


def answers(sender: str, receiver: str, kind: str) -> tuple[str, ...]:
    """The kinds that answer a ``kind`` message from ``sender`` to ``receiver``."""
    return ROUTES[sender, receiver][kind]

MAX_HEADER_BYTES = 16 << 20
MAX_INLINE_BYTES = 1 << 30
MAX_FRAMES = 1 << 16
# Descriptors one message may carry (a request or a reply uses one).
MAX_FDS = 8
_ANCILLARY_BYTES = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
# Frames at least this large travel through shared memory (docs/RUNNER.md, "Threshold").
DEFAULT_SHM_THRESHOLD = 128 << 10
# Inline areas above this get a one-off buffer instead of growing the reused one for good.
_REUSED_BUFFER_LIMIT = 64 << 20
# The first step of a buffer grown as a large message's bytes arrive (``Connection._fill``).
_FIRST_GROWTH = 1 << 20
_IOV_BATCH = 512
# Messages up to this size may be sent by ``try_send`` (far below a Unix socket's default
# send buffer of 208 KiB, half of which the kernel takes as one piece).
_TRY_SEND_BYTES = 32 << 10


@dataclass(frozen=True)
class SharedRef:
    """A frame in a memfd the message carries: ``fd`` is the index in its descriptors."""

    fd: int
    offset: int
    length: int


@dataclass
class Message:
    """One received message.

    Inline frames are read-only views of the connection's reused receive buffer: valid
    until the next ``recv`` on that connection (``detach`` copies them out). Frames in
    memfds are ``SharedRef``s into ``fds``, the descriptors that came with the message:
    the receiver owns them, maps them (``runner.shm``) or forwards them, and closes them
    (``close``).
    """

    kind: str
    id: int
    meta: dict
    frames: list
    fds: list = field(default_factory=list)

    def detach(self) -> "Message":
        """A copy whose inline frames no longer borrow the receive buffer (same descriptors)."""
        frames = [bytes(f) if isinstance(f, memoryview) and f.readonly else f for f in self.frames]
        return Message(self.kind, self.id, self.meta, frames, self.fds)

    def shared(self) -> list:
        """The frames that lie in memfds."""
        return [frame for frame in self.frames if isinstance(frame, SharedRef)]

    def close(self) -> None:
        """Close the descriptors that came with the message (idempotent)."""
        _close_all(self.fds)


@dataclass
class Staged:
    """A message's frames laid out for sending (``Connection.stage``)."""

    descriptors: list
    inline: list
    fds: list
    buffer: Any
    in_place: int = 0  # bytes of frames sent in the transport memory they already lay in


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
    """Framed messages over a connected Unix stream socket.

    ``pool``: where this side puts large frames (``shm.BufferPool`` or
    ``shm.SealedWriter``); frames of at least ``shm_threshold`` bytes are copied into a
    leased memfd whose descriptor travels with the message (no pool: everything inline).
    ``send`` may be called from several threads; ``recv`` from one.
    """

    def __init__(self, sock: socket.socket, *, pool=None, shm_threshold: int = DEFAULT_SHM_THRESHOLD,
                 max_inline_bytes: int = MAX_INLINE_BYTES):
        self.sock = sock
        self.pool = pool
        self.shm_threshold = shm_threshold
        self.max_inline_bytes = max_inline_bytes
        self._send_lock = threading.Lock()
        self._prefix = bytearray(_PREFIX.size)
        self._header = bytearray(4096)
        self._inline = bytearray(1 << 20)
        self._fds_in: list[int] = []   # descriptors received with the message being read
        self._truncated = False        # the kernel dropped some of them (MSG_CTRUNC)

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
             frames: Sequence[Any] = (), fds: Sequence[int] = ()):
        """Send one message; return the pool buffer its large frames went into.

        ``fds`` are descriptors to pass along, which ``SharedRef`` frames index (the
        supervisor forwarding a message); they stay the caller's to close. The caller
        gives the returned buffer back to ``pool.release`` once the peer is done with it
        (a client: when the request's reply arrives; the worker: once it is sent).
        """
        return self.send_staged(kind, request_id, meta, self.stage(frames, fds))

    def stage(self, frames: Sequence[Any], fds: Sequence[int] = (), *, own: bool = False) -> "Staged":
        """Lay out a message's frames: large ones copied into a pool buffer now, the rest
        inline (copied out of ``frames`` too when ``own``: the worker stages its reply
        before it lets go of the request's memory, which a result may view)."""
        if len(frames) > MAX_FRAMES:  # the receiver would refuse it: fail here, where it is clear
            raise ValueError(f"a message carries at most {MAX_FRAMES} frames, not {len(frames)}")
        fds = list(fds)
        descriptors, inline, large = [], [], []
        in_place = 0
        for index, frame in enumerate(frames):
            if isinstance(frame, SharedRef):
                descriptors.append([SHARED, frame.fd, frame.offset, frame.length])
            else:
                view = frame_view(frame)
                # A frame already in transport memory travels as its descriptor and offset
                # (room is kept for one pool buffer's descriptor).
                placed = self.pool.locate(view) if self.pool is not None else None
                if placed is not None and (placed[0] in fds or len(fds) < MAX_FDS - 1):
                    if placed[0] not in fds:
                        fds.append(placed[0])
                    descriptors.append([SHARED, fds.index(placed[0]), placed[1], view.nbytes])
                    in_place += view.nbytes
                elif self.pool is not None and view.nbytes >= self.shm_threshold:
                    descriptors.append(None)  # filled in once the buffer exists
                    large.append((index, view))
                else:
                    descriptors.append([INLINE, view.nbytes])
                    inline.append(view)
        buffer = None
        if large:
            try:
                buffer = self.pool.lease(sum(aligned(view.nbytes) for _, view in large))
            except OSError:  # no memory for a memfd (or no descriptors left): these go inline
                for index, view in large:
                    descriptors[index] = [INLINE, view.nbytes]
                inline = [frame_view(f) for f, d in zip(frames, descriptors) if d[0] == INLINE]
                large = []
        try:
            if large:
                for index, view in large:
                    descriptors[index] = [SHARED, len(fds), buffer.put(view), view.nbytes]
                buffer.finish()
                fds.append(buffer.fd)
            if len(fds) > MAX_FDS:
                raise ValueError(f"a message carries at most {MAX_FDS} file descriptors, not {len(fds)}")
        except BaseException:
            if buffer is not None:
                self.pool.release(buffer)
            raise
        return Staged(descriptors, [bytes(view) for view in inline] if own else inline, fds, buffer, in_place)

    def send_staged(self, kind: str, request_id: int, meta: dict | None, staged: "Staged"):
        """Send a staged message; return its pool buffer (see ``send``)."""
        try:
            header = msgpack.packb({"k": kind, "i": request_id, "m": meta or {}, "f": staged.descriptors},
                                   use_bin_type=True)
            if len(header) > MAX_HEADER_BYTES:
                raise ValueError(f"message header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
            inline_total = sum(memoryview(frame).nbytes for frame in staged.inline)
            buffers = [_PREFIX.pack(MESSAGE_MAGIC, len(header), inline_total), header, *staged.inline]
            with self._send_lock:
                _send_all(self.sock, buffers, staged.fds)
        except BaseException:
            if staged.buffer is not None:
                self.pool.release(staged.buffer)
            raise
        return staged.buffer

    def try_send(self, kind: str, request_id: int = 0, meta: dict | None = None,
                 frames: Sequence[Any] = (), fds: Sequence[int] = ()) -> bool:
        """Send a small message now if the socket takes all of it without waiting; ``False``
        (nothing sent) when it would wait or is not small. Below half the send buffer a Unix
        stream message is one buffer for the kernel: it goes whole or not at all."""
        staged = self.stage(frames, fds)
        header = msgpack.packb({"k": kind, "i": request_id, "m": meta or {}, "f": staged.descriptors},
                               use_bin_type=True)
        inline_total = sum(memoryview(frame).nbytes for frame in staged.inline)
        total = _PREFIX.size + len(header) + inline_total
        if staged.buffer is not None or total > _TRY_SEND_BYTES:
            if staged.buffer is not None:
                self.pool.release(staged.buffer)
            return False
        buffers = [_PREFIX.pack(MESSAGE_MAGIC, len(header), inline_total), header, *staged.inline]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", staged.fds))] if staged.fds else []
        with self._send_lock:
            try:
                sent = self.sock.sendmsg(buffers, ancillary, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            if sent < total:  # not expected below half the buffer; finish it, in order
                rest = memoryview(b"".join(bytes(memoryview(b).cast("B")) for b in buffers))[sent:]
                try:
                    _send_all(self.sock, [rest])
                except OSError:
                    # Part of it is out: the stream cannot take the message again from its
                    # start, so the connection ends here and the sender fails the peer.
                    self.sock.shutdown(socket.SHUT_RDWR)
                    raise
        return True

    # -- receiving --------------------------------------------------------------------
    def recv(self) -> Message:
        """Read one message. ``ConnectionClosed`` at a clean end of stream, ``ProtocolError``
        when framing is broken, ``BadMessage`` when one message is bad but skipped.
        Descriptors of a message that fails are closed here; those of a returned message
        are the caller's (``Message.close``)."""
        try:
            message = self._recv_message()
        except BaseException:
            _close_all(self._fds_in)
            raise
        finally:
            self._fds_in, self._truncated = [], False
        return message

    def _recv_message(self) -> Message:
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
            message = self._parse(header_view, memoryview(inline)[:inline_total].toreadonly())
        finally:
            header_view.release()
        fds = self._fds_in
        used = {ref.fd for ref in message.shared()}
        if self._truncated or len(fds) > MAX_FDS:
            raise BadMessage(f"message carried more than the {MAX_FDS} file descriptors allowed "
                             "(the kernel truncated them)", message.id)
        if used != set(range(len(fds))):
            raise BadMessage(f"message carries {len(fds)} file descriptor(s) but its frames use "
                             f"{sorted(used)}", message.id)
        message.fds = fds
        return message

    def _fill(self, nbytes: int, attribute: str) -> bytearray:
        buffer = getattr(self, attribute)
        if nbytes <= len(buffer):
            self._recv_exact(memoryview(buffer)[:nbytes], mid_message=True)
            return buffer
        # A new buffer, grown as the bytes arrive (doubling): a peer that declares a size
        # and sends nothing gets no memory for it.
        buffer, received = bytearray(min(nbytes, _FIRST_GROWTH)), 0
        while True:
            self._recv_exact(memoryview(buffer)[received:], mid_message=True)
            received = len(buffer)
            if received == nbytes:
                break
            buffer.extend(bytes(min(received, nbytes - received)))
        if nbytes <= _REUSED_BUFFER_LIMIT:
            setattr(self, attribute, buffer)
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
        frames, position = [], 0
        for descriptor in descriptors:
            frame = self._frame(descriptor, inline, position, request_id)
            if descriptor[0] == INLINE:
                position += frame.nbytes
            frames.append(frame)
        if position != inline.nbytes:
            raise BadMessage(
                f"frame descriptors account for {position} inline bytes but the message holds "
                f"{inline.nbytes}", request_id)
        return Message(kind, request_id, meta, frames)

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
            _, fd, offset, length = descriptor
            if not all(type(v) is int and v >= 0 for v in (fd, offset, length)):
                raise bad("expected [SHARED, fd index >= 0, offset >= 0, length >= 0]")
            return SharedRef(fd, offset, length)
        raise bad("unknown tag or wrong number of fields")

    def _recv_exact(self, view: memoryview, *, mid_message: bool = False) -> None:
        received = 0
        while received < view.nbytes:
            try:
                count, ancillary, flags, _ = self.sock.recvmsg_into(
                    [view[received:]], _ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
            except ConnectionResetError:
                count, ancillary, flags = 0, [], 0  # a peer that closed with our data unread
            self._take_fds(ancillary, flags)
            if count == 0:
                if received or mid_message:
                    raise ProtocolError("the peer closed the connection in the middle of a message")
                raise ConnectionClosed("the peer closed the connection")
            received += count

    def _take_fds(self, ancillary: list, flags: int) -> None:
        """Keep the descriptors that came with these bytes, whoever sent them (they are
        ours to close now), and note whether the kernel had to drop some."""
        self._truncated |= bool(flags & socket.MSG_CTRUNC)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                self._fds_in.extend(fds)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _send_all(sock: socket.socket, buffers: Iterable[Any], fds: Sequence[int] = ()) -> None:
    """``sendall`` for a list of buffers, gathered by ``sendmsg`` without joining them;
    ``fds`` ride with the first byte."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while pending:
        sent = sock.sendmsg(pending[:_IOV_BATCH], ancillary)
        ancillary = []
        while sent:
            head = pending[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[sent:]
                sent = 0
