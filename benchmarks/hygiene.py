"""What the worker's hygiene between requests costs (``runner.hygiene``).

Measured in a child process set up as a worker is (handler modules imported, tiny-gpt2
loaded, torch's pool started, the warm-up run, then the ``Baseline``), because a baseline
installs an audit hook that nothing can remove: the benchmark process stays as it was.
The child times, in interleaved rounds, a forward of the tiny model, the whole
after-request step (scrub and checks) and its parts, and SHA-256 over a large buffer (the
fingerprint's cost per GB of what is not read-only: buffers, a GPU model's storages), and
prints one JSON line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from .measure import Progress, interleaved, paired_ratios, summarize
from .settings import MIB, Settings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORWARD = "forward of tiny-gpt2 (8 tokens)"
AFTER = "hygiene after a request (scrub + checks)"
SCRUB = "scrub"
NAMESPACES = "namespaces (version tags)"
NAMESPACES_COPIES = "namespaces (comparing every copy)"
MODEL = "model (facts + fingerprint)"
FINGERPRINT = "fingerprint only"
CHECKS = "checks alone (no scrub)"


def run(settings: Settings, progress: Progress) -> dict:
    """The measurements of a child process; raises when it fails (recorded as the phase's failure)."""
    progress("hygiene: measuring the worker's scrub and checks in a child process")
    argv = [sys.executable, "-m", "benchmarks.hygiene", str(settings.call_repeats),
            str((64 if settings.quick else 256) * MIB)]
    env = {key: value for key, value in os.environ.items() if key != "SOURCEBOX_TEST_NO_HYGIENE"}
    completed = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"the hygiene benchmark exited with {completed.returncode}: "
                           f"{(completed.stderr.strip().splitlines() or ['no output'])[-1]}")
    return dict(json.loads(lines[-1]), status="ok")


def _child(repeats: int, hash_bytes: int) -> dict:
    import hashlib

    import torch

    from runner import hygiene, worker

    worker._import_extensions([])
    model, _ = worker._load_model(worker._model_directory("tiny-gpt2"), "cpu")
    read_only = worker._protect_parameters(model)
    worker._start_thread_pool(torch)
    worker._warm_up(model)
    with tempfile.TemporaryDirectory(prefix="sourcebox-bench-scratch-") as scratch:
        baseline = hygiene.Baseline(model, scratch=scratch, read_only=read_only)
        watched = baseline._watched
        ids = torch.arange(8).unsqueeze(0)
        buffer = torch.ones(hash_bytes // 4).numpy()

        def forward():
            with torch.no_grad():
                model._module(ids)

        def after():
            if baseline.after_request() is not None:
                raise RuntimeError("a clean request retired the worker")

        def copies():
            return [i for i, (d, c) in enumerate(zip(watched.dicts, watched.copies)) if not hygiene._same(d, c)]

        samples = interleaved({
            FORWARD: forward, AFTER: after, SCRUB: baseline.scrub, NAMESPACES: watched.findings,
            NAMESPACES_COPIES: copies, MODEL: baseline._model_findings, FINGERPRINT: baseline._fingerprint,
            CHECKS: lambda: baseline.check(()),
        }, repeats=repeats)
        hashing = interleaved({"sha256": lambda: hashlib.sha256(buffer).digest()},
                              repeats=max(3, repeats // 5))["sha256"]
        parameter_bytes = sum(t.numel() * t.element_size() for _, t, _ in baseline._model["tensors"])
        fingerprinted = sum(storage.nbytes() for storage in baseline._hashed_storages().values())
        return {
            "times": {name: summarize(values) for name, values in samples.items()},
            "ratio_to_forward": paired_ratios(samples[AFTER], samples[FORWARD]),
            "watched_dicts": len(watched.dicts), "version_tags": watched.uses_tags,
            "model_parameter_bytes": parameter_bytes, "read_only_bytes": read_only.length if read_only else 0,
            "fingerprinted_bytes": fingerprinted,
            "hash_seconds_per_gb": summarize([seconds * (1 << 30) / hash_bytes for seconds in hashing]),
            "hash_buffer_bytes": hash_bytes,
        }


if __name__ == "__main__":
    print(json.dumps(_child(int(sys.argv[1]), int(sys.argv[2]))))
