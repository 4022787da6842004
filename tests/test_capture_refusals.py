"""What cannot be rebuilt honestly on another machine is refused at dumps time, with a
CaptureError that names where the value sits, its type, and what to do instead."""
import asyncio
import contextlib
import gc
import linecache
import mmap
import os
import queue
import re
import socket
import sqlite3
import sys
import threading
import weakref

import pytest

import capture
from capture_support.harness import UserCode

# A refusal must tell the user what to do; these are the verbs such advice starts with.
ADVICE = re.compile(r"\b(instead|workaround|define|create|pass|send|use|make|wrap|move|open|close|build|write|copy|convert|return|keep)\b", re.I)
PATH = "[0].config['db']"


def assert_refusal(error: capture.CaptureError, *names: str) -> None:
    message = str(error)
    for name in names:
        assert name in message, f"{name!r} is not named in the refusal: {message}"
    assert ADVICE.search(message), f"the refusal gives no advice on what to do instead: {message}"


async def waiting():
    await asyncio.sleep(0)


async def ticking():
    yield 1


def started_generator():
    generator = (n for n in range(3))
    next(generator)
    return generator


def traceback_object():
    try:
        raise ValueError("boom")
    except ValueError as error:
        return error.__traceback__


def class_without_source():
    namespace = {}
    exec("class Ghost:\n    pass\n", namespace)  # no file, no linecache entry
    return namespace["Ghost"]()


def function_without_source():
    namespace = {}
    exec("def ghost():\n    return 1\n", namespace)
    return namespace["ghost"]


# name -> (make the resource, given an ExitStack that releases it; what the message must name)
RESOURCES = {
    "open_text_file": (lambda stack, tmp: stack.enter_context(open(tmp / "f.txt", "w")), ["TextIOWrapper"]),
    "open_binary_file": (lambda stack, tmp: stack.enter_context(open(__file__, "rb")), ["BufferedReader"]),
    "socket": (lambda stack, tmp: stack.enter_context(socket.socket(socket.AF_UNIX)), ["socket"]),
    "lock": (lambda stack, tmp: threading.Lock(), ["lock"]),
    "rlock": (lambda stack, tmp: threading.RLock(), ["RLock"]),
    "thread": (lambda stack, tmp: threading.Thread(target=print), ["Thread"]),
    "queue_holding_locks": (lambda stack, tmp: queue.Queue(), ["lock"]),
    "sqlite_connection": (lambda stack, tmp: stack.enter_context(contextlib.closing(sqlite3.connect(":memory:"))), ["Connection"]),
    "generator_in_flight": (lambda stack, tmp: started_generator(), ["generator"]),
    "unstarted_generator": (lambda stack, tmp: (n for n in range(3)), ["generator"]),
    "coroutine": (lambda stack, tmp: stack.enter_context(contextlib.closing(waiting())), ["coroutine"]),
    "async_generator": (lambda stack, tmp: ticking(), ["async_generator"]),
    "frame": (lambda stack, tmp: sys._getframe(), ["frame"]),
    "traceback": (lambda stack, tmp: traceback_object(), ["traceback"]),
    "code_object": (lambda stack, tmp: compile("1 + 1", "<expr>", "eval"), ["code"]),
    "memory_map": (lambda stack, tmp: stack.enter_context(mmap.mmap(-1, 4096)), ["mmap"]),
    "event_loop": (lambda stack, tmp: stack.enter_context(contextlib.closing(asyncio.new_event_loop())), ["EventLoop"]),
    "os_environ": (lambda stack, tmp: os.environ, ["_Environ"]),
    "weak_reference": (lambda stack, tmp: weakref.ref(contextlib.ExitStack), ["weakref"]),
    "c_extension_module_outside_the_policy": (lambda stack, tmp: pytest.importorskip("msgpack._cmsgpack"), ["msgpack"]),
    "c_extension_object_outside_the_policy": (lambda stack, tmp: pytest.importorskip("zstandard").ZstdCompressor(), ["ZstdCompressor"]),
    "class_without_source": (lambda stack, tmp: class_without_source(), ["Ghost"]),
    "function_without_source": (lambda stack, tmp: function_without_source(), ["ghost"]),
}


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    with UserCode(tmp_path_factory.mktemp("user"), ["resources"]) as user:
        yield user
        user.resources.LOG.close()


@pytest.mark.parametrize("kind", RESOURCES)
def test_refused_with_path_type_and_advice(kind, user, tmp_path):
    make, names = RESOURCES[kind]
    with contextlib.ExitStack() as stack:
        resource = make(stack, tmp_path)
        job = user.resources.Job({"name": "nightly", "db": resource})
        with pytest.raises(capture.CaptureError) as refused:
            capture.dumps((job,))
        assert_refusal(refused.value, PATH, *names)
        del resource, job
    gc.collect()  # the unstarted async generator and friends are finalised here, not later


def test_module_global_holding_an_open_file_is_refused(user):
    with pytest.raises(capture.CaptureError) as refused:
        capture.dumps(user.resources.log_line)
    assert_refusal(refused.value, "LOG", "TextIOWrapper")


def test_closure_capturing_a_lock_is_refused(user):
    with pytest.raises(capture.CaptureError) as refused:
        capture.dumps(user.resources.make_guarded_counter())
    assert_refusal(refused.value, "lock")


def test_function_whose_source_file_is_gone_is_refused(tmp_path):
    with UserCode(tmp_path, []) as user:
        (tmp_path / "vanishing.py").write_text("def fleeting(x):\n    return x + 1\n")
        fleeting = user.vanishing.fleeting
        (tmp_path / "vanishing.py").unlink()
        linecache.clearcache()
        with pytest.raises(capture.CaptureError) as refused:
            capture.dumps(fleeting)
    assert_refusal(refused.value, "fleeting")
