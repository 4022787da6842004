"""Settings both sides of the runner need, in a module that imports nothing of either:
importing the client (``runner.Worker``) must not pull in the server's code."""
from __future__ import annotations

import os

#: The directory holding the ``runner``, ``capture`` and ``sandbox`` packages: put on a
#: child's ``PYTHONPATH`` so the server and worker run this very copy of them.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The sandbox profile a server runs under unless told otherwise (``serve --policy``).
DEFAULT_POLICY = "default"


def check_seconds(value, what: str) -> float:
    """``value`` as a finite positive number of seconds, or a ``ValueError`` saying so."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{what} must be a finite positive number of seconds, got {value!r}")
    return float(value)
