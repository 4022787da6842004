"""Who is on the other end of a runner socket (docs/RUNNER.md, "Authentication").

Every server holds a random secret: one handed to it by the ``Worker`` that starts it
(through an inherited pipe, never argv or the environment), or one it makes itself and
writes to ``SOCKET.secret`` (mode 0600) when started from the command line. On every
connection the client sends a fresh nonce in its ``hello``; the server answers in its
``welcome`` with its own nonce and an HMAC over both nonces and both pids (as
``SO_PEERCRED`` reports them), so a process that does not hold the secret cannot answer,
and one that relays another server's answer has the wrong pid. A client that holds the
secret checks that answer before it sends any request, then proves the secret back
(``auth``): that makes it the server's *owner*, the only one whose ``stop`` counts.

A client without the secret (someone else's ``Worker`` started the server) can only check
that the peer runs as its own user or root and that nobody else can have put a socket at
that path: the socket's directory belongs to that user or root and is not writable by
group or others.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import platform
import socket
import stat
import struct

from .errors import PeerAuthError, ProtocolError, RunnerError, rebuild
from .protocol import AUTH, DEFAULT_SHM_THRESHOLD, ERROR, HELLO, OWNER, WELCOME, Connection

SECRET_BYTES = 32
NONCE_BYTES = 32
SECRET_SUFFIX = ".secret"
_LABEL = b"sourcebox-auth-1"
_PEERCRED = struct.Struct("3i")

#: TEST ONLY (tests/test_boundary_peer.py's controls): skip every check of who the server
#: is, to show what a hostile process on the socket path gets without them. Never set it
#: in real use.
_SKIP_PEER_CHECKS_FOR_TESTS = False


def new_secret() -> bytes:
    return os.urandom(SECRET_BYTES)


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a Unix socket."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


def proof(secret: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes, server_pid: int,
          client_pid: int) -> bytes:
    """The HMAC one side sends to show it holds ``secret`` on this one connection.
    ``role`` (``b"server"``/``b"client"``) keeps one side's answer from serving as the other's."""
    message = b"|".join([_LABEL, role, client_nonce, server_nonce, b"%d" % server_pid, b"%d" % client_pid])
    return hmac.new(secret, message, hashlib.sha256).digest()


def secret_path(socket_path: str) -> str:
    return socket_path + SECRET_SUFFIX


def clear_secret(socket_path: str) -> None:
    """Remove a secret file a server at this path left behind (it was killed)."""
    try:
        os.unlink(secret_path(socket_path))
    except FileNotFoundError:
        pass


def write_secret(socket_path: str, secret: bytes) -> str:
    """Write ``secret`` beside the socket, readable by this user only (created fresh: a
    file someone else put there is replaced or, if we may not, an error)."""
    path = secret_path(socket_path)
    clear_secret(socket_path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secret)
    finally:
        os.close(fd)
    return path


def read_secret(socket_path: str) -> tuple[bytes | None, str | None]:
    """The secret a command-line server left beside its socket, if this process may trust
    it: a regular file owned by this user or root that nobody else can read or write.
    Returns ``(secret, None)`` or ``(None, why there is none)``."""
    path = secret_path(socket_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, f"there is no secret file {path}"
    except OSError as exc:
        return None, f"the secret file {path} cannot be read ({exc.strerror})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid not in (os.getuid(), 0) or info.st_mode & 0o077:
            return None, (f"the secret file {path} is ignored: it must be a regular file owned by uid "
                          f"{os.getuid()} or root with mode 0600 (it is uid {info.st_uid}, mode "
                          f"{stat.filemode(info.st_mode)})")
        secret = os.read(fd, SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(secret) != SECRET_BYTES:
        return None, f"the secret file {path} does not hold a {SECRET_BYTES}-byte secret"
    return secret, None


def check_peer(sock: socket.socket, socket_path: str, no_secret: str) -> None:
    """For a server whose secret this client lacks: the peer must run as this user or root,
    and the socket's directory must be owned by one of them and writable by nobody else.
    Raises ``PeerAuthError`` naming the path and every problem found."""
    if _SKIP_PEER_CHECKS_FOR_TESTS:
        return
    trusted = (os.getuid(), 0)
    problems = []
    pid, uid, _ = peer_credentials(sock)
    if uid not in trusted:
        problems.append(f"the process listening there (pid {pid}) runs as uid {uid}, not as uid "
                        f"{os.getuid()} (you) or root")
    directory = os.path.dirname(socket_path)
    info = os.stat(directory)
    if info.st_uid not in trusted:
        problems.append(f"its directory {directory} belongs to uid {info.st_uid}, not to you or root")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"its directory {directory} is writable by others ({stat.filemode(info.st_mode)}), "
                        "so anyone could have put a socket there")
    if problems:
        raise PeerAuthError(
            f"refusing the worker server at {socket_path}, nothing was sent to it: " + "; ".join(problems)
            + f" ({no_secret}). Start the server yourself (python -m runner serve --socket PATH, which "
            "writes PATH.secret for your clients) or put its socket in a directory only you can write")


def check_server_proof(welcome: dict, sock: socket.socket, socket_path: str, secret: bytes,
                       client_nonce: bytes) -> bytes:
    """Check the welcome's proof; return the server's nonce. Raises ``PeerAuthError``."""
    if _SKIP_PEER_CHECKS_FOR_TESTS:
        return b""
    peer_pid = peer_credentials(sock)[0]
    server_nonce, answer = welcome.get("nonce"), welcome.get("proof")
    if not (isinstance(server_nonce, bytes) and isinstance(answer, bytes)):
        raise PeerAuthError(f"refusing the worker server at {socket_path}: its welcome carries no proof "
                            "of the secret; no request was sent")
    expected = proof(secret, b"server", client_nonce, server_nonce, peer_pid, os.getpid())
    if not hmac.compare_digest(answer, expected):
        raise PeerAuthError(
            f"refusing the worker server at {socket_path}: the process listening there (pid {peer_pid}) "
            "could not prove it holds the secret of the server this client started or read from "
            f"{secret_path(socket_path)}; no request was sent. Something else took over the socket path, "
            "or the server was restarted without its secret")
    return server_nonce


def connect(socket_path: str, secret: bytes | None = None) -> tuple[socket.socket, bytes | None]:
    """A socket connected to the server at ``socket_path``, and the secret to check it with:
    ``secret`` (this client started the server) or the one beside the socket. Without
    either, the peer is checked by uid and directory before anything is sent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        why = None
        if secret is None:
            secret, why = read_secret(socket_path)
        if secret is None:
            check_peer(sock, socket_path, why)
    except BaseException:
        sock.close()
        raise
    return sock, secret


def client_handshake(conn, socket_path: str, secret: bytes | None) -> tuple[dict, bool]:
    """``hello``/``welcome`` on a greeted connection, checking the server's proof when this
    client holds the secret, then proving it back. Returns the welcome's metadata and
    whether the server took this client as its owner."""
    nonce = new_nonce()
    # Our Python version, for the server's log when its worker runs another (both sides
    # then read the pair in the welcome and Worker.versions).
    conn.send(HELLO, 0, {"nonce": nonce, "python": platform.python_version()})
    welcome = conn.recv()
    welcome.close()  # a welcome carries no descriptors; close any a rogue peer attached
    if welcome.kind == ERROR and isinstance(welcome.meta.get("error"), dict):
        refusal = rebuild(welcome.meta["error"])  # a server refusing us says why (busy, say)
        if isinstance(refusal, RunnerError):
            raise refusal
    if welcome.kind != WELCOME:
        raise ProtocolError(f"expected a welcome from {socket_path}, got {welcome.kind!r}")
    if secret is None or _SKIP_PEER_CHECKS_FOR_TESTS:
        return welcome.meta, False
    server_nonce = check_server_proof(welcome.meta, conn.sock, socket_path, secret, nonce)
    server_pid = peer_credentials(conn.sock)[0]
    conn.send(AUTH, 0, {"proof": proof(secret, b"client", nonce, server_nonce, server_pid, os.getpid())})
    answer = conn.recv()
    answer.close()
    if answer.kind != OWNER:
        raise PeerAuthError(f"the worker server at {socket_path} refused this client's proof of its secret: "
                            f"{answer.meta.get('error', {}).get('message', answer.kind)}")
    return welcome.meta, True


def handshake(socket_path: str, secret: bytes | None = None, *, pool=None,
              shm_threshold: int = DEFAULT_SHM_THRESHOLD,
              timeout: float | None = None) -> tuple[Connection, dict, bool]:
    """Connect to the server at ``socket_path`` and go through everything before the first
    request: the peer check (``connect``), the protocol greeting, ``hello``/``welcome`` and,
    holding ``secret`` (or able to read the one beside the socket), ``auth``. Returns the
    connection, the welcome's metadata and whether the server took this client as its
    owner. ``timeout`` bounds each wait on the socket, which keeps it; ``pool`` and
    ``shm_threshold`` are the connection's (``protocol.Connection``)."""
    sock, secret = connect(socket_path, secret)
    try:
        sock.settimeout(timeout)  # something listening there may not be a runner
        conn = Connection(sock, pool=pool, shm_threshold=shm_threshold)
        conn.greet(peer=f"the worker server at {socket_path}")
        welcome, owner = client_handshake(conn, socket_path, secret)
    except BaseException:
        sock.close()
        raise
    return conn, welcome, owner
