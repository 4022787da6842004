"""How much to measure: the full run (``make bench``) and the smoke run (``--quick``)."""
from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class Settings:
    """Repeat counts and sizes; each timed contender runs ``*_repeats`` interleaved rounds."""

    quick: bool
    code_repeats: int
    cold_repeats: int
    # The 10M-parameter module's cold loads and its call through the worker (seconds each).
    heavy_module: bool
    # (bytes, dtype name) pairs for the serialization scenarios.
    tensor_cases: tuple[tuple[int, str], ...]
    # Tensor bytes -> rounds, for the serialization scenarios.
    tensor_repeats: dict
    call_repeats: int
    # Tensor bytes -> rounds, for the round trips through the worker and the pipe.
    transport_repeats: dict
    trace_repeats: int
    trace_worker_layers: tuple[int, ...]
    # Worker starts timed against the import floor, and crashes followed by a call.
    start_repeats: int


FULL = Settings(
    quick=False,
    code_repeats=25,
    cold_repeats=3,
    heavy_module=True,
    tensor_cases=tuple((size, dtype) for size in (1 * MIB, 64 * MIB, 256 * MIB) for dtype in ("float32", "bfloat16")),
    tensor_repeats={1 * MIB: 15, 64 * MIB: 7, 256 * MIB: 5},
    call_repeats=30,
    transport_repeats={1 * MIB: 15, 64 * MIB: 7, 256 * MIB: 5},
    trace_repeats=40,
    trace_worker_layers=(2, 12),
    start_repeats=3,
)

# Under a minute on two cores: fewer rounds, no 256 MiB tensors (nor 64 MiB bfloat16), the
# 10M-parameter module neither cold-loaded nor sent through the worker, traces through the
# worker on the 2-layer model only.
QUICK = Settings(
    quick=True,
    code_repeats=5,
    cold_repeats=1,
    heavy_module=False,
    tensor_cases=((1 * MIB, "float32"), (1 * MIB, "bfloat16"), (64 * MIB, "float32")),
    tensor_repeats={1 * MIB: 5, 64 * MIB: 3},
    call_repeats=5,
    transport_repeats={1 * MIB: 5, 64 * MIB: 3},
    trace_repeats=3,
    trace_worker_layers=(2,),
    start_repeats=1,
)
