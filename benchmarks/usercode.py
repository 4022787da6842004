"""The user code the benchmarks ship: real ``.py`` files written to a temporary directory.

Scenario objects must come from modules the loading side cannot import (as on a server),
so they are generated into a directory that is on ``sys.path`` only in this process,
never in the fresh processes that measure cold loads. ``library`` is the "user module of
20 functions and 5 classes", generated so its size and shape resemble a real helper
library: functions that call each other, module constants, an inheritance chain,
properties and class methods.
"""
from __future__ import annotations

import importlib
import os
import sys
import textwrap
from dataclasses import dataclass
from types import ModuleType

LIBRARY_FUNCTIONS = 20
LIBRARY_CLASSES = 5

HELPERS_SOURCE = '''\
"""Helpers a researcher keeps next to a notebook (written by the sourcebox benchmarks)."""
import math

EPSILON = 1e-6


def scale_and_shift(values, scale=2.0, shift=1.0):
    """Scale, then shift, every value."""
    return [value * scale + shift for value in values]


def make_pipeline(offset, factor, power):
    """A chain of closures, each capturing the previous one and its own settings."""
    def add(value):
        return value + offset

    def multiply(value):
        return add(value) * factor

    def raise_power(value):
        return math.copysign(abs(multiply(value)) ** power, multiply(value))

    def pipeline(values):
        return [raise_power(value) for value in values]

    return pipeline


class RunningStats:
    """Welford's running mean and variance."""

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def push(self, value):
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    @property
    def variance(self):
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0


class Experiment:
    """Nested state: dicts of lists of dicts, other user instances, a shared reference."""

    def __init__(self, name, seed):
        self.name = name
        self.config = {
            "layers": [0, 3, 5],
            "learning_rate": 3e-4,
            "tags": ("probe", "lens"),
            "nested": {"a": {"b": [1, 2, {"c": None, "d": {seed, seed + 1}}]}},
        }
        self.stats = {"loss": RunningStats(), "accuracy": RunningStats()}
        self.tracked = self.stats["loss"]
        self.history = []
        for step in range(50):
            loss = 1.0 / (step + 1 + seed)
            self.history.append((step, loss))
            self.stats["loss"].push(loss)
            self.stats["accuracy"].push(1.0 - loss)

    def summary(self):
        return (self.name, round(self.tracked.mean, 6), round(self.stats["accuracy"].variance, 9),
                len(self.history), self.tracked is self.stats["loss"])


def empty():
    return None


def echo(value):
    return value


def kind_of(value):
    """A small result for any argument, so a call measures the request, not the reply."""
    return type(value).__name__
'''

MODEL_SOURCE = '''\
"""A user nn.Module of about ten million parameters (written by the sourcebox benchmarks)."""
import torch
from torch import nn


class ProbeStack(nn.Module):
    """Stacked linear probes with a learned scale."""

    def __init__(self, width=1000, depth=10):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x * self.scale


def build(seed=0):
    torch.manual_seed(seed)
    return ProbeStack()
'''

TRACE_SOURCE = '''\
"""An nnsight probe a researcher would write (written by the sourcebox benchmarks)."""
import torch


def normalize(x, dim=-1, eps=1e-8):
    return x / (x.norm(dim=dim, keepdim=True) + eps)


def first_and_last_layer(model, prompt, **trace_options):
    """Normalized first-layer output and the last layer's norm, as a trace body."""
    with model.trace(prompt, **trace_options):
        first = normalize(model.transformer.h[0].output).save()
        last_norm = model.transformer.h[-1].output.norm(dim=-1).save()
    return first, last_norm
'''


def _library_source() -> str:
    """20 functions and 5 classes that use each other, like a small analysis package."""
    parts = ['"""A generated analysis library: 20 functions and 5 classes (sourcebox benchmarks)."""',
             "import math", "", "WINDOW = 4", "WEIGHTS = [0.5, 0.25, 0.125, 0.0625]", ""]
    feature_count = LIBRARY_FUNCTIONS - 1  # plus run_all
    for index in range(feature_count):
        previous = f"feature_{index - 1:02d}(values[:WINDOW])" if index else "0.0"
        parts.append(textwrap.dedent(f'''
            def feature_{index:02d}(values, scale={index + 1}):
                """Feature {index}: a windowed, weighted sum with a dependency on the previous one."""
                total = 0.0
                for position, value in enumerate(values):
                    weight = WEIGHTS[position % len(WEIGHTS)]
                    total += weight * math.sin(value * scale + position)
                if not values:
                    return 0.0
                return total / len(values) + 0.1 * {previous}
            '''))
    for index in range(LIBRARY_CLASSES):
        base = f"Aggregator{index - 1}" if index else "object"
        parts.append(textwrap.dedent(f'''
            class Aggregator{index}({base}):
                """Aggregator {index}: keeps the features it has seen."""
                level = {index}

                def __init__(self, name="agg{index}"):
                    {"super().__init__(name)" if index else "self.seen = []"}
                    self.name = name

                def add(self, value):
                    self.seen.append(value * (self.level + 1))
                    return self

                @property
                def total(self):
                    return sum(self.seen)

                @classmethod
                def from_values(cls, values):
                    aggregator = cls()
                    for value in values:
                        aggregator.add(value)
                    return aggregator
            '''))
    calls = ", ".join(f"feature_{index:02d}(values)" for index in range(feature_count))
    parts.append(textwrap.dedent(f'''
        def run_all(values):
            """Every feature, folded through every aggregator."""
            features = [{calls}]
            aggregators = [cls.from_values(features) for cls in
                           (Aggregator0, Aggregator1, Aggregator2, Aggregator3, Aggregator4)]
            return [round(aggregator.total, 9) for aggregator in aggregators]
        '''))
    return "\n".join(parts)


@dataclass
class UserCode:
    """The generated modules, imported from ``directory``."""

    directory: str
    helpers: ModuleType
    library: ModuleType
    model: ModuleType
    trace: ModuleType

    @property
    def modules(self) -> list[ModuleType]:
        return [self.helpers, self.library, self.model, self.trace]

    def reload(self) -> None:
        """Re-run the modules, in place, from their files.

        Needed between scenarios: loading a by-value cloudpickle payload in the process
        that made it rewrites the original classes (cloudpickle finds them by their
        tracking id and sets the unpickled methods on them, with no source file), and
        capture rightly refuses methods without source. Fresh classes undo that.
        """
        sys.path.insert(0, self.directory)
        try:
            for module in self.modules:
                importlib.reload(module)
        finally:
            sys.path.remove(self.directory)


def write_and_import(directory: str) -> UserCode:
    """Write the user modules into ``directory`` and import them from there.

    The directory leaves ``sys.path`` again once they are imported: the modules stay in
    ``sys.modules`` (so by-reference pickles load here) but nothing else can be found there.
    """
    files = {"bench_helpers": HELPERS_SOURCE, "bench_library": _library_source(),
             "bench_probe": MODEL_SOURCE, "bench_trace": TRACE_SOURCE}
    for name, text in files.items():
        with open(os.path.join(directory, name + ".py"), "w") as handle:
            handle.write(text)
    sys.path.insert(0, directory)
    try:
        modules = {name: importlib.import_module(name) for name in files}
    finally:
        sys.path.remove(directory)
    return UserCode(directory, modules["bench_helpers"], modules["bench_library"], modules["bench_probe"],
                    modules["bench_trace"])
