"""What the bundle fuzzer mutates: user code that travels as source (this module is
not on any destination's list, so its functions and classes ship as text) and result-like
data of every value kind, encoded once per run."""
from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import pathlib
import types
from typing import Any

SCALE = 3


def make_counter(start: int):
    count = start

    def step(by: int = 1) -> int:
        nonlocal count
        count += by
        return count

    return step


class Color(enum.Enum):
    RED = 1
    GREEN = 2


@dataclasses.dataclass
class Config:
    layers: list = dataclasses.field(default_factory=lambda: [2, 4])
    name: str = "probe"

    def width(self) -> int:
        return sum(self.layers) * SCALE


class Registry:
    entries: list = []

    @staticmethod
    def norm(value: float) -> float:
        return abs(value)

    @property
    def size(self) -> int:
        return len(self.entries)


Registry.entries.append("added later")  # a class attribute the statement does not recreate
Point = collections.namedtuple("Point", ["x", "y"], defaults=[0])


def code_values() -> dict:
    """Functions, closures, classes and instances: what a request ships."""
    return {"counter": make_counter(2), "scale": lambda v: v * SCALE, "config": Config(),
            "registry": Registry(), "cls": Registry, "color": Color.GREEN, "point": Point(1, 2),
            "norm": Registry.norm, "width": Config().width}


def data_values() -> dict:
    """Values only, the kinds a reply carries: what ``DATA_ONLY`` rebuilds."""
    import numpy
    import torch

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "tensor": base, "view": base[1:, ::2].t(), "param": torch.nn.Parameter(torch.ones(3)),
        "bf16": torch.ones(5, dtype=torch.bfloat16), "size": base.shape, "dtype": torch.float16,
        "array": numpy.arange(12, dtype=numpy.int16).reshape(3, 4), "scalar": numpy.float32(1.5),
        "blob": bytes(range(256)) * 300, "small": b"\x00\x01", "mutable": bytearray(b"abc"),
        "ints": [0, -1, 2**63 - 1, 2**100, -(2**70)], "floats": [1.5, float("inf")], "complex": 3 - 4j,
        "sets": [{1, 2}, frozenset("ab")], "odict": collections.OrderedDict(a=1), "text": "caf\u00e9 \ud800",
        "counter": collections.Counter("aab"), "deque": collections.deque([1, 2], maxlen=5),
        "default": collections.defaultdict(list, k=[1]), "when": datetime.datetime(2024, 2, 29, 12, 0),
        "delta": datetime.timedelta(days=2), "tz": datetime.timezone(datetime.timedelta(hours=1)),
        "decimal": decimal.Decimal("1.25"), "fraction": fractions.Fraction(3, 7), "path": pathlib.PurePosixPath("/a/b"),
        "ns": types.SimpleNamespace(a=1), "range": range(0, 10, 2), "slice": slice(1, None, 2),
        "shared": [[1, 2]] * 2,
    }


def cyclic() -> Any:
    loop: list = [1]
    loop.append(loop)
    holder: dict = {"self": None, "tuple": (loop,)}
    holder["self"] = holder
    return holder
