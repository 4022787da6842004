"""The server process a ``runner.Worker`` starts and owns (``python -m runner serve``).

It listens on a socket in a private directory (``/tmp/sourcebox-*``) unless the caller
named a path, holds a secret handed to it through a pipe (``auth``), and its output goes
to this process's stderr. After a crash it is started again, with a new secret. Whatever
happens, the private directory goes with it: also when the server exits before it listens.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time

from . import auth
from .child import MAX_LINE_CHARS, Child
from .errors import WorkerStartError, describe_exit

_LISTEN_SECONDS = 60.0


def listening(path: str) -> bool:
    """Whether something accepts connections on the Unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class OwnedServer:
    """``python -m runner serve`` with ``options`` (its command-line flags but ``--socket``,
    ``--owner`` and ``--secret-fd``), listening at ``socket_path`` or, when that is None, in
    a private directory; started by the constructor, which raises ``WorkerStartError`` with
    the server's output when it exits before listening."""

    def __init__(self, socket_path: str | None, options: list[str]):
        self._options = list(options)
        self._own_dir = None if socket_path is not None else tempfile.mkdtemp(prefix="sourcebox-")
        self.socket_path = os.path.abspath(socket_path or os.path.join(self._own_dir, "worker.sock"))
        self.secret: bytes | None = None
        self._child: Child | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @property
    def returncode(self) -> int | None:
        return self._child.returncode

    def alive(self) -> bool:
        return self._child.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        return self._child.wait(timeout)

    def output_tail(self) -> str:
        return self._child.output_tail() if self._child is not None else ""

    def restart(self) -> None:
        """Start it again (a new secret too); the old one is killed if it lives on: it
        dropped its client, so it is no longer trusted."""
        self._child.close()
        if self._own_dir is not None and not os.path.isdir(self._own_dir):
            # The old server removed its directory on its way out: make a fresh one.
            self._own_dir = tempfile.mkdtemp(prefix="sourcebox-")
            self.socket_path = os.path.join(self._own_dir, "worker.sock")
        self._start()

    def close(self) -> None:
        """Kill it unless it has ended, and remove its private directory."""
        if self._child is not None:
            self._child.close()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def _start(self) -> None:
        argv = [sys.executable, "-m", "runner", "serve", "--socket", self.socket_path, *self._options,
                "--owner", str(os.getpid())]
        # The secret travels through a pipe the server reads once: not in argv or the
        # environment, where other processes could read it.
        self.secret = auth.new_secret()
        secret_in, secret_out = os.pipe()
        try:
            os.write(secret_out, self.secret)
            os.close(secret_out)
            # The server's own lines are bounded already; this bounds a broken server's.
            self._child = Child(argv + ["--secret-fd", str(secret_in)], on_line=_to_stderr,
                                pass_fds=(secret_in,), max_line_chars=8 * MAX_LINE_CHARS, name="server-output")
        finally:
            os.close(secret_in)
        deadline = time.monotonic() + _LISTEN_SECONDS
        while not listening(self.socket_path):
            if self._child.poll() is not None or time.monotonic() > deadline:
                returncode = self._child.close()
                raise WorkerStartError(
                    f"the worker server for {self.socket_path} exited before listening "
                    f"({describe_exit(returncode)}):\n" + self._child.output_tail())
            time.sleep(0.02)


def _to_stderr(line: str) -> None:
    try:
        sys.stderr.write(line)
    except (OSError, ValueError):
        pass  # our own stderr is gone (interpreter shutdown); the tail is kept
