"""nnsight traces: request payload against model depth, and per-trace latency.

The trace body is ``bench_trace.first_and_last_layer`` (generated user code: a
``normalize`` helper applied to the first layer's output, plus the last layer's norm).
Payloads are compared for the same trace on the 2- and 12-layer tiny GPT-2:

- nnsight 0.8's own request, ``RequestModel.serialize(tracer)``: what ``remote=True``
  posts and ``remote='local'`` round-trips (the user module registered by value with
  ``nnsight.ndif.register``, as nnsight tells users to do for local code);
- sourcebox's request, ``capture.dumps(runner.nnsight.build_request(tracer))``: what
  ``WorkerBackend`` hands to the worker; and, through a running worker, the bytes the
  client actually wrote for the first trace and for a repeat (known code goes by digest).

Latency: a plain local trace, nnsight's in-process ``remote='local'`` and the sourcebox
worker (``backend=runner.nnsight.WorkerBackend(worker)``), interleaved.
"""
from __future__ import annotations

import time
from typing import Any

from .measure import Progress, WrongResult, interleaved, paired_ratios, summarize
from .hotpath import wait_for_standby
from .settings import Settings
from .transport import WORKER_DEVICE, peak_rss
from .usercode import UserCode

PROMPT = "The Eiffel Tower is in Paris"
LOCAL = "local trace (no serialization)"
NNSIGHT_LOCAL = "nnsight remote='local' (in-process)"
WORKER = "sourcebox worker (WorkerBackend)"
LAYER_COUNTS = (2, 12)


def spec_for(layers: int) -> str:
    return "tiny-gpt2" if layers == 2 else f"tiny-gpt2-{layers}l"


def run(user: UserCode, settings: Settings, progress: Progress) -> dict:
    """Payload sizes on both depths; latency through the worker for ``settings.trace_worker_layers``."""
    try:
        import nnsight  # noqa: F401
        import runner.nnsight  # noqa: F401
        from runner import models  # noqa: F401
    except ImportError as error:
        return {"status": "unavailable", "reason": f"nnsight or runner.nnsight cannot be imported: {error}"}
    from nnsight import ndif

    user.reload()
    # Registered for good: this phase runs last, so no cloudpickle-by-reference baseline
    # is measured after it.
    ndif.register(user.trace)
    record: dict = {"status": "ok", "prompt": PROMPT, "payloads": [], "latency": []}
    for layers in LAYER_COUNTS:
        model = _open_model(layers, progress)
        record["payloads"].append(_payloads(model, layers, user))
        progress(f"traces: {layers} layers: nnsight request {record['payloads'][-1]['nnsight_bytes']:,} B, "
                 f"sourcebox request {record['payloads'][-1]['sourcebox_bytes']:,} B")
        if layers in settings.trace_worker_layers:
            record["latency"].append(_latency(model, layers, user, settings, progress))
    first, last = record["payloads"][0], record["payloads"][-1]
    record["depth_growth"] = {
        "layers": [first["layers"], last["layers"]],
        "sourcebox": last["sourcebox_bytes"] / first["sourcebox_bytes"],
        "sourcebox_bytes_added": last["sourcebox_bytes"] - first["sourcebox_bytes"],
        "nnsight": last["nnsight_bytes"] / first["nnsight_bytes"],
        "nnsight_bytes_added": last["nnsight_bytes"] - first["nnsight_bytes"],
    }
    return record


def _open_model(layers: int, progress: Progress) -> Any:
    import warnings

    from nnsight import LanguageModel
    from runner import models

    progress(f"traces: opening the {layers}-layer tiny GPT-2 ({spec_for(layers)})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel's deprecation notice
        return LanguageModel(models.path(spec_for(layers)))


def _payloads(model: Any, layers: int, user: UserCode) -> dict:
    """Both requests for the same traced block, taken from inside one trace."""
    import capture
    import zstandard
    from nnsight.schema.request import RequestModel

    from runner.nnsight import build_request

    requests: dict[str, bytes] = {}

    def measuring_backend(tracer: Any) -> None:
        requests["nnsight"] = RequestModel.serialize(tracer)
        requests["sourcebox"] = capture.dumps(build_request(tracer))
        tracer.execute(tracer.info.code)  # then run it here, so the body's names are bound

    user.trace.first_and_last_layer(model, PROMPT, backend=measuring_backend)
    compressor = zstandard.ZstdCompressor(level=3)
    return {"layers": layers, "spec": spec_for(layers),
            "nnsight_bytes": len(requests["nnsight"]),
            "nnsight_zstd_bytes": len(compressor.compress(requests["nnsight"])),
            "sourcebox_bytes": len(requests["sourcebox"]),
            "sourcebox_zstd_bytes": len(compressor.compress(requests["sourcebox"]))}


def _latency(model: Any, layers: int, user: UserCode, settings: Settings, progress: Progress) -> dict:
    import torch

    import runner
    from runner.nnsight import WorkerBackend

    spec = spec_for(layers)
    progress(f"traces: starting a worker with {spec}")
    started = time.perf_counter()
    worker = runner.Worker(model=spec, device=WORKER_DEVICE)
    startup = time.perf_counter() - started
    wait_for_standby(worker)  # its start-up would compete with what is timed
    try:
        backend = WorkerBackend(worker)
        body = user.trace.first_and_last_layer
        before = worker.bytes_sent
        through_worker = body(model, PROMPT, backend=backend)
        first_bytes = worker.bytes_sent - before
        before = worker.bytes_sent
        body(model, PROMPT, backend=backend)
        repeat_bytes = worker.bytes_sent - before
        local = body(model, PROMPT)
        in_process = body(model, PROMPT, remote="local")
        for name, result in ((WORKER, through_worker), (NNSIGHT_LOCAL, in_process)):
            if not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(result, local)):
                raise WrongResult(f"the {name} trace saved values that differ from a local trace")
        progress(f"traces: timing {spec}: local, nnsight remote='local', sourcebox worker")
        samples = interleaved({LOCAL: lambda: body(model, PROMPT),
                               NNSIGHT_LOCAL: lambda: body(model, PROMPT, remote="local"),
                               WORKER: lambda: body(model, PROMPT, backend=backend)},
                              repeats=settings.trace_repeats)
        worker_pid = worker.status()["worker_pid"]
        return {"layers": layers, "spec": spec, "worker_startup_s": startup,
                "times": {name: summarize(values) for name, values in samples.items()},
                "worker_to_local": paired_ratios(samples[WORKER], samples[LOCAL]),
                "worker_to_nnsight_local": paired_ratios(samples[WORKER], samples[NNSIGHT_LOCAL]),
                "request_bytes": {"first": first_bytes, "repeat": repeat_bytes},
                "worker_peak_rss": peak_rss(worker_pid)}
    finally:
        worker.close()
