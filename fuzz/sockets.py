"""Connection-level fuzzing of a live server: hostile or broken peers on raw sockets,
each case followed by a well-behaved client that must still be served.

A case's outcome is ``served`` (the server is alive, the good client got the right
answer in time and the server's memory did not jump) or one of ``server-died``,
``not-served`` and ``memory``.
"""
from __future__ import annotations

import concurrent.futures
import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

import msgpack

#: How long the good client may take to be served after (or during) a case.
SERVE_SECONDS = 20.0
#: Growth of the server's resident memory over one case that counts as a blow-up.
MEMORY_JUMP = 256 << 20

GREETING = b"SBXRUN\r\n" + struct.pack("<I", 3)


def probe(value: int) -> int:
    """What the good client runs: shipped as source (this module is not on the server)."""
    return value * 2 + 1


@dataclass
class Server:
    """A real server (``python -m runner serve`` via ``runner.Worker``) and the good client."""

    good: object
    path: str

    @classmethod
    def start(cls) -> "Server":
        import runner

        good = runner.Worker(model="none", confine="off", timeout=60)
        return cls(good, good.socket_path)

    def pid(self) -> int:
        return self.good.server_pid

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.pid()}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return 0
        return 0

    def alive(self) -> bool:
        try:
            os.kill(self.pid(), 0)
            return True
        except OSError:
            return False

    def served(self, value: int, seconds: float = SERVE_SECONDS) -> bool:
        future = self.good.submit(probe, value)
        try:
            return future.result(timeout=seconds) == value * 2 + 1
        except Exception:  # lost, timed out, or the wrong answer: all "not served"
            return False

    def close(self) -> None:
        self.good.close()


def raw(path: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def message(kind: str, request_id: int = 0, meta: dict | None = None, frames: tuple = ()) -> bytes:
    header = msgpack.packb({"k": kind, "i": request_id, "m": meta or {}, "f": [[0, len(f)] for f in frames]},
                           use_bin_type=True)
    inline = b"".join(frames)
    return b"SBXM" + struct.pack("<IQ", len(header), len(inline)) + header + inline


def prefix(header_len: int, inline: int) -> bytes:
    return b"SBXM" + struct.pack("<IQ", header_len, inline)


def _greeted(path: str) -> socket.socket:
    sock = raw(path)
    sock.sendall(GREETING)
    _read_exactly(sock, len(GREETING))
    return sock


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _close_all(socks: list) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass


# --- the cases: each does its damage, then returns what must be closed afterwards -------

def connect_and_close(server: Server) -> list:
    raw(server.path).close()
    return []


def bad_magic(server: Server) -> list:
    sock = raw(server.path)
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    return [sock]


def wrong_version(server: Server) -> list:
    sock = raw(server.path)
    sock.sendall(b"SBXRUN\r\n" + struct.pack("<I", 2**32 - 1))
    return [sock]


def partial_greeting(server: Server) -> list:
    sock = raw(server.path)
    sock.sendall(GREETING[:5])
    return [sock]


def random_bytes(server: Server) -> list:
    rng = random.Random(7)
    socks = []
    for size in (1, 12, 100, 4096, 65536):
        sock = raw(server.path)
        try:
            sock.sendall(GREETING + rng.randbytes(size))
        except OSError:
            pass  # the server may hang up first: that is fine
        socks.append(sock)
    return socks


def greeted_then_silent(server: Server) -> list:
    return [_greeted(server.path)]


def huge_header_prefix(server: Server) -> list:
    sock = _greeted(server.path)
    sock.sendall(prefix(2**32 - 1, 0))
    return [sock]


def huge_inline_prefix(server: Server) -> list:
    """A 16-byte prefix declaring 1 GiB of inline frames, then nothing."""
    sock = _greeted(server.path)
    header = msgpack.packb({"k": "hello", "i": 0, "m": {}, "f": [[0, 1 << 30]]}, use_bin_type=True)
    sock.sendall(prefix(len(header), 1 << 30) + header)
    return [sock]


def max_header_then_close(server: Server) -> list:
    sock = _greeted(server.path)
    sock.sendall(prefix(16 << 20, 0) + b"\x80" * 1000)
    sock.close()
    return []


def truncated_hello(server: Server) -> list:
    whole = message("hello", 0, {"nonce": os.urandom(32)})
    socks = []
    for cut in range(0, len(whole), max(1, len(whole) // 12)):
        sock = _greeted(server.path)
        sock.sendall(whole[:cut])
        sock.close()
    return socks


def garbage_header(server: Server) -> list:
    sock = _greeted(server.path)
    body = b"\xc1" * 40
    sock.sendall(prefix(len(body), 0) + body)
    return [sock]


def slow_writer(server: Server) -> list:
    """Greeting and hello one byte at a time, while the good client is checked."""
    sock = raw(server.path, timeout=60)

    def dribble() -> None:
        try:
            for byte in GREETING + message("hello", 0, {"nonce": os.urandom(32)}):
                sock.send(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    return [sock, thread]


def slow_reader(server: Server) -> list:
    """A client that asks for 40 MB of replies and never reads them."""
    import capture

    sock = _greeted(server.path)
    sock.sendall(message("hello", 0, {"nonce": os.urandom(32)}))
    # Replies under the shared-memory threshold travel inline: they fill the socket.
    bundle = capture.encode({"fn": _large_reply, "args": (100_000,), "kwargs": {}})
    frames = (bytes(bundle.header), *[bytes(f) for f in bundle.frames])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for request_id in range(1, 400):
        try:
            sock.sendall(message("request", request_id, {"kind": "call", "form": "frames", "reply": "frames"}, frames))
        except OSError:
            break
    return [sock]


def _large_reply(size: int) -> bytes:
    return b"r" * size


def many_idle(server: Server) -> list:
    """Enough idle connections to run the server out of descriptors and threads."""
    socks = []
    for _ in range(1200):
        try:
            socks.append(raw(server.path, timeout=2))
        except OSError:
            break
    return socks


def stop_without_reading(server: Server) -> list:
    sock = _greeted(server.path)
    sock.sendall(message("hello", 0, {"nonce": os.urandom(32)}) + message("ping", 1))
    sock.close()
    return []


CASES: dict[str, Callable[[Server], list]] = {
    f.__name__: f for f in (
        connect_and_close, bad_magic, wrong_version, partial_greeting, random_bytes, greeted_then_silent,
        huge_header_prefix, huge_inline_prefix, max_header_then_close, truncated_hello, garbage_header,
        slow_writer, slow_reader, many_idle, stop_without_reading,
    )
}


def run_case(server: Server, name: str, value: int) -> tuple[str, str]:
    """Run one case against ``server``; (outcome, detail)."""
    before = server.rss()
    leftovers: list = []
    try:
        leftovers = CASES[name](server)
    except OSError as exc:
        detail = f"{type(exc).__name__}: {exc}"  # the server hung up on the hostile peer: allowed
    else:
        detail = ""
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # served while the hostile peer holds on
            ok = pool.submit(server.served, value).result()
        grown = server.rss() - before
    finally:
        _close_all([s for s in leftovers if isinstance(s, socket.socket)])
    if not server.alive():
        return "server-died", detail
    if not ok:
        return "not-served", detail or "the good client got no right answer in time"
    if grown > MEMORY_JUMP:
        return "memory", f"the server grew by {grown >> 20} MiB"
    return "served", detail


def run(names: list[str] | None = None, rounds: int = 1, progress: Callable | None = None) -> dict:
    """Every case ``rounds`` times on one server (restarted if a case kills it):
    {case: {outcome: count}}."""
    results: dict[str, dict[str, int]] = {}
    server = Server.start()
    try:
        value = 0
        for _ in range(rounds):
            for name in names or list(CASES):
                value += 1
                outcome, detail = run_case(server, name, value)
                counts = results.setdefault(name, {})
                counts[outcome] = counts.get(outcome, 0) + 1
                if progress is not None:
                    progress(name, outcome, detail)
                if outcome == "server-died" or not server.served(value, seconds=5):
                    server.close()
                    server = Server.start()
    finally:
        server.close()
    return results
