#!/usr/bin/env bash
# One short run that proves the runner's GPU path (docs/RUNNER.md, "CUDA"): a confined worker
# on --device cuda, a forward and an nnsight trace on the GPU, a large CUDA result back to this
# CPU-side client, and shared memory -> GPU throughput. Prints what it measured.
# Usage: scripts/gpu-check.sh            (PYTHON=... to pick the interpreter; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
check=$(mktemp -d)/gpu_check.py
cat >"$check" <<'PY'
import statistics
import time

import torch

import runner
from runner import models

GIB = 1 << 30


def on_gpu(model, ids):
    with torch.no_grad():
        logits = model._module(torch.tensor([ids], device="cuda"))
    return str(next(model._module.parameters()).device), logits.logits[0, -1].clone()


def cuda_tensor(n):
    torch.manual_seed(0)
    t = torch.randn(n, device="cuda")
    torch.cuda.synchronize()
    return t, float(t.double().sum())


def to_gpu_seconds(t, repeats):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        t.to("cuda")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def nothing():
    return None


def start(confine):
    return runner.Worker(model="tiny-gpt2", device="cuda", confine=confine, policy="nnsight-local")


print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0)}")
try:
    worker = start("required")
    print("confinement: required, granted")
except runner.WorkerStartError as exc:
    print(f"confinement 'required' refused here ({str(exc).splitlines()[0]}); using best-effort")
    worker = start("best-effort")
with worker:
    status = worker.status()
    print(f"worker {status['worker_pid']} on {status['device']}; sandbox:\n{status['sandbox']}")

    ids = [1, 2, 3, 4]
    device, logits = worker.call(on_gpu, runner.MODEL, ids)
    local = models.load("tiny-gpt2", "cpu")
    with torch.no_grad():
        expected = local._module(torch.tensor([ids])).logits[0, -1]
    print(f"forward on {device}: logits back on {logits.device}, max |gpu - cpu| = "
          f"{(logits - expected).abs().max().item():.2e}")

    try:
        from nnsight import LanguageModel

        import runner.nnsight as backend
    except ImportError as exc:
        print(f"trace: skipped ({exc})")
    else:
        client_model = LanguageModel(models.path("tiny-gpt2"))
        with client_model.trace("Hello world", backend=backend.WorkerBackend(worker)):
            hidden = client_model.transformer.h[0].output[0].save()
        print(f"trace on the GPU worker: saved {tuple(hidden.shape)} {hidden.dtype} on {hidden.device}")

    n = GIB // 4  # 1 GiB of float32
    started = time.perf_counter()
    tensor, worker_sum = worker.call(cuda_tensor, n)
    seconds = time.perf_counter() - started
    print(f"1 GiB CUDA result -> CPU client: {seconds * 1e3:.0f} ms ({GIB / seconds / 1e9:.2f} GB/s incl. "
          f"generation), on {tensor.device}, checksum {'ok' if abs(float(tensor.double().sum()) - worker_sum) < 1e-3 * abs(worker_sum) + 1 else 'MISMATCH'}")

    payload = torch.randn(n)
    worker.call(to_gpu_seconds, payload, 1)
    seconds = worker.call(to_gpu_seconds, payload, 5)
    print(f"shared memory (client's segment, pageable) -> GPU inside the worker: 1 GiB in "
          f"{seconds * 1e3:.1f} ms = {GIB / seconds / 1e9:.2f} GB/s")
    calls = []
    for _ in range(50):
        started = time.perf_counter()
        worker.call(nothing)
        calls.append(time.perf_counter() - started)
    print(f"empty call on the GPU worker: {statistics.median(calls) * 1e3:.2f} ms median")
print("gpu-check: done")
PY
"${PYTHON:-python3}" "$check"
