"""Helpers shared by the runner tests."""
import contextlib
import importlib
import os
import sys
import time

from runner import auth
from runner.protocol import Connection


def raw_client(worker, timeout: float = 30) -> Connection:
    """A hand-written client on the raw protocol, through the handshake every client does
    (``runner.auth.handshake``) with ``worker``'s server; waits on it time out after ``timeout``."""
    conn, _, _ = auth.handshake(worker.socket_path, timeout=timeout)
    return conn


@contextlib.contextmanager
def environment(**variables: str | None):
    """Set (``None``: remove) environment variables inside the ``with`` block, then put
    back what was there; servers started inside inherit them."""
    saved = {name: os.environ.get(name) for name in variables}
    try:
        _set_environment(variables)
        yield
    finally:
        _set_environment(saved)


def _set_environment(variables: dict) -> None:
    for name, value in variables.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def wait_until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)




@contextlib.contextmanager
def user_modules(directory, **sources):
    """Each ``name=source`` written into ``directory`` and imported in this process only:
    the user's own modules, which the worker cannot import, so their code travels as
    source. Yields the modules in order (a single one by itself)."""
    for name, source in sources.items():
        (directory / f"{name}.py").write_text(source)
    sys.path.insert(0, str(directory))
    try:
        modules = tuple(importlib.import_module(name) for name in sources)
        yield modules[0] if len(modules) == 1 else modules
    finally:
        sys.path.remove(str(directory))
        for name in sources:
            sys.modules.pop(name, None)
