"""Cold loads: the first ``loads`` of a payload in a fresh interpreter, as a server sees it.

The parent writes the payload to a file and runs ``python -m benchmarks.coldload NAME FILE``
in a new process whose ``sys.path`` lacks the user's modules. The child imports the
serializer (and torch, when the payload holds tensors: that import is not the
serializer's cost), then times one ``loads`` and prints one JSON line: the seconds, or
the error that a server would have raised (a by-reference pickle of user code fails here).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(serializer_name: str, payload: bytes, *, preload_torch: bool, timeout: float = 120.0) -> dict:
    """Run one cold load of ``payload`` in a fresh process; ``{"ok", "seconds" | "error"}``."""
    with tempfile.NamedTemporaryFile(prefix="sourcebox-bench-", suffix=".payload") as handle:
        handle.write(payload)
        handle.flush()
        argv = [sys.executable, "-m", "benchmarks.coldload", serializer_name, handle.name]
        if preload_torch:
            argv.append("--preload-torch")
        # Only the repository is importable: the user's modules live elsewhere.
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env["PYTHONPATH"] = REPO_ROOT
        completed = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"the cold-load process exited with {completed.returncode}: {tail}"}
    return json.loads(lines[-1])


def _child(argv: list[str]) -> int:
    from benchmarks import baselines

    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "--preload-torch"):
        print("usage: python -m benchmarks.coldload SERIALIZER PAYLOAD_FILE [--preload-torch]", file=sys.stderr)
        return 2
    serializer = baselines.make(argv[0])
    if len(argv) == 3:
        import torch  # noqa: F401  (imported up front: not part of the load being timed)
    with open(argv[1], "rb") as handle:
        payload = handle.read()
    start = time.perf_counter()
    try:
        loaded = serializer.loads(payload)
    except Exception as error:  # the failure is the measurement: report it, do not crash
        print(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}))
        return 0
    seconds = time.perf_counter() - start
    print(json.dumps({"ok": True, "seconds": seconds, "type": type(loaded).__name__}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
