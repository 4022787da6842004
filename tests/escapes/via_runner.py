"""Run the escape attempts through the product's own worker, as user code.

:class:`RunnerWorker` starts ``runner.Worker`` (``python -m runner serve``: the
supervisor and its sandboxed worker process) with ``confine="required"``
(``"off"`` for the control run), and
turns the attempts into a real user module on the client side: one function per
attempt, written into a fresh directory on the client's ``sys.path`` and
imported there. Each function travels the way a user's request does:
``worker.call(fn)`` has capture ship it as source, and the worker compiles and
runs it under its policy. An exception coming back is the attempt's error
(data, not a test failure). After every attempt a forward pass of the hosted
model proves the worker still serves.

The generated modules form the package :data:`USER_PACKAGE`; a policy that
allows everything must still refuse it (and ``escapes``), or capture would
send the functions by reference to a worker that does not have them.

The worker hosts a copy of the embedded tiny GPT-2 in the witness's tree, so
its read-only model directory is one the witness watches for changes. The
client's project directory is on the client's ``sys.path`` and also reaches
the worker through ``PYTHONPATH``, as a user's shell environment would: the
sandbox must make it unreachable anyway.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import textwrap
from pathlib import Path

import runner
import runner.models
import sandbox

from runner_support import environment

from .attempts import ATTEMPTS, Attempt
from .witness import Outcome, Witness

#: Attempts the control run (``confine="off"``) cannot show working, with the reason.
CONTROL_EXEMPT = {
    "read_environment_secret": (
        "confine='off' still applies the Python layer, whose environment scrub (os.environ and "
        "the block /proc/self/environ shows) already removed the secret"
    ),
}

#: The package of the generated user modules (one module per worker). A namespace
#: package: workers alive at the same time each add a directory to it.
USER_PACKAGE = "escape_attempts"

#: Attempts whose premise the runner's worker does not offer, with the reason.
NOT_APPLICABLE = {
    "tiocsti_terminal": (
        "the runner's worker holds no terminal (stdin and stdout are /dev/null, stderr a pipe), "
        "so there is nothing to push input into; the child-based run passes it a pseudo-terminal"
    ),
}

# Computes, inside the worker, what the attempt's ``result`` shows: its repr (for
# secrets) and whether it is the refused target itself. No code of the test runs in
# the worker, so this reaches the worker's real ``sys`` the way any user code can
# (torch.save.__builtins__: the Python layer is not a boundary).
_REPORT_SOURCE = '''\
def _report(result, target):
    import torch
    sys = torch.save.__builtins__["__import__"]("sys")
    try:
        shown = repr(result)[:4000]
    except Exception as error:
        shown = "<unrepresentable: %s>" % type(error).__name__
    usable = False
    if target:
        module_name, _, attribute = target.partition(":")
        if isinstance(result, type(sys)):
            usable = not attribute and result.__name__ == module_name
        else:
            module = sys.modules.get(module_name)
            usable = bool(attribute) and module is not None and result is getattr(module, attribute, object())
    return {"result": shown, "target_usable": usable}
'''


def serves(model) -> bool:
    """Sent after every attempt: can the worker still run its model (and numpy)?"""
    import numpy
    import torch

    with torch.no_grad():
        logits = model._module(torch.tensor([[1, 2, 3]])).logits
    return bool(torch.isfinite(logits).all()) and float(numpy.ones(3).sum()) == 3.0


def attempt_function_name(attempt: Attempt) -> str:
    return f"attempt_{attempt.name}"


def parse_layers(report: str) -> dict[str, str]:
    """Layer name -> status from the worker's sandbox report text (``str(sandbox.Report)``).

    Layer lines are indented by two spaces; a layer's detail continues on lines
    indented further.
    """
    layers = {}
    for line in report.splitlines():
        fields = line.split()
        if line.startswith("  ") and not line.startswith("   ") and fields[0] in sandbox.LAYERS:
            layers[fields[0]] = fields[1]
    return layers


class RunnerWorker:
    """A confined ``runner.Worker`` under ``policy`` (a spec) serving attempts as user functions.

    ``client_root``: a fresh directory for this worker's client-side files (the
    generated attempts module, the model copy). ``confine="off"`` is for the
    control run (the OS layer off, the Python layer still on).
    """

    not_applicable = NOT_APPLICABLE
    control_exempt = CONTROL_EXEMPT

    def __init__(
        self, witness: Witness, policy: str, client_root: Path, *, confine: str = "required", timeout: float = 60.0
    ):
        self.witness = witness
        self.policy = sandbox.Policy.load(policy)
        self.model_dir = client_root / "model"
        shutil.copytree(runner.models.path("tiny-gpt2"), self.model_dir)
        witness.watch(self.model_dir)
        user_code = client_root / "user_code"
        self._package_dir = user_code / USER_PACKAGE
        self._package_dir.mkdir(parents=True)
        self._client_path = [str(user_code), str(witness.client_dir)]
        sys.path[:0] = self._client_path
        self.module = None
        self.worker = None
        try:
            with environment(SOURCEBOX_ESCAPE_SECRET=witness.env_secret, PYTHONPATH=str(witness.client_dir)):
                self.worker = runner.Worker(model=str(self.model_dir), policy=policy, confine=confine, timeout=timeout)
            self._attach()
        except BaseException:
            self.close()
            raise

    def _attach(self) -> None:
        """Read the (re)started worker's pid, sandbox report and scratch; write and import
        the attempts module for it (the scratch paths are baked into the sources)."""
        status = self.worker.status()
        self.pid: int = status["worker_pid"]
        self.report: str = status["sandbox"]
        self.layers = parse_layers(self.report)
        self.scratch = Path(os.readlink(f"/proc/{self.pid}/cwd"))
        if self.module is not None:
            sys.modules.pop(self.module.__name__, None)
        name = f"worker_{self.pid}"
        (self._package_dir / f"{name}.py").write_text(self._module_source())
        importlib.invalidate_caches()
        self.module = importlib.import_module(f"{USER_PACKAGE}.{name}")

    def _module_source(self) -> str:
        parts = [f'"""Escape attempts as user code for the runner worker {self.pid} (generated)."""\n', _REPORT_SOURCE]
        for attempt in ATTEMPTS:
            if attempt.name in self.not_applicable:
                continue
            source, target = self.witness.render(attempt, scratch=self.scratch, model_dir=self.model_dir)
            parts.append(
                f"def {attempt_function_name(attempt)}():\n"
                f"    result = None\n{textwrap.indent(source, '    ')}\n"
                f"    return _report(result, {target!r})\n"
            )
        return "\n\n".join(parts)

    def run(self, attempt: Attempt) -> Outcome:
        """Send the attempt's function; its error, if any, is data. Then check the worker serves."""
        report, error, ran = {"result": "None", "target_usable": False}, None, True
        try:
            report = self.worker.call(getattr(self.module, attempt_function_name(attempt)))
        except (Exception, sandbox.PolicyKill) as caught:  # the attempt failing is the expected case
            error = f"{type(caught).__name__}: {caught}"
            if caught.__cause__ is not None:  # the worker's traceback: secrets must not be in it either
                error += f"\n{caught.__cause__}"
            # Raised by the attempt itself only if its own lines are in the worker's traceback.
            ran = any(frame[0] == self.module.__file__ for frame in getattr(caught, "remote_traceback", ()))
        healthy = self._serves()
        return Outcome(attempt.name, error, report["result"], report["target_usable"], healthy, ran)

    def _serves(self) -> bool:
        try:
            answered = self.worker.call(serves, runner.MODEL)
        except runner.WorkerCrashed:
            answered = False
        if self.worker.status()["worker_pid"] != self.pid:
            # Killed and restarted by the supervisor: the attempt ended the worker. Later
            # attempts still run, against the new worker's pid and scratch.
            self._attach()
            return False
        return answered is True

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        for entry in self._client_path:
            sys.path.remove(entry)
        if self.module is not None:
            sys.modules.pop(self.module.__name__, None)
        self.witness.watched.remove(self.model_dir)
