"""A researcher's helper functions: every kind of function the capture layer must ship as source."""
import asyncio
import functools
import math

SCALE = 3  # tests rebind this after import: the shipped value must be the current one


def scale_and_shift(x: float, shift: float = 1.0, *, factor: int = 2) -> float:
    """Scale x by factor and SCALE, then add shift."""
    return x * factor * SCALE + shift


def remember(item, seen=[]):  # the shared mutable default is the point
    seen.append(item)
    return list(seen)


PAIR = (lambda x: x + 1, lambda x: x * 10)


def apply(x, fn=lambda v: v - 7):
    return fn(x)


def make_counter(start=0):
    count = start

    def increment(step=1):
        nonlocal count
        count += step
        return count

    return increment


def make_scaler(factor):
    def scaled(x):
        return x * factor

    return scaled


def make_account():
    balance = 0

    def deposit(amount):
        nonlocal balance
        balance += amount
        return balance

    def read():
        return balance

    return deposit, read


def factorial(n):
    return 1 if n <= 1 else n * factorial(n - 1)


def is_even(n):
    return True if n == 0 else is_odd(n - 1)


def is_odd(n):
    return False if n == 0 else is_even(n - 1)


def make_fib():
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    return fib


def twice_plus_one(x):
    def double(v):
        return 2 * v

    def plus_one(v):
        return double(v) + 1

    return plus_one(x)


def countdown(n):
    while n > 0:
        yield n
        n -= 1


async def slow_double(x):
    await asyncio.sleep(0)
    return 2 * x


def logged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        return fn(*args, **kwargs)

    wrapper.calls = 0
    return wrapper


@logged
def add(a, b):
    """Add two numbers."""
    return a + b


def repeat(times):
    def decorate(fn):
        def run(*args):
            return [fn(*args) for _ in range(times)]

        return run

    return decorate


@repeat(3)
def shout(word):
    return word.upper()


def power(base, exponent):
    return base ** exponent


cube = functools.partial(power, exponent=3)


@functools.lru_cache(maxsize=None)
def cached_square(n):
    return n * n


def uses_local_imports(values):
    import statistics
    from collections import Counter
    import math as m

    return statistics.mean(values), Counter(values).most_common(1)[0][0], m.floor(2.7)


def hypot(a, b):
    return math.sqrt(a * a + b * b)


def tagged(x):
    return x


tagged.unit = "meters"
