"""Job runners (issue 13, docs/SCALE.md): the client paths a runner can use, and Ray.

- Paths: ``Worker.call``, ``Worker.run_frames`` + ``decode_outcome``, and ``encode_call`` +
  ``Worker.run_bytes`` + ``decode_result``, at 1 MiB and 64 MiB, with the copies of the
  tensor's bytes each makes (counted from the code, listed with the times).
- Ray: an empty call, 1 KiB and 64 MiB through ``RayExecutor`` (from the replica's node,
  so straight to its server, and relayed through the actor, ``same_node=False``), against
  a direct ``Worker.call`` and against a plain Ray task carrying the same function with
  cloudpickle by value, interleaved in one run; ratios are round by round.

The Ray cluster is a throwaway one on loopback (no dashboard), started and stopped here.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from typing import Any

from .format import bytes_text, ratio_stats_text, stats_text
from .measure import Progress, interleaved, paired_ratios, summarize
from .settings import MIB, Settings

CALL, FRAMES, BYTES = "Worker.call", "run_frames", "run_bytes"
RAY_EXECUTOR, RAY_RELAYED, DIRECT, RAY_TASK = ("RayExecutor (same node)", "RayExecutor, relayed by the actor",
                                              "Worker.call", "Ray task, cloudpickle by value")
# Copies of a tensor argument's bytes there and of the result's back, as the code makes them.
COPIES = {
    CALL: "2: into the request memfd; the worker writes the sealed result memfd (mapped, not copied, here)",
    FRAMES: "2: as Worker.call; the outcome's large frames are the mapped result memfd",
    BYTES: "5: encode_call joins the bundle; the request memfd; the result memfd; the outcome bytes; "
           "decode_result's tensor (read-only bytes)",
}
_USER_MODULE = "sbx_bench_jobs"
_USER_SOURCE = "def identity(value):\n    return value\n"


def run(settings: Settings, progress: Progress) -> dict:
    """Both sections; a missing Ray (the extra not installed) leaves the Ray section out."""
    directory = tempfile.mkdtemp(prefix="sourcebox-bench-jobs-")
    sys.path.insert(0, directory)
    try:
        with open(os.path.join(directory, f"{_USER_MODULE}.py"), "w") as handle:
            handle.write(_USER_SOURCE)
        user = importlib.import_module(_USER_MODULE)
        started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        results = {"status": "ok", "started_at": started_at, "load_average_at_start": os.getloadavg()[0],
                   "paths": _paths(user, settings, progress)}
        if importlib.util.find_spec("ray") is None:  # the optional extra
            results["ray"] = {"status": "failed", "reason": "ray is not installed: pip install sourcebox[ray]"}
        else:
            results["ray"] = _ray(user, settings, progress)
        return results
    finally:
        sys.path.remove(directory)
        sys.modules.pop(_USER_MODULE, None)
        shutil.rmtree(directory, ignore_errors=True)


def _repeats(settings: Settings, size: int) -> int:
    return settings.transport_repeats.get(size, 3)


def _paths(user: Any, settings: Settings, progress: Progress) -> list[dict]:
    import numpy

    import runner

    entries = []
    with runner.Worker(model="none") as worker:
        for size in (1 * MIB, 64 * MIB):
            progress(f"job-runner paths at {bytes_text(size)}")
            value = numpy.random.default_rng(0).integers(0, 255, size, dtype=numpy.uint8)
            contenders = _path_contenders(worker, user.identity, value)
            for contender in contenders.values():
                if not numpy.array_equal(contender(), value):
                    raise RuntimeError("a job-runner path returned something other than its argument")
            samples = interleaved(contenders, repeats=_repeats(settings, size))
            entries.append({"bytes": size, "times": {name: summarize(s) for name, s in samples.items()},
                            "ratios_to_call": {name: paired_ratios(samples[name], samples[CALL])
                                               for name in (FRAMES, BYTES)}})
    return entries


def _path_contenders(worker: Any, identity: Any, value: Any) -> dict:
    import runner

    def frames():
        bundle = runner.encode_call_frames(identity, (value,), policy=worker.policy)
        return runner.decode_outcome(worker.run_frames(bundle.header, bundle.frames))

    def as_bytes():
        return runner.decode_result(worker.run_bytes(runner.encode_call(identity, (value,), policy=worker.policy)))

    return {CALL: lambda: worker.call(identity, value), FRAMES: frames, BYTES: as_bytes}


def _ray_contenders(pool: Any, relayed: Any, worker: Any, task: Any, identity: Any, value: Any) -> dict:
    import ray

    return {
        RAY_EXECUTOR: lambda: pool.submit(identity, value).result(),
        RAY_RELAYED: lambda: relayed.submit(identity, value).result(),
        DIRECT: lambda: worker.call(identity, value),
        RAY_TASK: lambda: ray.get(task.remote(value)),
    }


def _ray(user: Any, settings: Settings, progress: Progress) -> dict:
    # Read by Ray when it is imported: a one-node cluster on 127.0.0.1 only.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import numpy
    import ray

    import runner
    from runner import ray as sourcebox_ray

    temp = tempfile.mkdtemp(prefix="sbxbench-", dir="/tmp")  # Ray's socket paths must stay short
    progress("Ray: starting a loopback cluster and one replica")
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=temp, namespace="sourcebox-bench", log_to_driver=False)
    try:
        sourcebox_ray.deploy("none", namespace="sourcebox-bench")
        ray.cloudpickle.register_pickle_by_value(user)  # the plain task carries the module's code itself
        task = ray.remote(user.identity)
        entries = []
        with runner.RayExecutor("none", namespace="sourcebox-bench") as pool, \
                runner.RayExecutor("none", namespace="sourcebox-bench", same_node=False) as relayed, \
                runner.Worker(model="none") as worker:
            for label, size in (("empty", None), ("1 KiB", 1024), ("64 MiB", 64 * MIB)):
                progress(f"Ray: {label}")
                value = None if size is None else numpy.random.default_rng(0).integers(0, 255, size, dtype=numpy.uint8)
                contenders = _ray_contenders(pool, relayed, worker, task, user.identity, value)
                for contender in contenders.values():
                    back = contender()
                    if size is not None and not numpy.array_equal(back, value):
                        raise RuntimeError("a Ray contender returned something other than its argument")
                repeats = _repeats(settings, size) if size and size >= MIB else settings.call_repeats
                samples = interleaved(contenders, repeats=repeats)
                entries.append({"label": label, "bytes": size or 0,
                                "times": {name: summarize(s) for name, s in samples.items()},
                                "ratios": {executor: {name: paired_ratios(samples[executor], samples[name])
                                                      for name in (DIRECT, RAY_TASK)}
                                           for executor in (RAY_EXECUTOR, RAY_RELAYED)}})
        sourcebox_ray.undeploy("none", namespace="sourcebox-bench")
        return {"status": "ok", "ray_version": ray.__version__, "entries": entries}
    finally:
        ray.cloudpickle.unregister_pickle_by_value(user)
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def markdown(results: dict | None) -> list[str]:
    """The report's section for ``run``'s results."""
    from .report import _table

    lines = ["## Job runners: frames, bytes and Ray", ""]
    if not results or results.get("status") != "ok":
        return lines + [f"Not measured: {(results or {}).get('reason', 'not run')}", ""]
    lines += [f"Measured from {results['started_at']} (load average {results['load_average_at_start']:.1f} at the "
              "start). Client paths a job runner can use, one `identity` call each (median (min-max); ratio to "
              "`Worker.call` round by round):", ""]
    rows = []
    for entry in results["paths"]:
        for name in (CALL, FRAMES, BYTES):
            ratio = entry["ratios_to_call"].get(name)
            rows.append([bytes_text(entry["bytes"]), f"`{name}`", stats_text(entry["times"][name]),
                         ratio_stats_text(ratio) if ratio else "1x", COPIES[name]])
    lines += _table(["argument", "path", "time", "vs Worker.call", "copies of the tensor's bytes"], rows)
    section = results.get("ray", {})
    if section.get("status") != "ok":
        return lines + [f"Ray: not measured: {section.get('reason', 'not run')}", ""]
    lines += [f"Ray {section['ray_version']}, one replica on a one-node loopback cluster: `RayExecutor` from the "
              "replica's node (straight to its server) and relayed through the actor (`same_node=False`), against "
              "a direct `Worker.call` and a plain Ray task carrying the same function by value (cloudpickle):", ""]
    rows = []
    for entry in section["entries"]:
        times = entry["times"]
        for executor in (RAY_EXECUTOR, RAY_RELAYED):
            rows.append([entry["label"], executor, stats_text(times[executor]), stats_text(times[DIRECT]),
                         stats_text(times[RAY_TASK]), ratio_stats_text(entry["ratios"][executor][DIRECT]),
                         ratio_stats_text(entry["ratios"][executor][RAY_TASK])])
    lines += _table(["argument", "path", "RayExecutor", "Worker.call", "Ray task (by value)",
                     "RayExecutor / Worker.call", "RayExecutor / Ray task"], rows)
    return lines
