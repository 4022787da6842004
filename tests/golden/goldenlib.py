"""User code for the golden bundles (tests/golden/cases.py): small on purpose, since
each bundle carries the source it uses. Changing this file changes the goldens."""
import collections
import functools
import math
import threading

SCALE = 3
Pair = collections.namedtuple("Pair", "left right", defaults=(0,))
LOCK = threading.Lock()  # cannot travel: a module shipped whole gets a placeholder


def scale(x, offset=1.0):
    """Scale x by SCALE, then add offset."""
    return x * SCALE + offset


def make_counter(start):
    count = start

    def step():
        nonlocal count
        count += 1
        return count

    return step


@functools.lru_cache(maxsize=16)
def square(x):
    return x * x


class Point:
    dims = 2

    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm2(self):
        return self.x ** 2 + self.y ** 2

    @staticmethod
    def origin():
        return Point(0, 0)

    @property
    def length(self):
        return math.sqrt(self.norm2())


class GoldenError(ValueError):
    def __init__(self, message, code):
        super().__init__(message, code)
        self.code = code
