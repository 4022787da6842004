"""The issue's targets, judged from the measured numbers, with the reasons for any miss.

Each target yields a verdict (met, missed, or not measured) and analysis sentences. The
sentences are chosen by what the measurements show (which component dominates, what a
reference path costs on this machine), so a rerun on other hardware, or after a fix,
explains itself; nothing here is a fixed verdict.
"""
from __future__ import annotations

from . import baselines
from .format import bytes_text, ratio_text, time_text
from .serialization import FRESH_COPY, MEMCPY
from .transport import ENCODE, PING, PIPE, WORKER

MET, MISSED, NOT_MEASURED = "met", "missed", "not measured"
# "Constant in model depth": the 12-layer request may differ by the longer model name.
_DEPTH_TOLERANCE = 0.01
_TENSOR_MEMCPY_LIMIT = 1.5
_CLOUDPICKLE_SPEEDUP = 20.0
_TARGET_TENSOR_BYTES = 64 << 20
_EMPTY_CALL_LIMIT_S = 1e-3


def judge(results: dict) -> list[dict]:
    """All targets, in the issue's order."""
    return [_code_payloads(results), _trace_depth(results), _tensor_memcpy(results),
            _tensor_cloudpickle(results), _warm_loads(results), _empty_call(results)]


def _target(key: str, text: str, verdict: str, measured: str, analysis: list[str]) -> dict:
    return {"key": key, "target": text, "verdict": verdict, "measured": measured, "analysis": analysis}


def _ok(entry: dict | None) -> bool:
    return bool(entry) and entry.get("status") == "ok"


def _records(results: dict, kind: str) -> list[dict]:
    return [record for record in results.get("serialization", [])
            if record["kind"] == kind and _ok(record["serializers"].get(baselines.OURS))
            and "loads_warm" in record["serializers"][baselines.OURS]]


def _code_payloads(results: dict) -> dict:
    text = "Code payloads no larger than cloudpickle-by-value"
    rows = [record for record in _records(results, "code") + _records(results, "module")
            if baselines.CLOUDPICKLE_BY_VALUE in record["ratios"]]
    if not rows:
        return _target("code_payloads", text, NOT_MEASURED, "no code scenario ran", [])
    measured = ", ".join(f"{record['title']} {ratio_text(record['ratios'][baselines.CLOUDPICKLE_BY_VALUE]['size'])}"
                         for record in rows)
    analysis = []
    for record in rows:
        ratios = record["ratios"][baselines.CLOUDPICKLE_BY_VALUE]
        if ratios["size"] <= 1.0:
            continue
        ours = record["serializers"][baselines.OURS]
        theirs = record["serializers"][baselines.CLOUDPICKLE_BY_VALUE]
        excess = ours["payload_bytes"] - theirs["payload_bytes"]
        anatomy = ours["anatomy"]
        sentence = f"{record['title']}: {bytes_text(excess)} larger ({ratio_text(ratios['size'])})."
        if anatomy["frame_bytes"]:
            their_structure = theirs["payload_bytes"] - anatomy["frame_bytes"]
            sentence += (f" The tensor bytes are the same on both sides ({bytes_text(anatomy['frame_bytes'])} in "
                         f"{anatomy['frames']} frames); the difference is the description around them: a "
                         f"{bytes_text(anatomy['header_bytes'])} msgpack header ({anatomy['nodes']} value nodes) plus "
                         f"{bytes_text(anatomy['padding_bytes'])} of frame alignment, against "
                         f"{bytes_text(their_structure)} of pickle opcodes for the same module tree (every "
                         "submodule's state dicts and hook tables). A more compact encoding of the tree's many "
                         "small, repeated containers would close it.")
        else:
            source_text = anatomy["source_text_bytes"]
            if source_text >= 0.5 * anatomy["header_bytes"]:
                sentence += (f" {bytes_text(source_text)} of it is the source text of {anatomy['source_segments']} "
                             "definitions, docstrings and comments included (bytecode drops them; tracebacks and "
                             "inspect.getsource on the worker need them).")
            else:
                sentence += (f" Only {bytes_text(source_text)} of the {bytes_text(anatomy['header_bytes'])} "
                             f"header is source text; the rest describes {anatomy['nodes']} value nodes and the "
                             "definitions' origins.")
            if ratios["zstd_size"] <= 1.0:
                sentence += (f" Compressed with zstd it is smaller ({ratio_text(ratios['zstd_size'])}): compressing "
                             "bundles on the wire would close it.")
            else:
                sentence += (f" Compressed it is still larger ({ratio_text(ratios['zstd_size'])}); one origin record "
                             "per file instead of per definition, and shorter node tags, would close it.")
        analysis.append(sentence)
    verdict = MISSED if analysis else MET
    return _target("code_payloads", text, verdict, measured, analysis)


def _trace_depth(results: dict) -> dict:
    text = "Trace payloads constant in model depth"
    traces = results.get("traces", {})
    if not _ok(traces):
        return _target("trace_depth", text, NOT_MEASURED, traces.get("reason", "the trace phase did not run"), [])
    growth = traces["depth_growth"]
    low, high = growth["layers"]
    first, last = traces["payloads"][0], traces["payloads"][-1]
    measured = (f"sourcebox {bytes_text(first['sourcebox_bytes'])} at {low} layers, "
                f"{bytes_text(last['sourcebox_bytes'])} at {high} ({growth['sourcebox_bytes_added']:+,} B, "
                f"{ratio_text(growth['sourcebox'])}); nnsight "
                f"{bytes_text(first['nnsight_bytes'])} -> {bytes_text(last['nnsight_bytes'])} "
                f"({ratio_text(growth['nnsight'])})")
    constant = abs(growth["sourcebox"] - 1.0) <= _DEPTH_TOLERANCE
    analysis = []
    if constant and growth["sourcebox_bytes_added"]:
        analysis.append(f"The {growth['sourcebox_bytes_added']:+,} B are the model's name in the request "
                        f"('{last['spec']}' against '{first['spec']}'); nothing depth-dependent travels.")
    if growth["nnsight"] > 1.0 + _DEPTH_TOLERANCE:
        analysis.append("nnsight's own request grows with depth because its pickled tracer carries the model's "
                        "envoy tree by value; sourcebox sends the model's identity and the block's variables only.")
    if not constant:
        analysis.insert(0, f"The sourcebox request grows by {growth['sourcebox_bytes_added']:,} B from {low} to {high} "
                           "layers, so something depth-dependent travels with it; `python -m capture inspect` on the "
                           "request shows which variable; it should travel as a model token instead.")
    return _target("trace_depth", text, MET if constant else MISSED, measured, analysis)


def _tensor_memcpy(results: dict) -> dict:
    text = f"Tensor dumps/loads within {_TENSOR_MEMCPY_LIMIT:g}x of a plain memcpy of the same bytes"
    rows = _records(results, "tensor")
    if not rows:
        return _target("tensor_memcpy", text, NOT_MEASURED, "no tensor scenario ran", [])
    parts, analysis, dumps_misses, loads_misses = [], [], [], []
    for record in rows:
        to_memcpy = record["ratios_to_memcpy"][MEMCPY]
        dumps_ratio, loads_ratio = to_memcpy["dumps"]["median"], to_memcpy["loads"]["median"]
        parts.append(f"{record['title']}: dumps {ratio_text(dumps_ratio)}, loads {ratio_text(loads_ratio)}")
        if dumps_ratio > _TENSOR_MEMCPY_LIMIT:
            dumps_misses.append(record)
        if loads_ratio > _TENSOR_MEMCPY_LIMIT:
            loads_misses.append(record)
    if dumps_misses:
        analysis.append(_dumps_miss(dumps_misses))
    if loads_misses:
        analysis.append(_loads_miss(loads_misses))
    verdict = MISSED if analysis else MET
    return _target("tensor_memcpy", text, verdict, "; ".join(parts), analysis)


def _largest(records: list[dict]) -> dict:
    return max(records, key=lambda record: record["details"]["tensor_bytes"])


def _reference(record: dict, name: str, round_name: str) -> float:
    return record["references"][name][round_name]["median"]


def _dumps_miss(records: list[dict]) -> str:
    record = _largest(records)
    ours = record["serializers"][baselines.OURS]["dumps"]["median"]
    memcpy, fresh = _reference(record, MEMCPY, "dumps_round"), _reference(record, FRESH_COPY, "dumps_round")
    encode = record["zero_copy"]["encode"]["median"]
    names = ", ".join(r["title"] for r in records)
    sentence = (f"dumps misses for {names}. At {record['title']}: dumps {time_text(ours)}, memcpy "
                f"{time_text(memcpy)}, the same copy into fresh memory (`bytes(view)`) {time_text(fresh)}.")
    if ours <= 1.25 * fresh:
        sentence += (" dumps costs what its return value costs: a new buffer whose pages fault in as they are first "
                     "written, which a memcpy into a reused buffer does not pay. The bundle's own work is small: "
                     f"`capture.encode` hands out the frames without a copy in {time_text(encode)}, and that is the "
                     "path the worker transport uses (into reused shared memory). A dumps that writes into a "
                     "caller-provided, reused buffer would close the gap.")
    else:
        sentence += (" dumps costs more than one copy into fresh memory, so it copies the tensor more than once; "
                     "writing the header and frames in one pass into one preallocated buffer would close it.")
    return sentence


def _loads_miss(records: list[dict]) -> str:
    record = _largest(records)
    ours = record["serializers"][baselines.OURS]["loads_warm"]["median"]
    memcpy, fresh = _reference(record, MEMCPY, "loads_round"), _reference(record, FRESH_COPY, "loads_round")
    one_copy = record["zero_copy"]["decode_read_only"]["median"]
    zero_copy = record["zero_copy"]["decode"]["median"]
    names = ", ".join(r["title"] for r in records)
    sentence = (f"loads misses for {names}. At {record['title']}: loads {time_text(ours)}, memcpy {time_text(memcpy)}, "
                f"a copy into fresh memory {time_text(fresh)}; decoding the same header and frames from read-only "
                f"buffers (one copy) takes {time_text(one_copy)}")
    parse = ours - one_copy
    if parse >= 0.5 * memcpy:
        sentence += (f", so {time_text(parse)} of loads go to locating the frames in the single buffer before any "
                     "tensor is built: the header parser is fed the whole buffer, frames included, and msgpack's "
                     "Unpacker copies what it is fed. Parsing only the header's bytes would bring loads to one copy.")
    else:
        sentence += ": loads costs its one copy, which it must make because its input is a read-only `bytes`."
    if one_copy > _TENSOR_MEMCPY_LIMIT * fresh:
        sentence += (f" That one copy ({time_text(one_copy)}) is itself slower than a plain copy into fresh memory "
                     f"({time_text(fresh)}): it is torch's clone, which runs on torch's thread pool and waits for "
                     "a busy core when other work competes; a plain memcpy into the new tensor's storage would "
                     "match the reference.")
    if fresh > _TENSOR_MEMCPY_LIMIT * memcpy:
        sentence += (f" On this machine any copy into fresh memory is {ratio_text(fresh / memcpy)} a reused-buffer "
                     "memcpy, so a loads that returns new tensor memory cannot meet the target.")
    sentence += (" From writable frames (shared memory, as the worker receives them) decode is zero-copy: "
                 f"{time_text(zero_copy)}.")
    return sentence


def _tensor_cloudpickle(results: dict) -> dict:
    text = f"Tensors at least {_CLOUDPICKLE_SPEEDUP:g}x faster than cloudpickle for 64 MiB"
    rows = [record for record in _records(results, "tensor")
            if record["details"]["tensor_bytes"] == _TARGET_TENSOR_BYTES and baselines.CLOUDPICKLE in record["ratios"]]
    if not rows:
        return _target("tensor_cloudpickle", text, NOT_MEASURED, "no 64 MiB tensor scenario ran", [])
    parts, analysis = [], []
    for record in rows:
        ratios = record["ratios"][baselines.CLOUDPICKLE]
        dumps_speedup, loads_speedup = 1 / ratios["dumps"]["median"], 1 / ratios["loads_warm"]["median"]
        parts.append(f"{record['title']}: dumps {dumps_speedup:.1f}x, loads {loads_speedup:.1f}x faster")
        if min(dumps_speedup, loads_speedup) >= _CLOUDPICKLE_SPEEDUP:
            continue
        theirs = record["serializers"][baselines.CLOUDPICKLE]
        fresh = _reference(record, FRESH_COPY, "dumps_round")
        ceiling = min(theirs["dumps"]["median"], theirs["loads_warm"]["median"]) / fresh
        encode, decode = record["zero_copy"]["encode"]["median"], record["zero_copy"]["decode"]["median"]
        sentence = (f"{record['title']}: cloudpickle takes {time_text(theirs['dumps']['median'])} to dump and "
                    f"{time_text(theirs['loads_warm']['median'])} to load, only {ceiling:.1f}x one copy of the bytes "
                    f"into fresh memory ({time_text(fresh)}) on this machine; an API that returns new memory makes "
                    f"at least that copy, so dumps/loads can be at most about {ceiling:.0f}x faster.")
        if ceiling < _CLOUDPICKLE_SPEEDUP:
            sentence += (f" {_CLOUDPICKLE_SPEEDUP:g}x needs a path without the copy: capture's encode/decode over "
                         f"frames ({time_text(encode)} + {time_text(decode)} from writable memory), which is how the "
                         "worker moves tensors through shared memory.")
        else:
            sentence += " Removing the extra copies in dumps/loads (see the memcpy target) would reach it."
        analysis.append(sentence)
    verdict = MISSED if analysis else MET
    return _target("tensor_cloudpickle", text, verdict, "; ".join(parts), analysis)


def _warm_loads(results: dict) -> dict:
    text = "Warm loads no slower than cloudpickle loads of the same code"
    rows = [record for record in _records(results, "code") if baselines.CLOUDPICKLE_BY_VALUE in record["ratios"]]
    if not rows:
        return _target("warm_loads", text, NOT_MEASURED, "no code scenario ran", [])
    measured = ", ".join(
        f"{record['title']} {ratio_text(record['ratios'][baselines.CLOUDPICKLE_BY_VALUE]['loads_warm']['median'])}"
        for record in rows)
    slow = [record for record in rows if record["ratios"][baselines.CLOUDPICKLE_BY_VALUE]["loads_warm"]["median"] > 1.0]
    analysis = []
    if slow:
        hits = sum(record["serializers"][baselines.OURS]["compile_cache"]["hits"] for record in slow)
        misses = sum(record["serializers"][baselines.OURS]["compile_cache"]["misses"] for record in slow)
        worst = max(slow, key=lambda record: record["ratios"][baselines.CLOUDPICKLE_BY_VALUE]["loads_warm"]["median"])
        ours = worst["serializers"][baselines.OURS]["loads_warm"]["median"]
        theirs = worst["serializers"][baselines.CLOUDPICKLE_BY_VALUE]["loads_warm"]["median"]
        sentence = (f"Slower for {', '.join(record['title'] for record in slow)}; worst: {worst['title']}, "
                    f"{time_text(ours)} against {time_text(theirs)}.")
        if misses == 0 and hits:
            sentence += (f" Every load hit the compile cache ({hits:,} hits, no misses while timing), so compiling is "
                         "not the cost: it is the pure-Python rebuild of the object graph (validating each node, "
                         "building functions, classes and fresh namespaces) against cloudpickle's C unpickler "
                         "re-creating functions from marshalled code. Caching the validated node plan per bundle "
                         "digest, so a repeat load only instantiates, or moving the node builder to C, would close it.")
        else:
            sentence += (f" The compile cache missed {misses:,} times while timing ({hits:,} hits): warm loads still "
                         "compile, so the cache key is not the content alone; keying it by the source digest "
                         "would close it.")
        analysis.append(sentence)
    return _target("warm_loads", text, MISSED if slow else MET, measured, analysis)


def _empty_call(results: dict) -> dict:
    text = "Request overhead of an empty call through the worker under 1 ms"
    worker = results.get("worker", {})
    if not _ok(worker):
        return _target("empty_call", text, NOT_MEASURED, worker.get("reason", "the worker phase did not run"), [])
    times = worker["empty_call"]["times"]
    call, pipe = times[WORKER]["median"], times[PIPE]["median"]
    ping, encode = times[PING]["median"], times[ENCODE]["median"]
    measured = (f"{time_text(call)} median (min {time_text(times[WORKER]['min'])}); a cloudpickle call over a Pipe "
                f"{time_text(pipe)}")
    rest = max(call - ping - encode, 0.0)
    breakdown = (f"Of the {time_text(call)}: the client<->server round trip alone (worker.ping) {time_text(ping)}, "
                 f"encoding the call {time_text(encode)}, and {time_text(rest)} for the second hop to the sandboxed "
                 "worker process, decoding and running there, and the reply.")
    analysis = [breakdown]
    met = call < _EMPTY_CALL_LIMIT_S
    if not met:
        remedies = {
            "the client<->server round trip": (
                ping, "one socket round trip to the supervisor, with no worker and no bundle involved, costs this "
                      "much here (thread wake-ups on a busy CPU); fewer thread hand-offs per request on the client "
                      "(its reader thread passes each reply through a Future) would close it"),
            "encoding the call": (
                encode, "encoding an empty call should take microseconds; caching the encoded function per "
                        "function object would close it"),
            "the worker hop": (
                rest, "the supervisor forwards each request to the worker process and the reply back, a second "
                      "round trip; letting clients reach the worker directly once a request is scheduled (the "
                      "supervisor keeping the control channel) would remove it"),
        }
        largest = max(remedies, key=lambda part: remedies[part][0])
        analysis.append(f"The largest part is {largest}: {remedies[largest][1]}.")
    return _target("empty_call", text, MET if met else MISSED, measured, analysis)
