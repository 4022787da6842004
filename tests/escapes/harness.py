"""Start a worker (tests/escapes/child.py) and run attempts in it."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import sandbox

from .attempts import Attempt
from .witness import Outcome, Witness

CHILD = Path(__file__).with_name("child.py")


class WorkerDied(RuntimeError):
    """The worker stopped answering: an attempt killed it, or it failed to start."""


class ConfinedWorker:
    """One worker process serving attempts over a pair of pipes, under ``policy`` (a spec).

    It writes to the witness's scratch directory, reads the witness's model
    directory, and holds the witness's pseudo-terminal: every attempt applies.
    """

    not_applicable: dict[str, str] = {}
    control_exempt: dict[str, str] = {}  # unconfined, it applies no layer at all

    def __init__(self, witness: Witness, policy: str, *, confined: bool = True, timeout: float = 60.0):
        self.witness = witness
        self.timeout = timeout
        self.policy = sandbox.Policy.load(policy)
        self.scratch = witness.scratch
        self.model_dir = witness.model_dir
        request_read, self._request_write = os.pipe()
        self._response_read, response_write = os.pipe()
        self.log_path = witness.root / f"worker-{Path(policy).stem}-{'confined' if confined else 'unconfined'}.log"
        command = [
            sys.executable, str(CHILD), "--policy", policy, "--scratch", str(witness.scratch),
            "--read", str(witness.model_dir), "--requests", str(request_read), "--responses", str(response_write),
        ]
        if not confined:
            command.append("--unconfined")
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            # The client's project on the path and as the working directory: the
            # sandbox must make it unreachable anyway.
            "PYTHONPATH": str(witness.client_dir),
            "SOURCEBOX_ESCAPE_SECRET": witness.env_secret,
            "OMP_NUM_THREADS": "1",
        }
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                pass_fds=(request_read, response_write, witness.pty_slave),
                cwd=witness.client_dir,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        os.close(request_read)
        os.close(response_write)
        self._responses = os.fdopen(self._response_read, "r", encoding="utf-8")
        ready = self._read()
        self.pid: int = ready["pid"]
        self.report: dict | None = ready["report"]
        layers = self.report["layers"] if self.report else {}  # unconfined: no report
        self.layers = {name: layer["status"] for name, layer in layers.items()}

    def _read(self) -> dict:
        if not select.select([self._responses], [], [], self.timeout)[0]:
            raise WorkerDied(f"no answer within {self.timeout} s; log: {self.log_path}")
        line = self._responses.readline()
        if not line:
            raise WorkerDied(
                f"the worker exited (code {self.process.wait()}); log:\n{self.log_path.read_text()[-3000:]}"
            )
        return json.loads(line)

    def run(self, attempt: Attempt) -> Outcome:
        source, target = self.witness.render(attempt)
        request = json.dumps({"name": attempt.name, "source": source, "target": target}) + "\n"
        os.write(self._request_write, request.encode())
        answer = self._read()
        return Outcome(answer["name"], answer["error"], answer["result"], answer["target_usable"], answer["healthy"])

    def close(self) -> None:
        os.close(self._request_write)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._responses.close()
