"""Issue 15's runner measurements: worker start against its floor, the next call after a
crash, and a large argument that was allocated in transport memory.

- **Start**: ``runner.Worker(model=...)`` until it answers (a fresh supervisor and worker:
  imports, ``sandbox.enter``, model load, warm-up, hygiene baseline), interleaved with
  the floor: a fresh interpreter that imports torch, transformers and nnsight and loads
  the same model with ``runner.models.load``, timed from its spawn to the model loaded.
- **Zero copy from the producer**: a 64 MiB float32 argument made with ``worker.empty`` and
  filled in place, against an empty call and the same argument as an ordinary tensor
  (copied into the client's pool), interleaved; the function returns its type's name, so
  the request is what is timed.
- **Restart**: once the server's standby worker is ready, a call kills its worker
  (``SIGKILL`` to itself); the time from that call's ``WorkerCrashed`` to the next call's
  result (served by a new worker), and how many calls failed before one was served.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from .measure import Progress, interleaved, paired_ratios, summarize
from .settings import MIB, Settings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "tiny-gpt2"
WORKER_DEVICE = "cpu"
# The floor's child: the imports every model worker needs, then the model load; it prints
# the monotonic clock (system-wide on Linux) when the model is loaded.
_FLOOR = ("import sys, time, json\n"
          "import torch, transformers, nnsight\n"
          "imported = time.monotonic()\n"
          "from runner import models\n"
          "models.load(sys.argv[1], 'cpu')\n"
          "print(json.dumps({'imported': imported, 'loaded': time.monotonic()}))\n")


def run(settings: Settings, progress: Progress) -> dict:
    import runner  # noqa: F401  (the phase fails, recorded, where the runner is missing)

    return {"status": "ok", "zero_copy": _zero_copy(settings, progress), "start": _start(settings, progress),
            "restart": _restart(settings, progress)}


def _zero_copy(settings: Settings, progress: Progress) -> dict:
    import torch

    import runner

    progress("hot: a 64 MiB argument made in transport memory, against an empty call")
    nbytes = 64 * MIB
    with runner.Worker(model="none", device=WORKER_DEVICE) as worker:
        wait_for_standby(worker)
        in_place = worker.empty((nbytes // 4,))
        in_place.copy_(torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(7)))
        copied = in_place.clone()
        before = worker.stats()["bytes_in_place"]
        if worker.call(_kind, in_place) != "Tensor" or worker.stats()["bytes_in_place"] - before != nbytes:
            raise RuntimeError("the argument made with worker.empty did not travel in place")
        samples = interleaved({"empty": lambda: worker.call(_kind, None),
                               "in_place": lambda: worker.call(_kind, in_place),
                               "copied": lambda: worker.call(_kind, copied)},
                              repeats=settings.call_repeats, warmup=2)
    return {"tensor_bytes": nbytes, "times": {name: summarize(values) for name, values in samples.items()},
            "ratio_to_empty": paired_ratios(samples["in_place"], samples["empty"]),
            "copied_to_empty": paired_ratios(samples["copied"], samples["empty"])}


def _floor(spec: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
               OPENBLAS_NUM_THREADS="1")
    spawned = time.monotonic()
    completed = subprocess.run([sys.executable, "-c", _FLOOR, spec], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        raise RuntimeError(f"the import-floor child failed: {completed.stderr.strip()[-2000:]}")
    marks = json.loads(completed.stdout.strip().splitlines()[-1])
    return {"floor": marks["loaded"] - spawned, "imports": marks["imported"] - spawned,
            "model_load": marks["loaded"] - marks["imported"]}


def _ready(spec: str) -> float:
    import runner

    started = time.monotonic()
    worker = runner.Worker(model=spec, device=WORKER_DEVICE)
    ready = time.monotonic() - started
    worker.close()
    return ready


def _start(settings: Settings, progress: Progress) -> dict:
    from runner import models

    models.path(SPEC)  # built once, outside the timing
    samples: dict[str, list[float]] = {"ready": [], "floor": [], "imports": [], "model_load": []}
    for round_index in range(settings.start_repeats):
        progress(f"hot: start round {round_index + 1}/{settings.start_repeats}: worker ready and import floor")
        # Alternating order, as interleaved() does, so neither always follows the other.
        order = ("ready", "floor") if round_index % 2 == 0 else ("floor", "ready")
        for name in order:
            if name == "ready":
                samples["ready"].append(_ready(SPEC))
            else:
                for key, value in _floor(SPEC).items():
                    samples[key].append(value)
    return {"spec": SPEC, "times": {name: summarize(values) for name, values in samples.items()},
            "ratio": paired_ratios(samples["ready"], samples["floor"])}


def _restart(settings: Settings, progress: Progress) -> dict:
    import runner

    progress(f"hot: restart: crashing a {SPEC} worker {settings.start_repeats} times, timing the next call")
    worker = runner.Worker(model=SPEC, device=WORKER_DEVICE)
    samples, failed = [], 0
    try:
        worker.call(_answer)
        for _ in range(settings.start_repeats):
            wait_for_standby(worker)
            pid = worker.status()["worker_pid"]
            try:
                worker.call(_crash)
                raise RuntimeError("a call that kills its worker returned")
            except runner.WorkerCrashed:
                crashed = time.monotonic()
            while True:  # the time runs until a call is served; any that fails first is counted
                try:
                    answer = worker.call(_answer)
                    break
                except runner.WorkerCrashed:
                    failed += 1
            samples.append(time.monotonic() - crashed)
            if answer != 42 or worker.status()["worker_pid"] == pid:
                raise RuntimeError(f"after worker {pid} crashed the call returned {answer!r} from "
                                   f"worker {worker.status()['worker_pid']}")
        restarts = worker.status()["restarts"]
    finally:
        worker.close()
    return {"spec": SPEC, "times": summarize(samples), "failed_calls": failed, "restarts": restarts}


def wait_for_standby(worker: Any, seconds: float = 120.0) -> None:
    """Until the server's standby worker is confined and waiting (a crash right after the
    last one would find it still importing), or the server keeps none."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        standby = worker.status().get("standby")
        if standby is None or standby["state"] == "ready":
            return
        time.sleep(0.1)
    raise RuntimeError(f"the server's standby worker was not ready within {seconds:g}s")


def _answer() -> Any:
    return 42


def _crash() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _kind(value: Any) -> str:
    return type(value).__name__
