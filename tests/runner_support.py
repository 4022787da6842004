"""Helpers shared by the runner tests."""
import os
import socket

from runner.protocol import Connection


def raw_client(worker, timeout: float = 30) -> Connection:
    """A hand-written client on the raw protocol, greeted and welcomed by ``worker``'s server."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(worker.socket_path)
    sock.settimeout(timeout)
    conn = Connection(sock)
    conn.greet(peer="server")
    conn.send("hello", 0, {"nonce": os.urandom(32)})
    assert conn.recv().kind == "welcome"
    return conn
