"""Issue 15's targets: one row per target, its measured value, its limit and a verdict,
all computed from one run's results (``latest.json``), never written by hand.

A row is one registration: a function that reads the results and returns its readings
(or raises ``NotMeasured`` with the reason), decorated with ``@row(key, target, limit, unit)``.
The verdict is PASS when every reading is at most the limit, MISS otherwise; a row whose
limit is ``None`` reports without a verdict. New measurements (a phase of their own in
``benchmarks/``) add a row here and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import baselines
from .format import bytes_text, ratio_text, time_text

PASS, MISS, REPORT, NOT_MEASURED = "PASS", "MISS", "report", "not measured"
_UNITS: dict[str, Callable[[float], str]] = {
    "x": ratio_text, "s": time_text, "B": lambda value: bytes_text(int(value)),
}


@dataclass(frozen=True)
class Reading:
    """One measured value of a row; ``label`` names it when a row has several (a scenario)."""

    value: float
    label: str = ""
    detail: str = ""


class NotMeasured(Exception):
    """Raised by a row's reader when the run lacks what the row needs; the row says why."""

    @property
    def reason(self) -> str:
        return str(self)


@dataclass(frozen=True)
class _Row:
    key: str
    target: str
    limit: float | None
    unit: str
    read: Callable[[dict], "list[Reading]"]


ROWS: list[_Row] = []


def row(key: str, target: str, limit: float | None, unit: str = "x"):
    """Register ``read(results)`` as the row ``key``; rows appear in registration order."""
    if unit not in _UNITS:
        raise ValueError(f"unit {unit!r} is not one of {sorted(_UNITS)}")

    def register(read: Callable[[dict], "list[Reading]"]):
        ROWS.append(_Row(key, target, limit, unit, read))
        return read
    return register


def judge(results: dict) -> list[dict]:
    """Every row of ``results``: key, target, limit, readings, verdict (and a reason when not measured)."""
    judged = []
    for entry in ROWS:
        limit_text = "report only" if entry.limit is None else f"<= {_UNITS[entry.unit](entry.limit)}"
        try:
            outcome = entry.read(results)
            if not outcome:
                raise NotMeasured("no readings")
        except NotMeasured as missing:
            judged.append({"key": entry.key, "target": entry.target, "limit": limit_text, "verdict": NOT_MEASURED,
                           "measured": missing.reason, "readings": []})
            continue
        if entry.limit is None:
            verdict = REPORT
        else:
            verdict = PASS if all(reading.value <= entry.limit for reading in outcome) else MISS
        measured = "; ".join(
            (f"{reading.label} " if reading.label else "") + _UNITS[entry.unit](reading.value)
            + (f" ({reading.detail})" if reading.detail else "") for reading in outcome)
        judged.append({"key": entry.key, "target": entry.target, "limit": limit_text, "verdict": verdict,
                       "measured": measured,
                       "readings": [{"label": r.label, "value": r.value, "detail": r.detail} for r in outcome]})
    return judged


def markdown(results: dict) -> list[str]:
    """The targets table of RESULTS.md."""
    lines = ["## Targets of issue 15 (the request path)", "",
             "Each value is a ratio (or a time, or bytes) from this run; the verdict is computed from it.", "",
             "| target | measured | limit | verdict |", "|---|---|---|---|"]
    for entry in judge(results):
        verdict = {MISS: "**MISS**"}.get(entry["verdict"], entry["verdict"])
        lines.append(f"| {entry['target']} | {entry['measured']} | {entry['limit']} | {verdict} |")
    return lines + [""]


def terminal(results: dict) -> list[str]:
    return [f"  [{entry['verdict']:^12}] {entry['target']} ({entry['limit']}): {entry['measured']}"
            for entry in judge(results)]


# -- the rows ---------------------------------------------------------------------------

def _phase(results: dict, name: str) -> dict:
    phase = results.get(name, {})
    if phase.get("status") != "ok":
        raise NotMeasured(phase.get("reason", f"the {name} phase did not run"))
    return phase


def _trace_latency(results: dict) -> dict:
    smallest = min(_phase(results, "traces")["latency"], key=lambda entry: entry["layers"], default=None)
    if smallest is None:
        raise NotMeasured("no trace went through a worker")
    return smallest


@row("empty_call", "Empty call through the worker / client-server ping (same run)", 2.5)
def _empty_call(results: dict) -> list[Reading]:
    worker = _phase(results, "worker")
    empty = worker["empty_call"]
    if "ratio_to_ping" not in empty:
        raise NotMeasured("this run did not pair the empty call with worker.ping")
    times = empty["times"]
    call = next(name for name in times if name.startswith("sourcebox"))
    ping = next(name for name in times if name.startswith("worker.ping"))
    return [Reading(empty["ratio_to_ping"]["median"],
                    detail=f"call {time_text(times[call]['median'])}, ping {time_text(times[ping]['median'])}")]


@row("trace_vs_nnsight", "Trace through the worker / nnsight's in-process remote='local'", 0.6)
def _trace_vs_nnsight(results: dict) -> list[Reading]:
    latency = _trace_latency(results)
    return [Reading(latency["worker_to_nnsight_local"]["median"], label=latency["spec"])]


@row("trace_vs_local", "Trace through the worker / a local trace", 1.3)
def _trace_vs_local(results: dict) -> list[Reading]:
    latency = _trace_latency(results)
    return [Reading(latency["worker_to_local"]["median"], label=latency["spec"])]


def _code_ratios(results: dict, measure: str) -> list[Reading]:
    readings = []
    for record in results.get("serialization", []):
        ratios = record.get("ratios", {}).get(baselines.CLOUDPICKLE_BY_VALUE, {})
        if record["kind"] == "code" and measure in ratios:
            readings.append(Reading(ratios[measure]["median"], label=record["title"]))
    if not readings:
        raise NotMeasured(f"no code scenario has {measure} against cloudpickle-by-value")
    return readings


@row("warm_loads", "Warm loads / cloudpickle-by-value, each code scenario", 1.0)
def _warm_loads(results: dict) -> list[Reading]:
    return _code_ratios(results, "loads_warm")


@row("repeated_trace_bytes", "Bytes the client sends for a repeated identical trace", 400, unit="B")
def _repeated_trace_bytes(results: dict) -> list[Reading]:
    latency = _trace_latency(results)
    sent = latency["request_bytes"]
    return [Reading(sent["repeat"], label=latency["spec"], detail=f"first {sent['first']:,} B")]


@row("start", "Worker ready / (import floor of torch, transformers, nnsight + model load)", 1.2)
def _start(results: dict) -> list[Reading]:
    hot = _phase(results, "hot")
    start = hot["start"]
    return [Reading(start["ratio"]["median"], label=start["spec"],
                    detail=f"ready {time_text(start['times']['ready']['median'])}, floor "
                           f"{time_text(start['times']['floor']['median'])}")]


@row("restart", "Next call served after a worker crash (tiny model)", 1.5, unit="s")
def _restart(results: dict) -> list[Reading]:
    hot = _phase(results, "hot")
    restart = hot["restart"]
    return [Reading(restart["times"]["median"], label=restart["spec"],
                    detail=f"max {time_text(restart['times']['max'])} over {restart['times']['n']} crashes; "
                           f"{restart['failed_calls']} call(s) failed with WorkerCrashed first")]


@row("zero_copy_argument", "64 MiB argument allocated in transport memory / empty call", 2.0)
def _zero_copy(results: dict) -> list[Reading]:
    hot = _phase(results, "hot")
    zero_copy = hot["zero_copy"]
    return [Reading(zero_copy["ratio_to_empty"]["median"],
                    detail=f"{time_text(zero_copy['times']['in_place']['median'])} against "
                           f"{time_text(zero_copy['times']['empty']['median'])}; copied argument "
                           f"{time_text(zero_copy['times']['copied']['median'])}")]


@row("cold_loads", "Cold loads / cloudpickle-by-value (a fresh process meets the code)", None)
def _cold_loads(results: dict) -> list[Reading]:
    return _code_ratios(results, "loads_cold")
