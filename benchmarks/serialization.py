"""Serialization scenarios: each object through each serializer, sizes and times, interleaved.

For every scenario and serializer: payload bytes, zstd-compressed bytes, dumps time,
warm loads time (repeated loads in this process: capture's compile cache is hot, as on
a long-lived worker) and, for code, cold loads time (the first load in a fresh process
that cannot import the user's modules: by-reference pickles fail there, which is
recorded as such). Every payload is loaded and checked for the right behaviour before
anything is timed, so a number never stands for a broken round trip. Tensor scenarios
also time a plain memcpy of the same bytes in the same rounds, and capture's zero-copy
``encode``/``decode`` pair that the worker transport uses.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Callable

import capture

from . import baselines, coldload
from .measure import Progress, interleaved, paired_ratios, summarize
from .settings import MIB, Settings
from .usercode import UserCode

ZSTD_LEVEL = 3
# The tensor targets' reference: the copy itself, with no allocation in the way.
MEMCPY = "memcpy into a reused buffer"
# The same copy into a new allocation, as any API returning new memory pays it.
FRESH_COPY = "bytes(view): a copy into fresh memory"
ENCODE_FRAMES = "capture.encode (frames, no copy)"
DECODE_FRAMES = "capture.decode (writable frames)"
DECODE_COPY = "capture.decode (read-only frames, one copy)"


@dataclass
class Scenario:
    """An object to ship, how to check that what came back behaves like it, and how hard to try."""

    key: str
    title: str
    kind: str  # "code", "module" or "tensor"
    build: Callable[[], Any]
    check: Callable[[Any, Any], bool]
    repeats: int
    cold: bool
    preload_torch: bool = False
    serializers: tuple[str, ...] = baselines.ALL
    details: dict = field(default_factory=dict)


def scenarios(user: UserCode, settings: Settings) -> list[Scenario]:
    """The scenarios of the issue, built on the generated user code."""
    import torch

    helpers, library = user.helpers, user.library
    values = [0.1, 0.5, 0.9, 1.3, 2.0, -0.7]
    probe_input = torch.linspace(-1, 1, 2000).reshape(2, 1000)
    code_kw = dict(repeats=settings.code_repeats, cold=True)
    found = [
        Scenario("small_function", "small function", "code", lambda: helpers.scale_and_shift,
                 lambda original, loaded: loaded(values, 3.0) == original(values, 3.0), **code_kw),
        Scenario("closure_chain", "closure chain (4 nested closures)", "code",
                 lambda: helpers.make_pipeline(1.5, 2.0, 1.5),
                 lambda original, loaded: loaded(values) == original(values), **code_kw),
        Scenario("instance", "class instance with nested state", "code", lambda: helpers.Experiment("probe", 3),
                 lambda original, loaded: loaded.summary() == original.summary(), **code_kw),
        Scenario("library", f"user module ({library.__name__}.run_all reaching 20 functions, 5 classes)", "code",
                 lambda: library.run_all, lambda original, loaded: loaded(values) == original(values), **code_kw),
        Scenario("module_10m", "nn.Module with 10M parameters", "module", lambda: user.model.build(),
                 lambda original, loaded: type(loaded).__name__ == type(original).__name__
                 and torch.equal(loaded(probe_input), original(probe_input)),
                 repeats=max(3, settings.code_repeats // 3), cold=settings.heavy_module, preload_torch=True),
    ]
    for nbytes, dtype_name in settings.tensor_cases:
        found.append(_tensor_scenario(nbytes, getattr(torch, dtype_name), settings))
    return found


def _tensor_scenario(nbytes: int, dtype: Any, settings: Settings) -> Scenario:
    import torch

    dtype_name = str(dtype).removeprefix("torch.")

    def build() -> Any:
        generator = torch.Generator().manual_seed(nbytes)
        return torch.randn(nbytes // dtype.itemsize, generator=generator).to(dtype)

    def check(original: Any, loaded: Any) -> bool:
        return loaded.dtype == original.dtype and torch.equal(loaded, original)

    # No user code in a tensor: cloudpickle by value is cloudpickle.
    serializers = tuple(name for name in baselines.ALL if name != baselines.CLOUDPICKLE_BY_VALUE)
    return Scenario(f"tensor_{nbytes // MIB}mib_{dtype_name}", f"tensor {nbytes // MIB} MiB {dtype_name}", "tensor",
                    build, check, repeats=settings.tensor_repeats[nbytes], cold=False, serializers=serializers,
                    details={"tensor_bytes": nbytes, "dtype": dtype_name})


def run(user: UserCode, settings: Settings, progress: Progress) -> list[dict]:
    """Measure every scenario; one JSON-ready record each."""
    return [run_scenario(scenario, user, settings, progress) for scenario in scenarios(user, settings)]


def run_scenario(scenario: Scenario, user: UserCode, settings: Settings, progress: Progress) -> dict:
    """Measure one scenario. A baseline that cannot carry the object is recorded as
    unavailable; sourcebox failing to is recorded under ``failure`` (a bug to fix)."""
    progress(f"serialization: {scenario.title}")
    user.reload()
    obj = scenario.build()
    details = dict(scenario.details)
    if scenario.kind == "module":
        details["parameters"] = sum(parameter.numel() for parameter in obj.parameters())
    record = {"key": scenario.key, "title": scenario.title, "kind": scenario.kind, "details": details,
              "serializers": {}, "ratios": {}}
    # Every dumps happens before any loads: loading a by-value cloudpickle payload here
    # rewrites the user's live classes (see UserCode.reload).
    payloads: dict[str, bytes] = {}
    serializers = {name: baselines.make(name, user.modules) for name in scenario.serializers}
    for name, serializer in serializers.items():
        outcome = _dumps_once(serializer, obj)
        if isinstance(outcome, str):
            record["serializers"][name] = {"status": "unavailable", "reason": outcome}
        else:
            payloads[name] = outcome
    if baselines.OURS not in payloads:
        record["failure"] = (f"sourcebox cannot ship the {scenario.title}: "
                             f"{record['serializers'][baselines.OURS]['reason']}")
        progress(f"  {record['failure']}")
        return record
    anatomy = _anatomy(obj, len(payloads[baselines.OURS]))
    dumps = {name: _dumps_of(serializers[name], obj) for name in payloads}
    tensor_dumps, tensor_loads = _tensor_references(obj) if scenario.kind == "tensor" else ({}, {})
    dumps_samples = interleaved({**dumps, **tensor_dumps}, repeats=scenario.repeats)

    usable: dict[str, bytes] = {}
    for name, payload in payloads.items():
        failure = _loads_and_check(serializers[name], payload, obj, scenario.check)
        if failure:
            record["serializers"][name] = {"status": "unavailable", "reason": failure}
        else:
            usable[name] = payload
            record["serializers"][name] = {"status": "ok", "payload_bytes": len(payload),
                                           "zstd_bytes": _zstd_size(payload),
                                           "dumps": summarize(dumps_samples[name])}
    if baselines.OURS not in usable:
        record["failure"] = (f"sourcebox's round trip of the {scenario.title} failed: "
                             f"{record['serializers'][baselines.OURS]['reason']}")
        progress(f"  {record['failure']}")
        return record
    record["serializers"][baselines.OURS]["anatomy"] = anatomy
    loads = {name: _loads_of(serializers[name], payload) for name, payload in usable.items()}
    cache_before = capture.compile_cache_info()
    loads_samples = interleaved({**loads, **tensor_loads}, repeats=scenario.repeats)
    cache_after = capture.compile_cache_info()
    for name in usable:
        record["serializers"][name]["loads_warm"] = summarize(loads_samples[name])
    # Warm loads (warm-up included) should compile nothing: the cache is keyed by content.
    record["serializers"][baselines.OURS]["compile_cache"] = {"hits": cache_after.hits - cache_before.hits,
                                                              "misses": cache_after.misses - cache_before.misses}
    cold_samples = _cold_loads(scenario, usable, settings, progress) if scenario.cold else {}
    for name, outcome in cold_samples.items():
        entry = record["serializers"][name]
        entry["self_contained"] = outcome["ok"]
        if outcome["ok"]:
            entry["loads_cold"] = summarize(outcome["seconds"])
        else:
            entry["cold_error"] = outcome["error"]
    if cold_samples and not cold_samples[baselines.OURS]["ok"]:
        # The bundle must load where the user's modules are missing: that is its purpose.
        record["failure"] = (f"sourcebox's cold load of the {scenario.title} failed: "
                             f"{cold_samples[baselines.OURS]['error']}")

    ours = record["serializers"][baselines.OURS]
    for name in usable:
        if name == baselines.OURS:
            continue
        theirs = record["serializers"][name]
        ratios = {"size": ours["payload_bytes"] / theirs["payload_bytes"],
                  "zstd_size": ours["zstd_bytes"] / theirs["zstd_bytes"],
                  "dumps": paired_ratios(dumps_samples[baselines.OURS], dumps_samples[name]),
                  "loads_warm": paired_ratios(loads_samples[baselines.OURS], loads_samples[name])}
        if "loads_cold" in ours and "loads_cold" in theirs:
            ratios["loads_cold"] = paired_ratios(cold_samples[baselines.OURS]["seconds"],
                                                 cold_samples[name]["seconds"])
        record["ratios"][name] = ratios
    if scenario.kind == "tensor":
        record["references"] = {
            name: {"dumps_round": summarize(dumps_samples[name]), "loads_round": summarize(loads_samples[name])}
            for name in (MEMCPY, FRESH_COPY)}
        record["zero_copy"] = {"encode": summarize(dumps_samples[ENCODE_FRAMES]),
                               "decode": summarize(loads_samples[DECODE_FRAMES]),
                               "decode_read_only": summarize(loads_samples[DECODE_COPY])}
        record["ratios_to_memcpy"] = {
            reference: {"dumps": paired_ratios(dumps_samples[baselines.OURS], dumps_samples[reference]),
                        "loads": paired_ratios(loads_samples[baselines.OURS], loads_samples[reference])}
            for reference in (MEMCPY, FRESH_COPY)}
    progress(f"  {scenario.title}: {_one_line(record)}")
    return record


def _dumps_once(serializer: baselines.Serializer, obj: Any) -> bytes | str:
    """The payload, or why this serializer cannot carry ``obj`` (a reason, not an exception)."""
    try:
        return serializer.dumps(obj)
    except Exception as error:  # e.g. pickle refusing a closure: the baseline is unavailable here
        return f"dumps failed: {type(error).__name__}: {_short(error)}"


def _loads_and_check(serializer: baselines.Serializer, payload: bytes, original: Any,
                     check: Callable[[Any, Any], bool]) -> str | None:
    """Why the payload does not load into something behaving like ``original``, or None."""
    try:
        loaded = serializer.loads(payload)
    except Exception as error:
        return f"loads failed: {type(error).__name__}: {_short(error)}"
    if not check(original, loaded):
        return "the loaded object does not behave like the original"
    return None


def _dumps_of(serializer: baselines.Serializer, obj: Any) -> Callable[[], Any]:
    return lambda: serializer.dumps(obj)


def _loads_of(serializer: baselines.Serializer, payload: bytes) -> Callable[[], Any]:
    return lambda: serializer.loads(payload)


def _cold_loads(scenario: Scenario, usable: dict, settings: Settings, progress: Progress) -> dict:
    """Cold loads, interleaved across serializers; a serializer that fails once is not retried."""
    outcomes: dict[str, dict] = {name: {"ok": True, "seconds": []} for name in usable}
    names = list(usable)
    for round_index in range(settings.cold_repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if not outcomes[name]["ok"]:
                continue
            result = coldload.measure(name, usable[name], preload_torch=scenario.preload_torch)
            if result["ok"]:
                outcomes[name]["seconds"].append(result["seconds"])
            else:
                outcomes[name] = {"ok": False, "error": result["error"]}
    progress(f"  {scenario.title}: cold loads done ({settings.cold_repeats} fresh process(es) per serializer)")
    return outcomes


def _byte_view(tensor: Any) -> memoryview:
    import torch

    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


def _tensor_references(tensor: Any) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[], Any]]]:
    """Contenders for the dumps and the loads rounds: plain copies of the tensor's bytes, and
    capture's frame-level path (zero-copy from writable frames, one copy from read-only ones)."""
    import numpy

    view = _byte_view(tensor)
    source = numpy.frombuffer(view, dtype=numpy.uint8)
    reused = numpy.empty_like(source)
    bundle = capture.encode(tensor)
    writable_frames = [memoryview(bytearray(frame)) for frame in bundle.frames]
    read_only_frames = [memoryview(bytes(frame)) for frame in bundle.frames]

    def memcpy() -> Any:
        ctypes.memmove(reused.ctypes.data, source.ctypes.data, source.nbytes)
        return reused

    copies = {MEMCPY: memcpy, FRESH_COPY: lambda: bytes(view)}
    return ({**copies, ENCODE_FRAMES: lambda: capture.encode(tensor)},
            {**copies, DECODE_FRAMES: lambda: capture.decode(bundle.header, writable_frames),
             DECODE_COPY: lambda: capture.decode(bundle.header, read_only_frames)})


def _anatomy(obj: Any, payload_bytes: int) -> dict:
    """Where a bundle's bytes go: msgpack header (and the source text in it), raw frames,
    alignment padding. The header is read as docs/FORMAT.md describes it."""
    import msgpack

    bundle = capture.encode(obj)
    frame_bytes = sum(memoryview(frame).nbytes for frame in bundle.frames)
    # Node references are msgpack extension values; their content does not matter here.
    header = msgpack.unpackb(bundle.header, raw=False, strict_map_key=False, ext_hook=lambda code, data: None)
    texts = [segment.get("text", "") for segment in header["sources"]]
    return {"header_bytes": len(bundle.header), "nodes": len(header["nodes"]), "source_segments": len(texts),
            "source_text_bytes": sum(len(text.encode()) for text in texts), "frames": len(bundle.frames),
            "frame_bytes": frame_bytes, "padding_bytes": payload_bytes - len(bundle.header) - frame_bytes}


def _zstd_size(payload: bytes) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(payload))


def _short(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(record: dict) -> str:
    ours = record["serializers"][baselines.OURS]
    parts = [f"{ours['payload_bytes']:,} B"]
    reference = record["ratios"].get(baselines.CLOUDPICKLE_BY_VALUE) or record["ratios"].get(baselines.CLOUDPICKLE)
    if reference:
        parts.append(f"size x{reference['size']:.2f}, dumps x{reference['dumps']['median']:.2f}, "
                     f"warm loads x{reference['loads_warm']['median']:.2f} vs cloudpickle")
    return "; ".join(parts)
