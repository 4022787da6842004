"""The wire protocol and the memfd transport, driven over real sockets and real memfds
passed as descriptors (no worker process: raw header bytes and frames)."""
import array
import fcntl
import mmap
import os
import socket
import struct
import threading

import msgpack
import pytest

from runner import shm
from runner.errors import BadMessage, ProtocolError, ProtocolVersionError
from runner.protocol import (GREETING_MAGIC, INLINE, MAX_FDS, MESSAGE_MAGIC, PROTOCOL_VERSION, SHARED, Connection,
                             ConnectionClosed, SharedRef)


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def memfd_mappings():
    with open("/proc/self/maps") as maps:
        return [line for line in maps if "/memfd:sourcebox" in line]


@pytest.fixture
def pair():
    """Two connections over a socketpair: ``a`` sends with a pool, ``b`` receives."""
    before = open_fds()
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pool = shm.BufferPool()
    a = Connection(left, pool=pool, shm_threshold=1024)
    b = Connection(right)
    yield a, b
    a.close()
    b.close()
    pool.close()
    assert open_fds() <= before  # every descriptor received or pooled was closed


def raw_message(header: bytes, inline: bytes = b"", magic: bytes = MESSAGE_MAGIC) -> bytes:
    return struct.pack("<4sIQ", magic, len(header), len(inline)) + header + inline


def send_with_fds(sock, data: bytes, fds):
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def test_small_frames_travel_inline_large_ones_in_a_passed_memfd(pair):
    a, b = pair
    small, large = b"header-bytes", os.urandom(200_000)
    buffer = a.send("request", 7, {"kind": "call"}, [small, large])
    message = b.recv()
    assert (message.kind, message.id, message.meta) == ("request", 7, {"kind": "call"})
    assert bytes(message.frames[0]) == small and message.frames[0].readonly
    assert message.frames[1] == SharedRef(0, 0, len(large)) and len(message.fds) == 1
    # The descriptor names the sender's memfd (same file), not a name anyone could open.
    assert os.fstat(message.fds[0]).st_ino == os.fstat(buffer.fd).st_ino
    assert os.readlink(f"/proc/self/fd/{message.fds[0]}").startswith("/memfd:sourcebox-request")
    memory = shm.RequestMemory()
    [view] = memory.views(message.shared(), message.fds)
    assert bytes(view) == large and not view.readonly and message.fds == []
    del view
    memory.release()
    a.pool.release(buffer)


def test_the_worker_lets_go_of_a_request_and_a_kept_view_becomes_a_private_copy(pair):
    a, b = pair
    buffer = a.send("request", 1, {}, [b"s" * 4096, b"k" * 4096])
    message = b.recv()
    senders = memfd_mappings()  # the client's own pool
    memory = shm.RequestMemory()
    dropped, kept = memory.views(message.shared(), message.fds)
    assert len(memfd_mappings()) == len(senders) + 1
    del dropped
    memory.release()
    # A view user code kept still reads its bytes, from memory that is no longer the memfd.
    assert bytes(kept) == b"k" * 4096 and memfd_mappings() == senders
    kept[:1] = b"x"
    assert bytes(buffer.view[4096:4097]) == b"k"
    a.pool.release(buffer)


def test_pooled_buffers_are_reused_and_idle_ones_beyond_the_cap_freed():
    before = open_fds()
    pool = shm.BufferPool(max_idle_bytes=shm.MIN_BUFFER_BYTES)
    first = pool.lease(10)
    pool.release(first)
    assert pool.lease(100_000) is first  # same memfd, no new page faults
    second = pool.lease(10)
    pool.release(first)
    pool.release(second)
    assert pool.stats() == {"idle": 1, "leased": 0, "bytes": shm.MIN_BUFFER_BYTES}
    pool.close()
    assert open_fds() <= before


def test_a_result_is_sealed_and_the_client_copy_cannot_be_changed_by_its_writer():
    writer = shm.SealedWriter()
    buffer = writer.lease(8192)
    offset = buffer.put(memoryview(b"r" * 8192))
    buffer.finish()
    fd = os.dup(buffer.fd)  # what a worker that kept a handle would hold
    [view] = shm.map_result([SharedRef(0, offset, 8192)], [os.dup(buffer.fd)])
    writer.release(buffer)
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"evil", 0)
    with pytest.raises(PermissionError):
        mmap.mmap(fd, 8192)  # a writable shared mapping is refused too
    view[:4] = b"mine"  # the client's own copy-on-write pages
    assert bytes(view[:5]) == b"miner" and os.pread(fd, 5, 0) == b"rrrrr"
    os.close(fd)


def test_the_client_refuses_a_result_memfd_that_is_not_sealed():
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    with pytest.raises(ValueError, match="lacks the seals"):
        shm.map_result([SharedRef(0, 0, 10)], [os.dup(fd)])
    r, w = os.pipe()
    with pytest.raises(ValueError, match="not a sealable memfd"):
        shm.map_result([SharedRef(0, 0, 10)], [r])
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, shm.RESULT_SEALS)
    with pytest.raises(ValueError, match="runs past the end"):
        shm.map_result([SharedRef(0, 4000, 200)], [fd])
    os.close(w)


def test_version_mismatch_is_refused_by_both_sides_naming_both_versions():
    left, right = socket.socketpair()
    errors = []

    def old_peer():
        right.sendall(struct.pack("<8sI", GREETING_MAGIC, PROTOCOL_VERSION + 1))
        errors.append(right.recv(12))

    thread = threading.Thread(target=old_peer)
    thread.start()
    with pytest.raises(ProtocolVersionError) as caught:
        Connection(left).greet(peer="test peer")
    thread.join()
    left.close()
    right.close()
    text = str(caught.value)
    assert f"speaks runner protocol {PROTOCOL_VERSION}" in text and f"test peer speaks {PROTOCOL_VERSION + 1}" in text
    # Our greeting went out first, so the other side can name our version too.
    assert struct.unpack("<8sI", errors[0]) == (GREETING_MAGIC, PROTOCOL_VERSION)


def test_a_peer_that_is_not_a_runner_gets_a_clear_error():
    left, right = socket.socketpair()
    right.sendall(b"HTTP/1.1 400 Bad\r\n")
    with pytest.raises(ProtocolError, match="not a sourcebox runner endpoint"):
        Connection(left).greet(peer="that socket")
    left.close()
    right.close()


@pytest.mark.parametrize("wire, message", [
    (raw_message(b"\x80", magic=b"JUNK"), "bad message prefix"),
    (struct.pack("<4sIQ", MESSAGE_MAGIC, 1 << 30, 0), "exceeds the limit"),
    (struct.pack("<4sIQ", MESSAGE_MAGIC, 1, 1 << 40), "over the limit"),
])
def test_broken_framing_ends_the_connection(pair, wire, message):
    a, b = pair
    a.sock.sendall(wire)
    with pytest.raises(ProtocolError, match=message):
        b.recv()


@pytest.mark.parametrize("header, inline, message", [
    (b"\xc1", b"", "malformed message header"),
    (msgpack.packb([1, 2]), b"", "must be a map"),
    (msgpack.packb({"k": "x", "i": -1, "m": {}, "f": []}), b"", "non-negative integer"),
    (msgpack.packb({"k": 5, "i": 3, "m": {}, "f": []}), b"", "kind must be a string"),
    (msgpack.packb({"k": "x", "i": 3, "m": [], "f": []}), b"", "metadata must be a map"),
    (msgpack.packb({"k": "x", "i": 3, "m": {}, "f": [[INLINE, 99]]}), b"abc", "must fit"),
    (msgpack.packb({"k": "x", "i": 3, "m": {}, "f": [[INLINE, 1]]}), b"abc", "account for 1 inline bytes"),
    (msgpack.packb({"k": "x", "i": 3, "m": {}, "f": [[9]]}), b"", "unknown tag"),
    (msgpack.packb({"k": "x", "i": 3, "m": {}, "f": [[SHARED, "/dev/shm/x", 0, 1]]}), b"", "fd index"),
    (msgpack.packb({"k": "x", "i": 3, "m": {}, "f": [[SHARED, 0, 0, 1]]}), b"",
     r"carries 0 file descriptor\(s\) but its frames use \[0\]"),
])
def test_a_bad_message_fails_alone_and_the_stream_stays_in_step(pair, header, inline, message):
    a, b = pair
    a.sock.sendall(raw_message(header, inline))
    a.send("after", 11, {}, [b"still fine"])
    with pytest.raises(BadMessage, match=message):
        b.recv()
    follow_up = b.recv()
    assert (follow_up.kind, follow_up.id, bytes(follow_up.frames[0])) == ("after", 11, b"still fine")


def test_descriptors_a_message_does_not_use_are_refused_and_closed(pair):
    a, b = pair
    before = open_fds()
    fd = os.memfd_create("stray", os.MFD_CLOEXEC)
    send_with_fds(a.sock, raw_message(msgpack.packb({"k": "x", "i": 2, "m": {}, "f": []})), [fd])
    os.close(fd)
    a.send("after", 3, {}, [b"ok"])
    with pytest.raises(BadMessage, match=r"carries 1 file descriptor\(s\) but its frames use \[\]"):
        b.recv()
    assert b.recv().id == 3 and open_fds() <= before


def test_more_descriptors_than_allowed_are_refused_and_none_kept(pair):
    a, b = pair
    before = open_fds()
    fds = [os.memfd_create("many", os.MFD_CLOEXEC) for _ in range(MAX_FDS + 2)]
    header = msgpack.packb({"k": "x", "i": 2, "m": {}, "f": [[SHARED, i, 0, 1] for i in range(MAX_FDS + 2)]})
    send_with_fds(a.sock, raw_message(header), fds)
    for fd in fds:
        os.close(fd)
    with pytest.raises(BadMessage, match="more than the 8 file descriptors"):
        b.recv()
    a.send("after", 3, {}, [b"ok"])
    assert b.recv().id == 3 and open_fds() <= before


def test_a_frame_reaching_past_its_memfd_is_refused(pair):
    a, b = pair
    buffer = a.send("x", 1, {}, [bytes(2048)])
    b.recv().close()
    send_with_fds(a.sock, raw_message(msgpack.packb({"k": "x", "i": 2, "m": {}, "f": [[SHARED, 0, 0, 1 << 30]]})),
                  [buffer.fd])
    message = b.recv()
    with pytest.raises(ValueError, match="runs past the end of its memfd"):
        shm.RequestMemory().views(message.shared(), message.fds)
    a.pool.release(buffer)


def test_descriptors_pass_through_a_forwarding_connection_unmapped():
    before = open_fds()
    pool = shm.BufferPool()
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    client, inbound = Connection(pairs[0][0], pool=pool, shm_threshold=1024), Connection(pairs[0][1])
    outbound, worker = Connection(pairs[1][0]), Connection(pairs[1][1])
    payload = os.urandom(10_000)
    buffer = client.send("request", 1, {}, [b"abc", payload])
    senders = memfd_mappings()
    forwarded = inbound.recv()
    assert memfd_mappings() == senders  # the forwarder maps nothing
    outbound.send("request", 9, {}, forwarded.frames, forwarded.fds)
    forwarded.close()
    received = worker.recv()
    memory = shm.RequestMemory()
    [view] = memory.views(received.shared(), received.fds)
    assert bytes(received.frames[0]) == b"abc" and bytes(view) == payload
    del view
    memory.release()
    pool.release(buffer)
    pool.close()
    for conn in (client, inbound, outbound, worker):
        conn.close()
    assert open_fds() <= before


def test_detach_copies_inline_frames_out_of_the_reused_buffer(pair):
    a, b = pair
    a.send("x", 1, {}, [b"first"])
    kept = b.recv().detach()
    a.send("x", 2, {}, [b"other"])
    b.recv()
    assert kept.frames == [b"first"]


def test_clean_end_of_stream_is_distinguished_from_a_cut_message(pair):
    a, b = pair
    a.sock.sendall(struct.pack("<4sIQ", MESSAGE_MAGIC, 10, 0) + b"abc")
    a.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError, match="middle of a message"):
        b.recv()
    left, right = socket.socketpair()
    left.close()
    with pytest.raises(ConnectionClosed):
        Connection(right).recv()
    right.close()
