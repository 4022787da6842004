"""Names that fool naive name resolution: a builtin shadowed at module level, and local
names (comprehension variables, lambda and generator parameters) that share their names
with module globals that cannot travel. Shipping those globals would fail, so a correct
capture must see that the functions never read them."""
import sqlite3
import threading


def my_sum(values):
    total = 0
    for value in values:
        total += value
    return total * 100  # distinguishable from builtins.sum


sum = my_sum  # shadows the builtin for every function of this module


def total(values):
    return sum(values)


item = threading.Lock()
conn = sqlite3.connect(":memory:")
x = threading.Lock()


def doubled(items):
    return [item * 2 for item in items]


def squares(xs):
    return {x: x * x for x in xs}


def bump_all(values):
    return list(map(lambda conn: conn + 1, values))


def first_truthy(values):
    return next((x for x in values if x), None)
