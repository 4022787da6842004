"""Repeated code is cheap: a source segment the worker's store holds travels as its
digest alone, a digest it lacks is answered with ``miss`` and the client resends with the
text, and text that does not match its digest is refused.

Run as a script (``python tests/test_runner_sources.py``) it measures bytes and latency
per call for a ~100 KB module (the numbers in docs/RUNNER.md, "Repeated code").
"""
import importlib
import os
import signal
import statistics
import sys
import tempfile
import time

import capture
import sandbox
import msgpack
import pytest

import runner
from runner import protocol
from runner_support import raw_client
from runner.worker import SourceStore

POLICY = "nnsight-local"


def helper_module_text(functions: int = 100, body_lines: int = 15, salt: int = 0) -> str:
    """A made-up helper module of ``functions`` functions and an ``entry(x)`` that calls
    them all: about 1 KB per function with the defaults, so about 100 KB in all.
    ``salt`` changes every line, so two salts never share a source digest."""
    parts = []
    for i in range(functions):
        lines = [f"def helper_{i}(x):",
                 f'    """Step {i} of a made-up pipeline (variant {salt})."""',
                 f"    y = x * {i + 1} + {salt}"]
        for j in range(body_lines):
            lines.append(f"    y = (y + {j}) * 0.5 - {i % 7} if y > {j} else y + {j + i}  # variant {salt}")
        lines.append("    return y")
        parts.append("\n".join(lines) + "\n")
    parts.append("HELPERS = (" + ", ".join(f"helper_{i}" for i in range(functions)) + ",)\n")
    parts.append("def entry(x):\n    return sum(helper(x) for helper in HELPERS)\n")
    return "\n\n".join(parts)


def import_module_from(directory: str, name: str, text: str):
    with open(os.path.join(directory, f"{name}.py"), "w") as handle:
        handle.write(text)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    importlib.invalidate_caches()
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def worker():
    with runner.Worker(model="none", policy=POLICY) as worker:
        yield worker


@pytest.fixture
def module_dir(tmp_path):
    yield str(tmp_path)
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def call_bytes(worker, fn, *args):
    """The result of ``worker.call(fn, *args)`` and the request bytes it sent."""
    before = worker.stats()["bytes_sent"]
    result = worker.call(fn, *args)
    return result, worker.stats()["bytes_sent"] - before


def test_a_module_called_again_with_other_arguments_travels_without_its_text(worker, module_dir):
    text = helper_module_text()
    assert len(text) > 95_000
    lib = import_module_from(module_dir, "sbx_helpers_repeat", text)
    resends = worker.stats()["resends"]
    first_result, first = call_bytes(worker, lib.entry, 1.0)
    assert first_result == lib.entry(1.0) and first > len(text)
    for x in (2.0, -3.5, 10.0, 0.25):
        result, repeated = call_bytes(worker, lib.entry, x)
        assert result == lib.entry(x)
        # The whole text is saved: what still travels is the functions' metadata.
        assert first - repeated > 0.95 * len(text) and repeated * 3 < first
    assert worker.stats()["resends"] == resends
    assert worker.status()["sources"]["hits"] >= 4 * 101


def test_after_the_worker_is_killed_a_call_succeeds_through_the_miss_path(module_dir):
    lib = import_module_from(module_dir, "sbx_helpers_restart", helper_module_text(functions=20))
    with runner.Worker(model="none", policy=POLICY) as worker:
        assert worker.call(lib.entry, 1.0) == lib.entry(1.0)
        status = worker.status()
        store_id = status["sources"]["id"]
        os.kill(status["worker_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while worker.status()["restarts"] == status["restarts"] or worker.status()["state"] != "ready":
            assert time.monotonic() < deadline, "the supervisor did not restart the worker"
            time.sleep(0.05)
        result, sent = call_bytes(worker, lib.entry, 2.0)
        assert result == lib.entry(2.0)
        stats = worker.stats()
        assert stats["resends"] == 1  # the digests missed in the new, empty store, then the text went
        assert worker.status()["sources"]["id"] != store_id
        result, again = call_bytes(worker, lib.entry, 3.0)
        assert result == lib.entry(3.0) and again * 2 < sent and worker.stats()["resends"] == 1


# -- a hand-written client on the raw protocol -------------------------------------------



def send_call(conn, request_id, bundle):
    conn.send(protocol.REQUEST, request_id, {"kind": "call"}, [bundle.header, *bundle.frames])
    return conn.recv()


def encode_call(fn, *args, known=()):
    return capture.encode_variables({"fn": fn, "args": args, "kwargs": {}}, policy=sandbox.Policy.load(POLICY),
                                    known_sources=known)


def test_a_digest_only_request_for_unknown_source_gets_a_miss_then_runs_when_resent(worker, module_dir):
    lib = import_module_from(module_dir, "sbx_helpers_hostile", helper_module_text(functions=5, salt=os.getpid()))
    full = encode_call(lib.entry, 4.0)
    conn = raw_client(worker)
    try:
        reply = send_call(conn, 7, encode_call(lib.entry, 4.0, known=set(full.source_digests)))
        assert (reply.kind, reply.id) == (protocol.MISS, 7)
        assert sorted(reply.meta["missing"]) == sorted(full.source_digests)
        reply = send_call(conn, 7, full)
        assert (reply.kind, reply.id) == (protocol.REPLY, 7)
        assert capture.decode(bytes(reply.frames[0]), [bytes(f) for f in reply.frames[1:]]) == lib.entry(4.0)
        # Now the store holds them: the digests alone are enough, from any client.
        reply = send_call(conn, 8, encode_call(lib.entry, 5.0, known=set(full.source_digests)))
        assert reply.kind == protocol.REPLY
        assert capture.decode(bytes(reply.frames[0]), [bytes(f) for f in reply.frames[1:]]) == lib.entry(5.0)
    finally:
        conn.close()


def test_text_that_does_not_match_its_digest_is_refused_and_never_stored(worker, module_dir):
    lib = import_module_from(module_dir, "sbx_helpers_forged",
                             f"def secret(x):\n    return x + {os.getpid()}\n")
    bundle = encode_call(lib.secret, 1)
    header = msgpack.unpackb(bundle.header, raw=False, strict_map_key=False)
    (source,) = header["sources"]
    source["text"] = source["text"].replace("return x +", "return x * 0 +")
    forged = msgpack.packb(header, use_bin_type=True)
    conn = raw_client(worker)
    try:
        conn.send(protocol.REQUEST, 3, {"kind": "call"}, [forged])
        reply = conn.recv()
        assert (reply.kind, reply.id) == (protocol.ERROR, 3)
        error = reply.meta["error"]
        assert error["qualname"] == "BundleError"
        assert f"{lib.__file__}:1 does not match its digest" in error["message"]
        # The forged text was not kept under the genuine digest: asking by digest misses.
        reply = send_call(conn, 4, encode_call(lib.secret, 1, known={source["digest"]}))
        assert reply.kind == protocol.MISS and reply.meta["missing"] == [source["digest"]]
    finally:
        conn.close()
    assert worker.call(lib.secret, 1) == 1 + os.getpid()


def test_bytes_without_their_source_text_are_an_error_naming_the_fix(worker, module_dir):
    lib = import_module_from(module_dir, "sbx_helpers_bytes", f"def unseen(x):\n    return x - {os.getpid()}\n")
    digests = set(encode_call(lib.unseen, 1).source_digests)
    data = encode_call(lib.unseen, 1, known=digests).to_bytes()
    with pytest.raises(capture.BundleError, match="sent by digest only.*runner.encode_call"):
        runner.decode_result(worker.run_bytes(data))


def test_the_source_store_drops_the_least_recently_used_text_past_its_bound():
    store = SourceStore(max_chars=10)
    store["a"], store["b"] = "xxxx", "yyyy"
    assert store.get("a") == "xxxx"       # a is now the most recently used
    store["c"] = "zzzz"                    # 12 characters: b goes
    assert list(store) == ["a", "c"] and store.get("b") is None
    store["huge"] = "h" * 11               # larger than the whole store: not kept
    assert "huge" not in store
    assert store.summary()["chars"] == 8 and store.summary()["hits"] == 1 and store.summary()["misses"] == 1


# -- measurement (docs/RUNNER.md, "Repeated code") ---------------------------------------

def _measure(rounds: int = 21) -> None:
    """Per module shape, medians of ``rounds`` modules: bytes sent and call latency for
    the first call (new source: encoded cold, sent, compiled), for the same module sent
    with its text by a second client (the worker holds it compiled), and for a repeat
    with other arguments (digests only); plus the client's cold encoding alone."""
    directory = tempfile.mkdtemp(prefix="sbx-sources-")
    shapes = [(300, 4), (100, 15), (30, 52)]
    print(f"{'module':>18} | {'bytes first':>11} | {'bytes repeated':>14} | {'first call':>10} | "
          f"{'of it cold encode':>17} | {'text, warm worker':>17} | {'repeated':>8}")
    with runner.Worker(model="none", policy=POLICY) as worker:
        worker.call(len, "warm up")
        for functions, body_lines in shapes:
            firsts, encodes, resent, repeated, sizes = [], [], [], [], []
            for salt in range(rounds):
                lib = import_module_from(directory, f"sbx_measure_{functions}_{salt}",
                                         helper_module_text(functions, body_lines, salt=salt))
                twin = import_module_from(directory, f"sbx_measure_{functions}_{salt}_twin",
                                          helper_module_text(functions, body_lines, salt=rounds + salt))
                started = time.perf_counter()
                encode_call(twin.entry, 1.0)
                encodes.append(time.perf_counter() - started)
                started = time.perf_counter()
                _, first_bytes = call_bytes(worker, lib.entry, 1.0)
                firsts.append(time.perf_counter() - started)
                with runner.Worker(socket=worker.socket_path) as other:  # knows nothing: sends the text
                    started = time.perf_counter()
                    other.call(lib.entry, 2.0)
                    resent.append(time.perf_counter() - started)
                started = time.perf_counter()
                _, repeated_bytes = call_bytes(worker, lib.entry, float(salt))
                repeated.append(time.perf_counter() - started)
                sizes.append((first_bytes, repeated_bytes))
            text = len(helper_module_text(functions, body_lines))
            print(f"{f'{functions} fns, {text // 1000} KB':>18} | {statistics.median(s[0] for s in sizes):>11,.0f} | "
                  f"{statistics.median(s[1] for s in sizes):>14,.0f} | {statistics.median(firsts) * 1e3:>7.1f} ms | "
                  f"{statistics.median(encodes) * 1e3:>14.1f} ms | {statistics.median(resent) * 1e3:>14.1f} ms | "
                  f"{statistics.median(repeated) * 1e3:>5.1f} ms")


if __name__ == "__main__":
    _measure()
