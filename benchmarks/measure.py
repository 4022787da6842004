"""Timing that holds on a noisy two-core machine: warm-ups, interleaved contenders, medians.

Contenders measured against each other run in rounds (A, B, C, A, B, C, ...), with the
order rotated each round so no contender always runs right after the same neighbour.
Fast operations are timed in batches long enough for the clock; a sample is the batch
time divided by its length. Ratios are computed round by round from samples taken
seconds apart, so a slow spell of the machine hits both sides of a ratio alike.
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from typing import Any, Callable

# A timed batch should last at least this long, so timer resolution and call overhead vanish.
_MIN_BATCH_SECONDS = 0.002
_MAX_BATCH = 10_000


class WrongResult(RuntimeError):
    """A contender returned something other than the reference result: its timing would lie."""


def summarize(samples: list[float]) -> dict:
    """Median, min, max and count of ``samples`` (seconds or ratios)."""
    if not samples:
        raise ValueError("summarize needs at least one sample; a contender that never ran has no statistics")
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def batch_size(operation: Callable[[], Any], single_call_seconds: float | None = None) -> int:
    """How many calls of ``operation`` fill one timed batch. ``single_call_seconds``, when
    known (a timed warm-up call), saves calling a slow operation once more just to learn it."""
    if single_call_seconds is not None and single_call_seconds >= _MIN_BATCH_SECONDS:
        return 1
    count = 1
    while True:
        start = time.perf_counter()
        for _ in range(count):
            operation()
        elapsed = time.perf_counter() - start
        if elapsed >= _MIN_BATCH_SECONDS or count >= _MAX_BATCH:
            return count
        count = min(_MAX_BATCH, max(count * 2, int(count * _MIN_BATCH_SECONDS / max(elapsed, 1e-9)) + 1))


def time_batch(operation: Callable[[], Any], count: int) -> float:
    """Seconds per call of ``operation``, over ``count`` calls with the collector paused."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(count):
            operation()
        return (time.perf_counter() - start) / count
    finally:
        if gc_was_enabled:
            gc.enable()


def interleaved(contenders: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each contender ``repeats`` times in rotated rounds; seconds per call, per round.

    Each contender first runs ``warmup`` times outside the samples (caches, lazy imports,
    page faults of reused buffers). Round ``r`` of every contender is taken in the same
    stretch of time, which is what `paired_ratios` relies on.
    """
    names = list(contenders)
    last_warmup: dict[str, float | None] = {name: None for name in names}
    for name in names:
        for _ in range(warmup):
            start = time.perf_counter()
            contenders[name]()
            last_warmup[name] = time.perf_counter() - start
    counts = {name: batch_size(contenders[name], last_warmup[name]) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_batch(contenders[name], counts[name]))
        gc.collect()
    return samples


def paired_ratios(numerators: list[float], denominators: list[float]) -> dict:
    """Round-by-round ratios ``numerators[i] / denominators[i]``, summarized."""
    if len(numerators) != len(denominators):
        raise ValueError(f"paired ratios need equal rounds, got {len(numerators)} and {len(denominators)}")
    return summarize([a / b for a, b in zip(numerators, denominators) if b > 0])


class Progress:
    """One line per step on stderr, with the time since the run began."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, text: str) -> None:
        print(f"[bench {self.elapsed():6.1f}s] {text}", file=sys.stderr, flush=True)
