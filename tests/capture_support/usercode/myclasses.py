"""A researcher's classes: every kind of class statement the capture layer must ship as source."""
import collections
import enum
import typing
from dataclasses import dataclass, field


class Shape:
    sides = 0

    def describe(self):
        return f"{type(self).__name__} with {self.sides} sides"


class Rectangle(Shape):
    sides = 4

    def __init__(self, width, height):
        self.width = width
        self.height = height

    def area(this):  # the first parameter is not called self
        return this.width * this.height

    def describe(self):
        return super().describe() + f", area {self.area()}"

    @property
    def is_square(self):
        return self.width == self.height

    @classmethod
    def square(klass, side):
        return klass(side, side)

    @staticmethod
    def unit():
        return Rectangle(1, 1)


class Temperature:
    def __init__(self, celsius):
        self._celsius = celsius

    @property
    def fahrenheit(self):
        return self._celsius * 9 / 5 + 32

    @fahrenheit.setter
    def fahrenheit(self, value):
        self._celsius = (value - 32) * 5 / 9


class Point:
    __slots__ = ("x", "y")

    def __init__(self, x, y):
        self.x = x
        self.y = y

    def manhattan(self):
        return abs(self.x) + abs(self.y)


class Outer:
    class Inner:
        def __init__(self, value):
            self.value = value

        def twice(self):
            return 2 * self.value

    def make(self, value):
        return Outer.Inner(value)


@dataclass
class TrainConfig:
    lr: float = 1e-3
    layers: list = field(default_factory=lambda: [64, 64])
    name: str = "probe"

    def total_units(self):
        return sum(self.layers)


@dataclass(frozen=True)
class FrozenPoint:
    x: int
    y: int


class Color(enum.Enum):
    RED = 1
    GREEN = 2

    def label(self):
        return self.name.lower()


class Span(typing.NamedTuple):
    start: int
    end: int = 10

    def length(self):
        return self.end - self.start


Pair = collections.namedtuple("Pair", "left right")


class Registry:
    entries = ["builtin"]
    version = 1


class Snapshot:
    """Keeps a derived total that __getstate__ leaves out and __setstate__ recomputes."""

    def __init__(self, values):
        self.values = values
        self._total = sum(values)

    def __getstate__(self):
        return {"values": self.values}

    def __setstate__(self, state):
        self.values = state["values"]
        self._total = sum(self.values)
        self.restored = True


class Interval:
    def __init__(self, low, high):
        if low > high:
            raise ValueError("low > high")
        self.low = low
        self.high = high

    def __reduce__(self):
        return (make_interval, (self.low, self.high))


def make_interval(low, high):
    interval = Interval(low, high)
    interval.built_by = "make_interval"
    return interval


class PluginMeta(type):
    def __new__(mcs, name, bases, namespace, **kwargs):
        cls = super().__new__(mcs, name, bases, namespace)
        cls.plugin_name = name.lower()
        return cls

    def describe(cls):
        return f"plugin:{cls.plugin_name}"


class Plugin(metaclass=PluginMeta):
    def run(self):
        return type(self).plugin_name


class Layer:
    kinds = []

    def __init_subclass__(cls, kind="plain", **kwargs):
        super().__init_subclass__(**kwargs)
        cls.kind = kind
        Layer.kinds.append(kind)


class DenseLayer(Layer, kind="dense"):
    pass


def make_scaled_class(scale):
    class Scaled:
        def apply(self, x):
            return x * scale

    return Scaled


class Sneaky:
    """A property whose getter has a side effect: capturing an instance must not call it."""

    reads = 0

    def __init__(self):
        self.value = 1

    @property
    def expensive(self):
        Sneaky.reads += 1
        return self.value
