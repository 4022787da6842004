"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os

from . import baselines, traces, transport

_COLORS = {baselines.PICKLE: "#8c8c8c", baselines.CLOUDPICKLE: "#4c72b0", baselines.CLOUDPICKLE_BY_VALUE: "#dd8452",
           baselines.DILL: "#55a868"}


def write_all(results: dict, directory: str) -> list[str]:
    """Write every plot the results allow into ``directory``; return the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    written = []
    for name in PLOT_NAMES:
        figure = _DRAWERS[name](results)
        if figure is None:
            continue
        figure.savefig(os.path.join(directory, name), dpi=110, bbox_inches="tight")
        pyplot.close(figure)
        written.append(name)
    return written


def _measured(results: dict, kinds: tuple[str, ...]) -> list[dict]:
    return [record for record in results.get("serialization", [])
            if record["kind"] in kinds and record.get("ratios")]


def _grouped_bars(axes, labels: list[str], series: dict[str, list[float | None]]) -> None:
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        positions = [slot + (index - (len(series) - 1) / 2) * width for slot in range(len(labels))]
        shown = [(position, value) for position, value in zip(positions, values) if value is not None]
        if shown:
            axes.bar([p for p, _ in shown], [v for _, v in shown], width, label=name, color=_COLORS.get(name))
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels, rotation=25, ha="right")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_yscale("log")


def _short_title(record: dict) -> str:
    return record["title"].split(" (")[0]


def _size_ratios(results: dict):
    import matplotlib.pyplot as pyplot

    records = _measured(results, ("code", "module"))
    if not records:
        return None
    names = [name for name in baselines.ALL if name != baselines.OURS]
    series = {name: [record["ratios"].get(name, {}).get("size") for record in records] for name in names}
    figure, axes = pyplot.subplots(figsize=(9, 4.5))
    _grouped_bars(axes, [_short_title(record) for record in records], series)
    axes.set_ylabel("sourcebox bytes / baseline bytes (log)")
    axes.set_title("Payload size against each baseline (below 1: sourcebox is smaller)\n"
                   "by-reference baselines are tiny because they ship no code and fail where the module is missing")
    axes.legend(fontsize=8)
    return figure


def _time_ratios(results: dict):
    import matplotlib.pyplot as pyplot

    records = _measured(results, ("code", "module", "tensor"))
    if not records:
        return None
    labels, dumps, warm, cold = [], [], [], []
    for record in records:
        reference = baselines.CLOUDPICKLE_BY_VALUE if record["kind"] != "tensor" else baselines.CLOUDPICKLE
        ratios = record["ratios"].get(reference)
        if not ratios:
            continue
        labels.append(_short_title(record))
        dumps.append(ratios["dumps"]["median"])
        warm.append(ratios["loads_warm"]["median"])
        cold.append(ratios["loads_cold"]["median"] if "loads_cold" in ratios else None)
    figure, axes = pyplot.subplots(figsize=(10, 4.8))
    _grouped_bars(axes, labels, {"dumps": dumps, "warm loads": warm, "cold loads": cold})
    axes.set_ylabel("sourcebox time / cloudpickle time (log)")
    axes.set_title("Time against cloudpickle (by value for code, plain for tensors); below 1: sourcebox is faster")
    axes.legend(fontsize=8)
    return figure


def _throughput(results: dict):
    import matplotlib.pyplot as pyplot

    from .serialization import MEMCPY

    worker = results.get("worker", {})
    tensors = [record for record in _measured(results, ("tensor",)) if record["details"]["dtype"] == "float32"]
    if not tensors and worker.get("status") != "ok":
        return None
    figure, axes = pyplot.subplots(figsize=(8, 4.8))
    if worker.get("status") == "ok" and worker["tensors"]:
        sizes = [entry["tensor_bytes"] / 2**20 for entry in worker["tensors"]]
        for name, style in ((transport.WORKER, "o-"), (transport.PIPE, "s-")):
            axes.plot(sizes, [entry["throughput_gbps"][name] for entry in worker["tensors"]], style,
                      label=f"round trip: {name}")
    if tensors:
        sizes = [record["details"]["tensor_bytes"] / 2**20 for record in tensors]

        def gbps(record: dict, seconds: float) -> float:
            return record["details"]["tensor_bytes"] / seconds / 1e9

        ours = [record["serializers"][baselines.OURS] for record in tensors]
        axes.plot(sizes, [gbps(r, o["dumps"]["median"]) for r, o in zip(tensors, ours)], "^--",
                  label="capture.dumps")
        axes.plot(sizes, [gbps(r, o["loads_warm"]["median"]) for r, o in zip(tensors, ours)], "v--",
                  label="capture.loads")
        theirs = [record["serializers"][baselines.CLOUDPICKLE] for record in tensors]
        axes.plot(sizes, [gbps(r, t["dumps"]["median"]) for r, t in zip(tensors, theirs)], "x:",
                  label="cloudpickle.dumps")
        axes.plot(sizes, [gbps(record, record["references"][MEMCPY]["dumps_round"]["median"])
                          for record in tensors], "k-", linewidth=1, label="memcpy (reused buffer)")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    measured_sizes = sorted({line_x for line in axes.get_lines() for line_x in line.get_xdata()})
    axes.set_xticks(measured_sizes)
    axes.set_xticklabels([f"{size:g}" for size in measured_sizes])
    axes.set_xlabel("tensor size (MiB, float32)")
    axes.set_ylabel("GB/s (log)")
    axes.set_title("Tensor throughput (round trips count the bytes both ways)")
    axes.legend(fontsize=8)
    return figure


def _trace_payloads(results: dict):
    import matplotlib.pyplot as pyplot

    trace_results = results.get("traces", {})
    if trace_results.get("status") != "ok":
        return None
    payloads = trace_results["payloads"]
    layers = [entry["layers"] for entry in payloads]
    figure, axes = pyplot.subplots(figsize=(6.5, 4.2))
    axes.plot(layers, [entry["nnsight_bytes"] for entry in payloads], "s-", label="nnsight 0.8 request")
    axes.plot(layers, [entry["sourcebox_bytes"] for entry in payloads], "o-", label="sourcebox request")
    axes.set_xlabel("model layers (tiny GPT-2)")
    axes.set_ylabel("request bytes")
    axes.set_ylim(bottom=0)
    axes.set_title(f"Trace request size against model depth\n({traces.PROMPT!r}, same body)")
    axes.legend(fontsize=8)
    return figure


_DRAWERS = {"size_ratios.png": _size_ratios, "time_ratios.png": _time_ratios, "throughput.png": _throughput,
            "trace_payloads.png": _trace_payloads}
#: Every plot a full run writes, in the order RESULTS.md shows them.
PLOT_NAMES = tuple(_DRAWERS)
