"""Where a sourcebox trace's time goes, next to a local trace and nnsight's in-process
``remote='local'``, on the embedded tiny GPT-2 (issue 15: the trace breakdown).

``python -m benchmarks.trace_breakdown [--rounds N]`` prints a table and the JSON; import
``measure(rounds)`` for the numbers. Whole traces are timed interleaved (as
``benchmarks.traces``, but with this process's torch threads set to the worker's);
each part is timed on its own, in this process, on the same request:

- nnsight's client side: entering ``model.trace`` and capturing the block, up to the
  backend call (a backend that runs nothing);
- ``build_request``: the block's source, the variables it reads, their bundle;
- encoding the request (``capture.dumps`` of it, and the request bundle the client writes);
- the worker's share, run here on the same model: the request decoded and the block
  compiled (``handle_trace`` up to the run), the block run, the result encoded; then the
  client's data-only decode of that result;
- transport: what the whole trace through the worker costs beyond those parts (two
  socket hops, framing, the supervisor, scrubbing between requests).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

from .measure import interleaved, paired_ratios, summarize, time_batch
from .traces import PROMPT
from .usercode import write_and_import

LOCAL, NNSIGHT_LOCAL, WORKER = "local trace", "nnsight remote='local' (in-process)", "sourcebox remote='local'"
# References for the transport: a round trip to the supervisor, and an empty call through the worker.
PING, EMPTY_CALL = "worker.ping() (client <-> supervisor)", "worker.call(empty) (through the worker)"


def _best(operation: Callable[[], Any], rounds: int, count: int = 20) -> float:
    return min(time_batch(operation, count) for _ in range(rounds))


def measure(rounds: int = 15) -> dict:
    """Whole-trace times (median over interleaved rounds, ratios per round) and the parts."""
    import capture
    import runner
    import torch
    from nnsight import LanguageModel
    from runner import handlers, models
    from runner import nnsight as sourcebox_nnsight

    from nnsight import ndif

    user = write_and_import(tempfile.mkdtemp(prefix="sourcebox-bench-user-"))
    ndif.register(user.trace)  # nnsight's remote='local' ships local code only once registered
    body = user.trace.first_and_last_layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LanguageModel(models.path("tiny-gpt2"))
    worker = runner.Worker(model="tiny-gpt2", device="cpu")
    try:
        # The same thread budget on both sides: on a busy machine a 2-thread local forward
        # against the worker's 1 thread measures contention, not the request path.
        torch.set_num_threads(worker.status()["threads"])
        backend = sourcebox_nnsight.WorkerBackend(worker)
        empty = user.helpers.empty
        samples = interleaved({LOCAL: lambda: body(model, PROMPT),
                               NNSIGHT_LOCAL: lambda: body(model, PROMPT, remote="local"),
                               WORKER: lambda: body(model, PROMPT, backend=backend),
                               PING: worker.ping, EMPTY_CALL: lambda: worker.call(empty)}, repeats=rounds)
        parts = _parts(model, user, rounds, worker.policy, capture, handlers, sourcebox_nnsight)
    finally:
        worker.close()
    whole = {name: summarize(values) for name, values in samples.items()}
    parts["the rest: transport, worker loop, between-request checks"] = whole[WORKER]["median"] - sum(parts.values())
    return {"whole": whole,
            "worker_to_nnsight_local": paired_ratios(samples[WORKER], samples[NNSIGHT_LOCAL]),
            "worker_to_local": paired_ratios(samples[WORKER], samples[LOCAL]),
            "parts_s": parts}


def _parts(model: Any, user: Any, rounds: int, policy: Any, capture: Any, handlers: Any, sourcebox_nnsight: Any) -> dict:
    taken: dict[str, Any] = {}

    def nothing(tracer: Any) -> None:
        return None

    def keep(tracer: Any) -> None:  # times what needs the live tracer
        request = taken["request"] = sourcebox_nnsight.build_request(tracer, policy)
        taken["build_request"] = _best(lambda: sourcebox_nnsight.build_request(tracer, policy), rounds)
        digest = sourcebox_nnsight._request_digest(sourcebox_nnsight._request_bytes(request))
        taken["encode"] = _best(lambda: capture.encode(
            {"digest": digest, "request": sourcebox_nnsight._request_bytes(request)}), rounds)
        tracer.execute(tracer.info.code)  # so the body's names are bound

    def client_side() -> None:
        try:
            user.trace.first_and_last_layer(model, PROMPT, backend=nothing)
        except NameError:  # nothing ran, so the saved names were never bound
            pass

    user.trace.first_and_last_layer(model, PROMPT, backend=keep)
    data = sourcebox_nnsight._request_bytes(taken["request"])
    payload = {"digest": sourcebox_nnsight._request_digest(data), "request": data}
    parts = {
        "nnsight client: enter trace, capture the block": _best(client_side, rounds),
        "build_request (block source, variables, their bundle)": taken["build_request"],
        "encode the request (its bytes + the request bundle)": taken["encode"],
    }
    # Last: the worker's handler resets nnsight's per-file source cache, which this
    # process's own traces of the same file read.
    context = handlers.Context(model=model, policy=policy, device="cpu", model_spec="tiny-gpt2")
    result = sourcebox_nnsight.handle_trace(context, payload)
    encoded = capture.encode(result)
    parts["worker: decode, compile and run the block (handle_trace)"] = _best(
        lambda: sourcebox_nnsight.handle_trace(context, payload), rounds, 10)
    parts["worker: encode the result"] = _best(lambda: capture.encode(result), rounds)
    parts["client: decode the result (data only)"] = _best(
        lambda: capture.decode(encoded.header, encoded.frames, policy=capture.DATA_ONLY), rounds)
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trace_breakdown", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = measure(args.rounds)
    print(f"{'whole trace':<60} {'median':>10}")
    for name, stats in results["whole"].items():
        print(f"  {name:<58} {stats['median'] * 1e3:8.2f} ms")
    print(f"  sourcebox / nnsight in-process: {results['worker_to_nnsight_local']['median']:.2f}x, "
          f"sourcebox / local: {results['worker_to_local']['median']:.2f}x")
    print("parts of the sourcebox trace")
    for name, seconds in results["parts_s"].items():
        print(f"  {name:<58} {seconds * 1e3:8.3f} ms")
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
