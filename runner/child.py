"""The runner's child processes, started one way: the server a ``runner.Worker`` starts
(``python -m runner serve``) and the worker a supervisor starts (``python -m runner.worker``).

A ``Child`` runs this copy of sourcebox (``PYTHONPATH`` leads to it) and has its output
read by a thread of its own, a line at a time: each line cut to a bound and its terminal
control characters escaped (user code writes there), handed on, and the last ones kept
for crash reports.
"""
from __future__ import annotations

import collections
import os
import subprocess
import threading
from typing import Callable, Sequence

from .defaults import PACKAGE_ROOT

TAIL_LINES = 30                    # lines of output kept for crash reports
MAX_LINE_CHARS = 4096              # one line of output, as handed on and in tails

_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f, *range(0x80, 0xa0)) if c != 0x09}


def escape_controls(text: str) -> str:
    """``text`` with terminal control characters (escape sequences, carriage returns...)
    written out as ``\\xNN``, so user output cannot drive the terminal it reaches."""
    return text.translate(_CONTROLS)


class Child:
    """A Python child process whose output goes, line by line, to ``on_line``.

    ``merge_stdout``: read stdout and stderr together (else stdout is discarded and only
    stderr is read). ``env``: variables set on top of ``base_env``, by default this
    process's environment with this copy of sourcebox on ``PYTHONPATH``.
    ``on_line`` gets each line, newline included; it must not raise.
    """

    def __init__(self, argv: Sequence[str], *, on_line: Callable[[str], None], merge_stdout: bool = False,
                 pass_fds: Sequence[int] = (), cwd: str | None = None, env: dict | None = None,
                 base_env: dict | None = None,
                 max_line_chars: int = MAX_LINE_CHARS, name: str = "child-output"):
        if base_env is None:
            base_env = dict(os.environ)
            base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [base_env.get("PYTHONPATH"), PACKAGE_ROOT]))
        environment = {**base_env, **(env or {})}
        self.popen = subprocess.Popen(
            list(argv), env=environment, cwd=cwd, pass_fds=tuple(pass_fds), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if merge_stdout else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if merge_stdout else subprocess.PIPE)
        self._stream = self.popen.stdout if merge_stdout else self.popen.stderr
        self._on_line, self._max_line_chars = on_line, max_line_chars
        self.tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
        self._pump = threading.Thread(target=self._read_output, daemon=True, name=name)
        self._pump.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> int:
        """Kill it unless it has ended; reap it; its exit status."""
        if self.popen.poll() is None:
            self.popen.kill()
        return self.popen.wait()

    def close(self) -> int:
        """Kill and reap it, and read its output to the end (its last lines belong in
        a crash report); its exit status."""
        returncode = self.kill()
        self._pump.join(timeout=5)
        self._stream.close()
        return returncode

    def output_tail(self) -> str:
        return "".join(self.tail).rstrip()

    def _read_output(self) -> None:
        fd = self._stream.fileno()
        line, cut_bytes = bytearray(), 0
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                if line or cut_bytes:
                    self._line(line, cut_bytes)
                return
            pieces = chunk.split(b"\n")
            for index, piece in enumerate(pieces):
                room = self._max_line_chars - len(line)
                line += piece[:room]
                cut_bytes += len(piece) - len(piece[:room])
                if index < len(pieces) - 1:  # a newline ended this line
                    self._line(line, cut_bytes)
                    line, cut_bytes = bytearray(), 0

    def _line(self, raw: bytearray, cut_bytes: int) -> None:
        text = escape_controls(raw.decode("utf-8", "replace"))
        if cut_bytes:
            text += f"[... {cut_bytes} more bytes of this line cut]"
        self.tail.append(text + "\n")
        self._on_line(text + "\n")
