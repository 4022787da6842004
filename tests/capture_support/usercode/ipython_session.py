"""Runs cells in an IPython shell, as a notebook would, and writes bundles of what they define.

Usage: python ipython_session.py OUT_DIR. Writes OUT_DIR/<case>.bundle, or <case>.error with
the traceback when dumping fails.
"""
import pathlib
import sys
import traceback

from IPython.core.interactiveshell import InteractiveShell

import capture

CELLS = [
    "FACTOR = 3\n\ndef scale(x):\n    \"\"\"Scale by FACTOR.\"\"\"\n    return x * FACTOR\n",
    "class Thing:\n    def go(self, v):\n        return scale(v) + 1\n",
]

shell = InteractiveShell.instance()
for cell in CELLS:
    shell.run_cell(cell, store_history=True).raise_error()
namespace = shell.user_ns
out = pathlib.Path(sys.argv[1])
shipped = {"ipython_function": lambda: namespace["scale"], "ipython_class": lambda: (namespace["Thing"], namespace["Thing"]())}
for name, build in shipped.items():
    try:
        (out / f"{name}.bundle").write_bytes(capture.dumps(build()))
    except Exception:
        (out / f"{name}.error").write_text(traceback.format_exc())
