"""Run as a script: defines code in __main__ and writes bundles of it.

Usage: python main_script.py OUT_DIR. Writes OUT_DIR/<case>.bundle, or <case>.error with the
traceback when dumping fails, so each case fails on its own.
"""
import pathlib
import sys
import traceback

import capture

OFFSET = 10


def add_offset(x):
    return x + OFFSET


class Accumulator:
    def __init__(self):
        self.items = []

    def add(self, x):
        self.items.append(add_offset(x))
        return self


square = lambda v: v * v  # noqa: E731 - a lambda bound at module level is what is tested


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    shipped = {"main_function": add_offset, "main_instance": Accumulator().add(1), "main_lambda": square}
    for name, obj in shipped.items():
        try:
            (out / f"{name}.bundle").write_bytes(capture.dumps(obj))
        except Exception:
            (out / f"{name}.error").write_text(traceback.format_exc())
