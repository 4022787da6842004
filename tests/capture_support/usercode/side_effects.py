"""Shipped code that leaves a marker file whenever it runs: a class body, a default
expression, a method, and a top-level statement no shipped definition needs. Reading a
bundle of it must run none of them; loading one must not re-run the unrelated statement."""
import pathlib

MARKER_DIR = None  # the test points this at an empty directory after import


def touch(name):
    if MARKER_DIR is not None:
        pathlib.Path(MARKER_DIR, name).write_text("ran")
    return name


class Marked:
    registered = touch("class-body")

    def method(self):
        return touch("method")


def with_default(tag=touch("default-expression")):
    return tag


touch("module-top-level")
