"""The wire protocol and the shared-memory pool, driven over real sockets and real
POSIX shared memory (no worker process: raw header bytes and frames)."""
import os
import signal
import socket
import struct
import subprocess
import sys
import threading

import msgpack
import pytest

from runner import shm
from runner.errors import BadMessage, ProtocolError, ProtocolVersionError
from runner.protocol import (GREETING_MAGIC, INLINE, MESSAGE_MAGIC, PROTOCOL_VERSION, SHARED, Connection,
                             ConnectionClosed, SharedRef)


def ours():
    return sorted(name for name in os.listdir(shm.SHM_DIR) if shm.owner_pid(name) == os.getpid())


@pytest.fixture
def pair():
    """Two connections over a socketpair: ``a`` sends with a pool, ``b`` maps segments."""
    left, right = socket.socketpair()
    pool, segments = shm.SegmentPool(), shm.SegmentMap()
    a = Connection(left, pool=pool, shm_threshold=1024)
    b = Connection(right, segments=segments)
    yield a, b
    a.close()
    b.close()
    pool.close()
    segments.close()
    assert ours() == []


def raw_message(header: bytes, inline: bytes = b"", magic: bytes = MESSAGE_MAGIC) -> bytes:
    return struct.pack("<4sIQ", magic, len(header), len(inline)) + header + inline


def test_small_frames_travel_inline_large_ones_through_shared_memory(pair):
    a, b = pair
    small, large = b"header-bytes", os.urandom(200_000)
    lease = a.send("request", 7, {"kind": "call"}, [small, large])
    message = b.recv()
    assert (message.kind, message.id, message.meta) == ("request", 7, {"kind": "call"})
    assert bytes(message.frames[0]) == small and message.frames[0].readonly
    assert bytes(message.frames[1]) == large and not message.frames[1].readonly
    assert message.segments == {1: lease.name}
    assert lease.name.startswith(f"sbx-{os.getpid()}-")


def test_receiver_writes_through_to_the_lent_segment(pair):
    a, b = pair
    lease = a.send("reply", 1, {}, [bytes(4096)])
    view = b.recv().frames[0]
    view[:3] = b"abc"
    assert bytes(lease.segment.view[:3]) == b"abc"


def test_released_segments_are_reused_and_close_unlinks_them():
    pool = shm.SegmentPool()
    first = pool.lease(10)
    pool.release(first.name)
    second = pool.lease(100_000)
    assert second.name == first.name  # same segment, no new page faults
    assert not pool.release("sbx-1-00000000-1")  # not ours: refused, not an error
    assert ours() == [first.name]
    pool.close()
    assert ours() == []


def test_idle_segments_beyond_the_cap_are_unlinked_and_reported():
    pool = shm.SegmentPool(max_idle_bytes=shm.MIN_SEGMENT_BYTES)
    leases = [pool.lease(10), pool.lease(10)]
    for lease in leases:
        pool.release(lease.name)
    assert pool.stats()["idle"] == 1
    assert len(pool.dropped()) == 1 and pool.dropped() == []
    pool.close()


def test_segment_map_keeps_a_bounded_number_of_mappings():
    pool, segments = shm.SegmentPool(), shm.SegmentMap(max_mapped=2)
    leases = [pool.lease(10) for _ in range(3)]
    for lease in leases:
        segments.view(lease.name, 0, 10)
    assert list(segments._segments) == [lease.name for lease in leases[1:]]
    pool.close()
    segments.close()


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
    (msgpack.packb({"k": "x", "i": 3, "m": {}, "f": [[SHARED, "../../etc/passwd", 0, 1]]}), b"",
     "not a sourcebox shared-memory segment"),
    (msgpack.packb({"k": "x", "i": 3, "m": {}, "f": [[SHARED, "sbx-1-0000abcd-9", 0, 1]]}), b"", "does not exist"),
])
def test_a_bad_message_fails_alone_and_the_stream_stays_in_step(pair, header, inline, message):
    a, b = pair
    a.sock.sendall(raw_message(header, inline))
    a.send("after", 11, {}, [b"still fine"])
    with pytest.raises(BadMessage, match=message):
        b.recv()
    follow_up = b.recv()
    assert (follow_up.kind, follow_up.id, bytes(follow_up.frames[0])) == ("after", 11, b"still fine")


def test_a_frame_reaching_past_its_segment_is_refused(pair):
    a, b = pair
    lease = a.send("x", 1, {}, [bytes(2048)])
    a.sock.sendall(raw_message(msgpack.packb({"k": "x", "i": 2, "m": {}, "f": [[SHARED, lease.name, 0, 1 << 30]]})))
    b.recv()
    with pytest.raises(BadMessage, match="runs past the end of segment"):
        b.recv()


def test_references_pass_through_a_connection_that_maps_nothing():
    left, right = socket.socketpair()
    a, b = Connection(left), Connection(right)
    a.send("x", 1, {}, [SharedRef("sbx-5-0000abcd-1", 64, 10), b"abc"])
    message = b.recv()
    assert message.frames[0] == SharedRef("sbx-5-0000abcd-1", 64, 10) and bytes(message.frames[1]) == b"abc"
    assert message.segments == {0: "sbx-5-0000abcd-1"}
    a.close()
    b.close()


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


def test_segments_of_a_killed_owner_are_swept_by_a_survivor(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from runner import shm\n"
        "pool = shm.SegmentPool()\n"
        "print(pool.lease(10).name, flush=True)\n"
        "time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    name = owner.stdout.readline().strip()
    assert shm.owned_by(owner.pid) == [name]
    assert name not in shm.sweep_orphans()  # alive: not touched
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    owner.stdout.close()
    assert name in shm.sweep_orphans()
    assert shm.owned_by(owner.pid) == []
