"""One benchmark run: every phase, the targets, and the files it writes."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
import traceback
from typing import Any, Callable

from . import goals, hotpath, hygiene, jobrunners, machine, plots, report, serialization, targets, traces, transport
from .measure import Progress
from .settings import Settings
from .usercode import write_and_import

SCHEMA = "sourcebox-bench/1"
BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(BENCHMARKS_DIR, "results")
RESULTS_MD = os.path.join(BENCHMARKS_DIR, "RESULTS.md")
# --quick without --out writes here, never over the committed full-run results.
QUICK_OUT = os.path.join(tempfile.gettempdir(), "sourcebox-bench-quick")
_PHASE_KEYS = ("serialization", "worker", "traces")


def run(settings: Settings, progress: Progress) -> dict:
    """Measure everything ``settings`` asks for; a phase that breaks is recorded, not fatal."""
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results: dict = {"schema": SCHEMA, "mode": "quick" if settings.quick else "full", "started_at": started_at,
                     "machine": machine.describe(), "settings": _jsonable_settings(settings), "failures": []}
    with tempfile.TemporaryDirectory(prefix="sourcebox-bench-user-") as directory:
        user = write_and_import(directory)
        results["serialization"] = _phase(results, "serialization", [],
                                          lambda: serialization.run(user, settings, progress))
        results["failures"] += [record["failure"] for record in results["serialization"] if "failure" in record]
        call_builders = [(scenario.title, scenario.build) for scenario in serialization.scenarios(user, settings)
                         if scenario.kind == "code" or (scenario.kind == "module" and settings.heavy_module)]
        results["worker"] = _phase(results, "worker", {"status": "failed"},
                                   lambda: transport.run(user, settings, progress, call_builders))
        results["traces"] = _phase(results, "traces", {"status": "failed"},
                                   lambda: traces.run(user, settings, progress))
    results["hygiene"] = _phase(results, "hygiene", {"status": "failed"}, lambda: hygiene.run(settings, progress))
    results["jobrunners"] = _phase(results, "jobrunners", {"status": "failed"},
                                   lambda: jobrunners.run(settings, progress))
    results["hot"] = _phase(results, "hot", {"status": "failed"}, lambda: hotpath.run(settings, progress))
    results["duration_s"] = progress.elapsed()
    results["machine"]["load_average_at_end"] = machine.load_average()
    results["targets"] = targets.judge(results)
    results["goals"] = goals.judge(results)
    return results


def _phase(results: dict, name: str, on_failure: Any, measure: Callable[[], Any]) -> Any:
    try:
        return measure()
    except Exception as error:  # recorded and reported: one broken phase must not hide the others
        results["failures"].append(f"{name}: {type(error).__name__}: {error}\n{traceback.format_exc()}")
        if isinstance(on_failure, dict):
            return dict(on_failure, reason=f"{type(error).__name__}: {error}")
        return on_failure


def _jsonable_settings(settings: Settings) -> dict:
    values = dataclasses.asdict(settings)
    for key in ("tensor_repeats", "transport_repeats"):
        values[key] = {str(size): repeats for size, repeats in values[key].items()}
    return values


def validate(results: dict) -> None:
    """Raise ValueError naming the first missing piece of a results document."""
    for key in ("schema", "mode", "machine", "settings", "duration_s", "targets", "failures", *_PHASE_KEYS):
        if key not in results:
            raise ValueError(f"benchmark results lack {key!r}")
    if results["schema"] != SCHEMA:
        raise ValueError(f"benchmark results have schema {results['schema']!r}, expected {SCHEMA!r}")
    for record in results["serialization"]:
        for key in ("key", "title", "kind", "serializers", "ratios"):
            if key not in record:
                raise ValueError(f"serialization record {record.get('key', '?')} lacks {key!r}")
        if "failure" in record:  # possibly incomplete; the failure is listed in results["failures"]
            continue
        for name, entry in record["serializers"].items():
            needed = ("payload_bytes", "zstd_bytes", "dumps", "loads_warm") if entry["status"] == "ok" else ("reason",)
            missing = [key for key in needed if key not in entry]
            if missing:
                raise ValueError(f"{record['key']}/{name} lacks {', '.join(missing)}")
    for phase in ("worker", "traces"):
        if results[phase].get("status") != "ok" and "reason" not in results[phase]:
            raise ValueError(f"the {phase} phase is not ok and gives no reason")
    for target in results["targets"]:
        if target["verdict"] not in (targets.MET, targets.MISSED, targets.NOT_MEASURED):
            raise ValueError(f"target {target['key']} has verdict {target['verdict']!r}")


def write(results: dict, out: str, results_md: str) -> list[str]:
    """latest.json and the plots into ``out``, the report at ``results_md``; returns the paths."""
    validate(results)
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "latest.json")
    with open(json_path, "w") as handle:
        # Insertion order kept: RESULTS.md regenerated from this file lists rows as the run did.
        json.dump(results, handle, indent=1)
        handle.write("\n")
    return [json_path] + write_report(results, out, results_md)


def write_report(results: dict, out: str, results_md: str) -> list[str]:
    """The plots (into ``out``) and the markdown report (at ``results_md``) for ``results``."""
    plot_names = plots.write_all(results, out)
    plot_dir = os.path.relpath(out, os.path.dirname(os.path.abspath(results_md)))
    with open(results_md, "w") as handle:
        handle.write(report.markdown(results, None if plot_dir == "." else plot_dir, plot_names))
    return [os.path.join(out, name) for name in plot_names] + [results_md]
