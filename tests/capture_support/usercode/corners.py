"""Corners found in review: each once broke dumps or changed data on load."""
import functools
import threading

GREETING = "hello world"
UNSHIPPABLE = ("hello world", threading.Lock())  # becomes a placeholder in a whole-module dump
AFTER = "hello world"


class Selfy:
    def __init__(self, value):
        self.value = value


Selfy.DEFAULT = Selfy(42)  # a class attribute holding an instance of the class


class Cached:
    @functools.cached_property
    def answer(self):
        return 42


def rename(new_name):
    def decorate(function):
        function.__name__ = new_name
        return function
    return decorate


class Renamed:
    @rename("pretty")
    def method(self):
        return "method"


def make_counter_class():
    count = 0

    class Counter:
        def current(self):
            return count

    def increment():
        nonlocal count
        count += 1
        return count

    return Counter, increment
