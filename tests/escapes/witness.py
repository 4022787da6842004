"""The test side of the escape suite: plant targets, then judge attempts by effect.

A :class:`Witness` owns everything an escape would touch: an "outside"
directory (the client's files: a secret, a sentinel file to chmod or delete,
listening sockets), a client project with a module holding a secret, a
read-only model directory, TCP/UDP/Unix listeners, signal handlers in this
process, and a raw pseudo-terminal. Before each attempt it records a
baseline; afterwards :meth:`Witness.judge` lists every effect that happened.

A worker's own places (its scratch directory, the model directory it reads)
are passed per call, so one witness serves workers that keep them elsewhere
(the runner's worker makes its own scratch); a model directory the witness
did not plant is registered with :meth:`Witness.watch`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import select
import signal
import socket
import string
import tty
from dataclasses import dataclass
from pathlib import Path

import psutil

from .attempts import Attempt

CLIENT_MODULE = "client_project_secret"
NAMESPACES = ("ipc", "mnt", "net", "pid", "user", "uts")


@dataclass
class Outcome:
    """What the worker reported for one attempt.

    ``ran``: the attempt's code did start in the worker (false when shipping it
    failed, which would make the attempt look blocked without testing anything).
    """

    name: str
    error: str | None
    result: str
    target_usable: bool
    healthy: bool
    ran: bool = True


@dataclass
class Baseline:
    files: dict[str, tuple]
    limits: str
    namespaces: dict[str, str]
    comm: str
    tracer: str
    signals: dict[int, int]


class Witness:
    """Targets an escape would hit, and the judge of what happened."""

    def __init__(self, root: Path):
        token = secrets.token_hex(8)
        self.root = root
        self.outside = root / "outside"
        self.scratch = root / "scratch"
        self.client_dir = root / "client_project"
        self.model_dir = root / "model"
        for directory in (self.outside, self.scratch, self.client_dir, self.model_dir):
            directory.mkdir(parents=True)
        self.secret_text = f"file-secret-{token}"
        self.env_secret = f"env-secret-{token}"
        self.module_secret = f"module-secret-{token}"
        self.secret_path = self.outside / "client_secret.txt"
        self.sentinel = self.outside / "sentinel.txt"
        self.watched = [self.outside, self.client_dir, self.model_dir]
        self._planted = {
            self.secret_path: self.secret_text + "\n",
            self.sentinel: "do not touch\n",
            self.client_dir / f"{CLIENT_MODULE}.py": f"SECRET = {self.module_secret!r}\n",
            self.model_dir / "config.json": '{"model_type": "tiny"}\n',
        }

        self.tcp = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix_path = str(self.outside / "listener.sock")
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.unix_path)
        self.unix.listen(16)
        self.unix_dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.unix_dgram.bind(self.unix_path + ".dgram")
        self.abstract_name = f"\0sourcebox-escape-{token}".encode()
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind(self.abstract_name)
        self.abstract.listen(16)
        self.listeners = [self.tcp, self.udp, self.unix, self.unix_dgram, self.abstract]
        for listener in self.listeners:
            listener.setblocking(False)

        self.reset()

        self.pty_master, self.pty_slave = os.openpty()
        tty.setraw(self.pty_slave)
        os.set_blocking(self.pty_slave, False)

        self.signal_counts = {signal.SIGUSR1: 0, signal.SIGWINCH: 0}
        self._previous_handlers = {
            number: signal.signal(number, self._count_signal) for number in self.signal_counts
        }

    def _count_signal(self, number: int, _frame: object) -> None:
        self.signal_counts[number] += 1

    def close(self) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        for listener in self.listeners:
            listener.close()
        os.close(self.pty_master)
        os.close(self.pty_slave)

    def watch(self, directory: Path) -> None:
        """Judge changes under ``directory`` too (a worker's model directory planted by someone else).

        It is compared before and after each attempt but never reset: an attempt
        that changes it has escaped, and the test says so. Remove it from
        ``watched`` when its worker is gone.
        """
        self.watched.append(directory)

    def reset(self, scratch: Path | None = None) -> None:
        """Put every planted file back as it was and remove anything else an attempt left
        (in ``scratch`` too: the worker's, default the witness's own)."""
        keep = {Path(self.unix_path), Path(self.unix_path + ".dgram")}
        for directory in (self.outside, self.client_dir, self.model_dir, scratch or self.scratch):
            for path in sorted(directory.rglob("*"), reverse=True):
                if path in keep:
                    continue
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
        for path, text in self._planted.items():
            path.write_text(text)
            path.chmod(0o600)

    # ------------------------------------------------------------ attempts

    def render(self, attempt: Attempt, *, scratch: Path | None = None, model_dir: Path | None = None) -> tuple[str, str]:
        """The attempt's source and target with placeholders filled, for a worker whose
        scratch and model directories are these (default: the witness's own)."""
        scratch = scratch or self.scratch
        model_dir = model_dir or self.model_dir
        values = {
            "outside_dir": repr(str(self.outside)),
            "marker": repr(str(self.outside / f"marker-{attempt.name}")),
            "sentinel": repr(str(self.sentinel)),
            "secret_path": repr(str(self.secret_path)),
            "scratch": repr(str(scratch)),
            "proof": repr(str(scratch / f"proof-{attempt.name}")),
            "tcp_port": str(self.tcp.getsockname()[1]),
            "udp_port": str(self.udp.getsockname()[1]),
            "unix_path": repr(self.unix_path),
            "abstract_name": repr(self.abstract_name),
            "parent_pid": str(os.getpid()),
            "pty_fd": str(self.pty_slave),
            "client_dir": repr(str(self.client_dir)),
            "client_module": repr(CLIENT_MODULE),
            "model_dir": repr(str(model_dir)),
        }
        source = string.Template(attempt.source).substitute(values)
        target = attempt.target.replace("$client_module", CLIENT_MODULE)
        return source, target

    def baseline(self, worker_pid: int) -> Baseline:
        return Baseline(
            files=self._files(),
            limits=_limits(worker_pid),
            namespaces={ns: os.readlink(f"/proc/{worker_pid}/ns/{ns}") for ns in NAMESPACES},
            comm=Path(f"/proc/{worker_pid}/comm").read_text(),
            tracer=_status_field(os.getpid(), "TracerPid"),
            signals=dict(self.signal_counts),
        )

    def _files(self) -> dict[str, tuple]:
        state = {}
        for directory in self.watched:
            for path in sorted(directory.rglob("*")):
                info = path.lstat()
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
                try:
                    attributes = tuple(sorted(os.listxattr(path, follow_symlinks=False)))
                except OSError:
                    attributes = ()
                state[str(path)] = (info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_mtime_ns, digest, attributes)
        return state

    def judge(
        self, attempt: Attempt, outcome: Outcome, before: Baseline, worker_pid: int, scratch: Path | None = None
    ) -> list[str]:
        """Every effect of the attempt in the worker ``worker_pid`` whose scratch
        directory is ``scratch`` (default: the witness's own); empty when it was blocked."""
        effects = []
        after = self._files()
        for path in sorted(set(before.files) | set(after)):
            if before.files.get(path) != after.get(path):
                change = "appeared" if path not in before.files else "vanished" if path not in after else "changed"
                effects.append(f"{path} {change} outside scratch")
        proofs = sorted(p.name for p in (scratch or self.scratch).glob("proof-*"))
        if proofs:
            effects.append(f"a new process ran: {', '.join(proofs)} written")
        children = psutil.Process(worker_pid).children(recursive=True)
        if children:
            effects.append(f"the worker has child processes: {[child.pid for child in children]}")
        effects.extend(self._drain_listeners())
        if self.signal_counts != before.signals:
            effects.append(f"signals reached the test process: {before.signals} -> {self.signal_counts}")
        if _status_field(os.getpid(), "TracerPid") != before.tracer:
            effects.append("the test process is being traced")
        try:
            injected = os.read(self.pty_slave, 4096)
        except BlockingIOError:
            injected = b""
        if injected:
            effects.append(f"input was pushed into the terminal: {injected!r}")
        if _limits(worker_pid) != before.limits:
            effects.append("the worker's resource limits changed")
        for ns, link in before.namespaces.items():
            if os.readlink(f"/proc/{worker_pid}/ns/{ns}") != link:
                effects.append(f"the worker moved to a new {ns} namespace")
        if Path(f"/proc/{worker_pid}/comm").read_text() != before.comm:
            effects.append("the worker's /proc entry was written")
        seen = f"{outcome.result}\n{outcome.error or ''}"
        for label, secret in (("file", self.secret_text), ("environment", self.env_secret), ("client module", self.module_secret)):
            if secret in seen:
                effects.append(f"the {label} secret reached the attempt's result")
        if attempt.no_data and outcome.result not in ("None", "b''", "''"):
            effects.append(f"data from another process reached the result: {outcome.result[:80]}")
        if outcome.target_usable:
            effects.append(f"user code holds the refused {attempt.target or 'target'}")
        return effects

    def _drain_listeners(self) -> list[str]:
        effects = []
        for listener, label in ((self.tcp, "TCP"), (self.unix, "Unix path"), (self.abstract, "abstract Unix")):
            while select.select([listener], [], [], 0)[0]:
                connection, _ = listener.accept()
                connection.close()
                effects.append(f"a connection reached the {label} listener")
        for listener, label in ((self.udp, "UDP"), (self.unix_dgram, "Unix datagram")):
            while select.select([listener], [], [], 0)[0]:
                listener.recv(65536)
                effects.append(f"a datagram reached the {label} listener")
        return effects


def _limits(pid: int) -> str:
    return Path(f"/proc/{pid}/limits").read_text()


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""
