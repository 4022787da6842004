"""Requests through the worker: latency of calls and tensor throughput, against a pipe.

The baseline is what people do without sourcebox: a plain subprocess (multiprocessing,
spawn) that reads ``cloudpickle`` payloads from a ``multiprocessing.Pipe``, calls the
function and pickles the result back. Functions go to it by value (the child cannot
import the user's modules, like the worker), tensors through torch's pickle reduction.
Both sides get the same call, in interleaved rounds; the worker is a real
``runner.Worker`` (its own supervisor and sandboxed worker processes, shared memory).
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import time
from typing import Any, Callable

from . import baselines
from .hotpath import wait_for_standby
from .measure import Progress, WrongResult, interleaved, paired_ratios, summarize
from .settings import MIB, Settings
from .usercode import UserCode

# The baselines run on the CPU, so the workers do too, even where a GPU is present
# (scripts/gpu-check.sh measures the GPU path).
WORKER_DEVICE = "cpu"
WORKER = "sourcebox worker"
PIPE = "cloudpickle over a Pipe"
PING = "worker.ping (transport only)"
ENCODE = "capture.encode_variables of the call"
SEAL = "seal: fresh memfd, sealed, mapped copy-on-write"
COPY = "copy: pooled memfd, copied out by the client"
# The result sizes at which the two ways of handing back results are compared.
RESULT_DELIVERY_SIZES = (1 << 20, 64 << 20)


def serve_pipe(connection: Any) -> None:
    """The baseline's child process: run pickled calls until an empty message arrives."""
    import cloudpickle
    import torch  # noqa: F401  (the worker has torch loaded too; not part of any timed call)

    while True:
        request = connection.recv_bytes()
        if not request:
            return
        fn, args = cloudpickle.loads(request)
        connection.send_bytes(cloudpickle.dumps(fn(*args)))


class PipeWorker:
    """A plain subprocess that runs ``cloudpickle`` calls sent over a ``multiprocessing.Pipe``."""

    def __init__(self, user: UserCode):
        self.dumps = baselines.make(baselines.CLOUDPICKLE_BY_VALUE, user.modules).dumps
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=serve_pipe, args=(child_end,), daemon=True)
        self.process.start()
        child_end.close()

    def call(self, fn: Callable, *args: Any) -> Any:
        import cloudpickle

        self.connection.send_bytes(self.dumps((fn, args)))
        return cloudpickle.loads(self.connection.recv_bytes())

    def payload_bytes(self, fn: Callable, *args: Any) -> int:
        return len(self.dumps((fn, args)))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.send_bytes(b"")
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def peak_rss(pid: int) -> int | None:
    """The process's peak resident set (VmHWM), or None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_own_peak_rss() -> bool:
    """Start this process's peak-RSS count afresh (Linux clear_refs); False where unsupported."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def run(user: UserCode, settings: Settings, progress: Progress,
        call_scenarios: list[tuple[str, Callable[[], Any]]]) -> dict:
    """Calls and tensor round trips through a fresh worker and through the pipe baseline.

    ``call_scenarios`` are (title, build) pairs: each built object is the argument of a
    small call (built here, after the user modules are reloaded).
    Returns ``{"status": "unavailable", "reason": ...}`` when the runner is not installed;
    a worker that fails to start is a failure, raised.
    """
    try:
        import runner
    except ImportError as error:
        return {"status": "unavailable", "reason": f"runner cannot be imported: {error}"}
    user.reload()
    client_peak_reset = reset_own_peak_rss()
    progress("worker: starting a worker (model none) and the pipe baseline process")
    started = time.perf_counter()
    worker = runner.Worker(model="none", device=WORKER_DEVICE)
    startup = time.perf_counter() - started
    wait_for_standby(worker)  # its start-up would compete with what is timed
    pipe = PipeWorker(user)
    try:
        record = {"status": "ok", "worker_startup_s": startup,
                  "empty_call": _empty_call(worker, pipe, user, settings, progress),
                  "calls": [_scenario_call(worker, pipe, user, settings, progress, title, build())
                            for title, build in call_scenarios],
                  "tensors": [_tensor_round_trip(worker, pipe, user, settings, progress, nbytes)
                              for nbytes in sorted(settings.transport_repeats)],
                  "result_delivery": [_result_delivery(settings, progress, nbytes)
                                      for nbytes in RESULT_DELIVERY_SIZES]}
        worker_pid = worker.status()["worker_pid"]
        record["memory"] = {
            "method": "VmHWM from /proc (peak resident set)"
                      + ("; the client's count was reset when this phase began" if client_peak_reset
                         else "; the client's count covers the whole run"),
            "client_peak_rss": peak_rss(os.getpid()),
            "worker_peak_rss": peak_rss(worker_pid),
            "pipe_child_peak_rss": peak_rss(pipe.process.pid),
        }
    finally:
        pipe.close()
        worker.close()
    return record


def _empty_call(worker: Any, pipe: PipeWorker, user: UserCode, settings: Settings, progress: Progress) -> dict:
    import capture

    progress("worker: empty call")
    empty = user.helpers.empty
    _, request_bytes = _first_and_repeat(worker, empty)
    contenders = {
        WORKER: lambda: worker.call(empty),
        PIPE: lambda: pipe.call(empty),
        PING: worker.ping,
        ENCODE: lambda: capture.encode_variables({"fn": empty, "args": (), "kwargs": {}}, policy=worker.policy),
    }
    samples = interleaved(contenders, repeats=settings.call_repeats, warmup=3)
    return {"times": {name: summarize(values) for name, values in samples.items()},
            "ratio_to_pipe": paired_ratios(samples[WORKER], samples[PIPE]),
            "ratio_to_ping": paired_ratios(samples[WORKER], samples[PING]),
            "request_bytes": request_bytes, "pipe_payload_bytes": pipe.payload_bytes(empty)}


def _first_and_repeat(worker: Any, fn: Callable, *args: Any) -> tuple[Any, dict]:
    """The call's result, and the bytes the client wrote for it the first time and the
    second (when the worker already holds the call's source segments by digest)."""
    sent, results = [], []
    for _ in range(2):
        before = worker.bytes_sent
        results.append(worker.call(fn, *args))
        sent.append(worker.bytes_sent - before)
    return results[0], {"first": sent[0], "repeat": sent[1]}


def _scenario_call(worker: Any, pipe: PipeWorker, user: UserCode, settings: Settings, progress: Progress,
                   title: str, obj: Any) -> dict:
    progress(f"worker: call with {title}")
    kind_of = user.helpers.kind_of
    expected = kind_of(obj)
    through_worker, request_bytes = _first_and_repeat(worker, kind_of, obj)
    for name, result in ((WORKER, through_worker), (PIPE, pipe.call(kind_of, obj))):
        if result != expected:
            raise WrongResult(f"{name} returned {result!r} for kind_of({title}), expected {expected!r}")
    samples = interleaved({WORKER: lambda: worker.call(kind_of, obj), PIPE: lambda: pipe.call(kind_of, obj)},
                          repeats=settings.call_repeats, warmup=2)
    return {"title": title, "times": {name: summarize(values) for name, values in samples.items()},
            "ratio_to_pipe": paired_ratios(samples[WORKER], samples[PIPE]),
            "request_bytes": request_bytes, "pipe_payload_bytes": pipe.payload_bytes(kind_of, obj)}


def _tensor_round_trip(worker: Any, pipe: PipeWorker, user: UserCode, settings: Settings, progress: Progress,
                       nbytes: int) -> dict:
    import numpy
    import torch

    progress(f"worker: tensor round trip, {nbytes // MIB} MiB")
    echo = user.helpers.echo
    tensor = torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(7))
    for name, call in ((WORKER, worker.call), (PIPE, pipe.call)):
        if not torch.equal(call(echo, tensor), tensor):
            raise WrongResult(f"{name} returned a different tensor for a {nbytes // MIB} MiB echo")
    source = tensor.numpy().view(numpy.uint8)
    reused = numpy.empty_like(source)

    def memcpy_twice() -> None:  # a round trip moves the bytes there and back
        for _ in range(2):
            ctypes.memmove(reused.ctypes.data, source.ctypes.data, source.nbytes)

    memcpy = "memcpy there and back (reused buffer)"
    samples = interleaved({WORKER: lambda: worker.call(echo, tensor), PIPE: lambda: pipe.call(echo, tensor),
                           memcpy: memcpy_twice}, repeats=settings.transport_repeats[nbytes])
    moved = 2 * nbytes
    return {"tensor_bytes": nbytes,
            "times": {name: summarize(values) for name, values in samples.items()},
            "throughput_gbps": {name: moved / summarize(values)["median"] / 1e9 for name, values in samples.items()},
            "ratio_to_pipe": paired_ratios(samples[WORKER], samples[PIPE]),
            "ratio_to_memcpy": paired_ratios(samples[WORKER], samples[memcpy])}



def _result_delivery(settings: Settings, progress: Progress, nbytes: int) -> dict:
    """The two ways a result can reach the client so that the worker cannot change it
    afterwards, from the worker holding the frame to the client holding memory it may use:

    - seal (what the runner does): the worker writes a fresh memfd, seals it read-only and
      passes it; the client maps it copy-on-write (zero-copy, writable, unchangeable);
    - copy: the worker writes a pooled, reused memfd; the client maps it, copies the frame
      into memory of its own and lets go (the pool's pages are already faulted in).

    Both run in this process, without the sockets (the same for both).
    """
    import numpy

    from runner import shm
    from runner.protocol import SharedRef

    progress(f"worker: result delivery, seal vs copy, {nbytes // MIB} MiB")
    frame = memoryview(numpy.random.default_rng(7).integers(0, 255, nbytes, dtype=numpy.uint8)).cast("B")
    writer, pool = shm.SealedWriter(), shm.BufferPool()
    ref = [SharedRef(0, 0, nbytes)]

    def seal() -> memoryview:
        buffer = writer.lease(nbytes)
        buffer.put(frame)
        buffer.finish()
        try:
            return shm.map_result(ref, [os.dup(buffer.fd)])[0]
        finally:
            writer.release(buffer)

    def copy() -> memoryview:
        buffer = pool.lease(nbytes)
        buffer.put(frame)
        memory = shm.RequestMemory()  # a plain shared mapping of a received memfd
        view = memory.views(ref, [os.dup(buffer.fd)])[0]
        try:
            return memoryview(bytearray(view))
        finally:
            del view
            memory.release()
            pool.release(buffer)

    for name, deliver in ((SEAL, seal), (COPY, copy)):
        if deliver() != frame:
            raise WrongResult(f"{name} delivered different bytes for a {nbytes // MIB} MiB result")
    try:
        samples = interleaved({SEAL: seal, COPY: copy}, repeats=settings.transport_repeats.get(nbytes, 5), warmup=2)
    finally:
        pool.close()
    return {"result_bytes": nbytes, "times": {name: summarize(values) for name, values in samples.items()},
            "ratio_seal_to_copy": paired_ratios(samples[SEAL], samples[COPY])}
