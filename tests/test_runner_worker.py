"""A real worker server (``--model none``: plain functions, no model load) driven through
the client API, the CLI and raw sockets. One server is shared by the module."""
import concurrent.futures
import importlib
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import capture
import pytest
import torch

import runner
from runner import protocol
from runner_support import raw_client
from runner.protocol import GREETING_MAGIC, MESSAGE_MAGIC, PROTOCOL_VERSION

POLICY = "nnsight-local"


@pytest.fixture(scope="module")
def worker():
    with runner.Worker(model="none", policy=POLICY) as worker:
        yield worker


def memfd_mappings(pid):
    with open(f"/proc/{pid}/maps") as maps:
        return [line for line in maps if "/memfd:sourcebox" in line]


def memfd_descriptors(pid):
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return [link for link in links if link.startswith("/memfd:sourcebox")]


@pytest.fixture(scope="module")
def userlib(tmp_path_factory):
    """A user module in a temporary directory that only the client can import."""
    directory = tmp_path_factory.mktemp("userlib")
    (directory / "sbx_userlib.py").write_text(textwrap.dedent('''\
        import torch

        CALLS = []


        def double(t):
            return t * 2


        def remember(x):
            CALLS.append(x)
            return len(CALLS)


        def fail_deep(n):
            return _inner(n)


        def _inner(n):
            raise KeyError(f"no entry {n}")


        class Unshippable(Exception):
            pass


        def fail_custom():
            raise Unshippable("custom failure")


        def where():
            import sys
            return [p for p in sys.path if "userlib" in p], __file__
        '''))
    sys.path.insert(0, str(directory))
    module = importlib.import_module("sbx_userlib")
    yield module
    sys.path.remove(str(directory))
    sys.modules.pop("sbx_userlib", None)


def add(a, b=0):
    return a + b


def identity(value):
    return value


def inplace_add_one(t):
    t += 1
    return t


def filled(n, value):
    return torch.full((n,), float(value))


def describe_model(model):
    return repr(model)


def test_a_worker_that_only_connects_starts_no_server_where_none_listens(tmp_path):
    path = tmp_path / "gone.sock"
    with pytest.raises(runner.WorkerCrashed, match="start_server=False"):
        runner.Worker(model="none", socket=str(path), start_server=False)
    assert not path.exists()


def test_a_call_returns_its_result(worker):
    assert worker.call(add, 2, b=40) == 42
    assert worker.call(identity, {"k": [1, 2.5, None, "s"]}) == {"k": [1, 2.5, None, "s"]}


@pytest.mark.parametrize("elements", [10, 1 << 14, 1 << 16, 1 << 20])  # 40 B, 64 KiB inline; 256 KiB, 4 MiB shared
def test_tensors_round_trip_exactly(worker, elements):
    tensor = torch.randn(elements)
    back = worker.call(identity, tensor)
    assert torch.equal(back, tensor) and back.data_ptr() != tensor.data_ptr()
    assert torch.equal(worker.call(inplace_add_one, tensor.clone()), tensor + 1)


@pytest.mark.parametrize("mib", [64, 256])
def test_large_tensors_round_trip_exactly_through_memfds(worker, mib):
    tensor = torch.empty((mib << 20) // 4).uniform_(generator=torch.Generator().manual_seed(mib))
    back = worker.call(identity, tensor)
    assert torch.equal(back, tensor) and back.data_ptr() != tensor.data_ptr()


def test_large_results_are_private_copy_on_write_mappings_held_by_the_client_alone(worker):
    status = worker.status()
    ours = memfd_mappings(os.getpid())
    result = worker.call(filled, 1 << 20, 0)
    assert torch.count_nonzero(result) == 0
    [mapped] = [line for line in memfd_mappings(os.getpid()) if line not in ours]
    assert "sourcebox-result" in mapped and " rw-p " in mapped
    # The worker and the server let go of it right after sending it on.
    deadline = time.monotonic() + 10
    while any(memfd_mappings(pid) or memfd_descriptors(pid) for pid in (status["worker_pid"], status["server_pid"])):
        assert time.monotonic() < deadline, "the worker or the server still holds the result's memfd"
        time.sleep(0.01)
    result += 2  # ours to change: copy-on-write pages, nobody else sees them
    second = worker.call(filled, 1 << 20, 1)
    assert torch.all(result == 2) and torch.all(second == 1)
    del result, second
    assert memfd_mappings(os.getpid()) == ours  # unmapped with the last view


def test_user_module_travels_as_source_and_errors_point_at_its_lines(worker, userlib):
    assert torch.equal(worker.call(userlib.double, torch.ones(3)), torch.full((3,), 2.0))
    # The module is not importable on the worker: it ran from the shipped source.
    assert worker.call(userlib.where) == ([], userlib.__file__)
    with pytest.raises(KeyError) as caught:
        worker.call(userlib.fail_deep, 7)
    remote = caught.value.remote_traceback
    assert [(os.path.basename(f), name) for f, _, name, _ in remote] == [
        ("sbx_userlib.py", "fail_deep"), ("sbx_userlib.py", "_inner")]
    lines = pathlib.Path(userlib.__file__).read_text().splitlines()
    assert lines[remote[-1][1] - 1].strip() == 'raise KeyError(f"no entry {n}")'
    assert isinstance(caught.value.__cause__, runner.RemoteTraceback)
    assert f'{userlib.__file__}", line {remote[-1][1]}' in str(caught.value.__cause__)


def test_exception_types_the_client_has_loaded_come_back_as_themselves(worker, userlib):
    # The client imported sbx_userlib, so its exception class is found (never imported)
    # there; a type the client lacks becomes RemoteError (tests/test_boundary_results.py).
    with pytest.raises(userlib.Unshippable, match="custom failure") as caught:
        worker.call(userlib.fail_custom)
    assert isinstance(caught.value.__cause__, runner.RemoteTraceback)


def test_each_request_gets_fresh_namespaces(worker, userlib):
    assert [worker.call(userlib.remember, n) for n in range(3)] == [1, 1, 1]
    assert userlib.CALLS == []


def test_model_placeholder_on_a_worker_without_model_is_a_clear_error(worker):
    with pytest.raises(capture.BundleError, match="hosts no model"):
        worker.call(describe_model, runner.MODEL)


def import_refused():
    import pandas  # not in the nnsight-local profile

    return pandas.__version__


def test_policy_refusals_keep_their_type_and_details(worker):
    with pytest.raises(ImportError) as caught:
        worker.call(import_refused)
    assert type(caught.value).__name__ == "PolicyViolation"
    assert caught.value.module == "pandas" and caught.value.policy == POLICY
    assert caught.value.remote_traceback[-1][2] == "import_refused"


def test_unknown_request_kind_names_the_served_ones(worker):
    with pytest.raises(LookupError, match="serves no request kind 'nope'; it serves call"):
        worker.request("nope", {"x": 1})


def test_pure_bytes_helpers_carry_results_and_errors(worker, userlib):
    data = runner.encode_call(add, (1,), {"b": 2}, policy=POLICY)
    assert isinstance(data, bytes)
    assert runner.decode_result(worker.run_bytes(data)) == 3
    tensor = torch.randn(1 << 18)
    assert torch.equal(runner.decode_result(worker.run_bytes(runner.encode_call(identity, (tensor,)))), tensor)
    outcome = worker.run_bytes(runner.encode_call(userlib.fail_deep, (5,), policy=POLICY))
    with pytest.raises(KeyError, match="no entry 5"):
        runner.decode_result(outcome)


def test_concurrent_calls_from_threads_are_matched_to_their_results(worker):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: worker.call(add, n, b=n), range(40)))
    assert results == [2 * n for n in range(40)]


def test_status_and_stop_from_the_command_line(tmp_path):
    socket_path = str(tmp_path / "cli.sock")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    server = subprocess.Popen([sys.executable, "-m", "runner", "serve", "--socket", socket_path, "--model", "none",
                               "--policy", POLICY], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        with runner.Worker(socket=socket_path) as client:  # connects; does not own the server
            assert client.call(add, 1, b=1) == 2
            status = json.loads(subprocess.run(
                [sys.executable, "-m", "runner", "status", socket_path, "--json"], env=env,
                capture_output=True, text=True, check=True).stdout)
        assert status["state"] == "ready" and status["model"] == "none" and status["served"] >= 1
        assert status["protocol"] == PROTOCOL_VERSION and status["worker_pid"]
        stopped = subprocess.run([sys.executable, "-m", "runner", "stop", socket_path], env=env,
                                 capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stderr
        assert server.wait(timeout=30) == 0
        assert not os.path.exists(socket_path)
        assert not [name for name in os.listdir("/dev/shm")
                    if {str(status["worker_pid"]), str(server.pid)} & set(name.split("-"))]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# -- raw sockets against the live server ------------------------------------------------



def test_malformed_header_fails_that_request_only(worker):
    conn = raw_client(worker, timeout=10)
    conn.sock.sendall(struct.pack("<4sIQ", MESSAGE_MAGIC, 1, 0) + b"\xc1")
    reply = conn.recv()
    assert reply.kind == protocol.ERROR and "malformed message header" in reply.meta["error"]["message"]
    conn.send(protocol.PING, 5)
    assert (conn.recv().kind, worker.call(add, 1, b=2)) == (protocol.PONG, 3)
    conn.close()


@pytest.mark.parametrize("meta, frames, message", [
    ({"kind": "call"}, [b"\x93\x01\x02\x03"], "not a sourcebox bundle"),
    ({"kind": 3}, [b""], "must be a string"),
    ({"kind": "call", "timeout": -1}, [b""], "positive number"),
    ({"kind": "call"}, [runner.protocol.SharedRef(0, 0, 8)], "file descriptor(s) but its frames use [0]"),
])
def test_hostile_requests_are_refused_with_a_clear_error(worker, meta, frames, message):
    conn = raw_client(worker, timeout=10)
    conn.send(protocol.REQUEST, 9, meta, frames)
    reply = conn.recv()
    assert reply.kind == protocol.ERROR and reply.id == 9
    assert message in reply.meta["error"]["message"]
    conn.close()
    assert worker.call(add, 2, b=2) == 4


def test_only_memfds_sealed_against_shrinking_reach_the_worker(worker):
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)  # shrinking it would SIGBUS the worker
    os.ftruncate(unsealed, 4096)
    left, right = socket.socketpair()  # a socket would give user code a channel out of the sandbox
    conn = raw_client(worker, timeout=10)
    for fd, why in ((unsealed, "file descriptor 0 lacks the seals it must carry"),
                    (left.fileno(), "file descriptor 0 is not a sealable memfd")):
        conn.send(protocol.REQUEST, 9, {"kind": "call"}, [b"\x93", runner.protocol.SharedRef(0, 0, 8)], [fd])
        reply = conn.recv()
        assert reply.kind == protocol.ERROR and "bad request: " + why in reply.meta["error"]["message"]
    os.close(unsealed)
    left.close()
    right.close()
    conn.close()
    assert worker.call(add, 2, b=2) == 4


def test_broken_framing_drops_only_that_connection(worker):
    conn = raw_client(worker, timeout=10)
    conn.sock.sendall(b"GARBAGE-GARBAGE-GARBAGE")
    reply = conn.recv()
    assert reply.kind == protocol.ERROR and "out of step" in reply.meta["error"]["message"]
    with pytest.raises(runner.ProtocolError):
        conn.recv()
    conn.close()
    assert worker.call(add, 5) == 5


def test_a_client_of_another_protocol_version_is_refused(worker):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(worker.socket_path)
    sock.sendall(struct.pack("<8sI", GREETING_MAGIC, PROTOCOL_VERSION + 1))
    magic, version = struct.unpack("<8sI", sock.recv(12, socket.MSG_WAITALL))
    assert (magic, version) == (GREETING_MAGIC, PROTOCOL_VERSION)
    assert sock.recv(1) == b""  # and the server hangs up
    sock.close()
    assert worker.call(add, 1) == 1


def test_a_server_of_another_protocol_version_is_refused_by_the_client(tmp_path):
    path = str(tmp_path / "old.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def old_server():
        for _ in range(2):  # the client's "is anyone listening" probe, then its connection
            conn, _ = listener.accept()
            try:
                conn.sendall(struct.pack("<8sI", GREETING_MAGIC, PROTOCOL_VERSION + 7))
                conn.recv(12)
            except OSError:
                pass  # the probe hangs up at once
            conn.close()

    thread = threading.Thread(target=old_server)
    thread.start()
    with pytest.raises(runner.ProtocolVersionError) as caught:
        runner.Worker(socket=path)
    thread.join()
    assert f"protocol {PROTOCOL_VERSION}" in str(caught.value) and f"speaks {PROTOCOL_VERSION + 7}" in str(caught.value)
    listener.close()


# -- the executor ------------------------------------------------------------------------

def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def test_executor_futures_work_with_wait_as_completed_and_map(worker):
    with runner.SandboxExecutor(worker=worker, max_in_flight=2) as executor:
        futures = [executor.submit(add, n, b=1) for n in range(6)]
        done, not_done = concurrent.futures.wait(futures, timeout=30)
        assert not not_done and sorted(f.result() for f in done) == [1, 2, 3, 4, 5, 6]
        assert sorted(f.result() for f in concurrent.futures.as_completed(futures)) == [1, 2, 3, 4, 5, 6]
        assert list(executor.map(add, [1, 2], [10, 20])) == [11, 22]
        with pytest.raises(ZeroDivisionError):
            executor.submit(divmod, 1, 0).result()


def test_executor_cancels_queued_work_but_not_running_work(worker):
    executor = runner.SandboxExecutor(worker=worker)
    running = executor.submit(sleep_then, 0.5, "ran")
    queued = [executor.submit(add, n) for n in range(3)]
    deadline = time.monotonic() + 10
    while not running.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not running.cancel()
    assert queued[-1].cancel() and queued[-1].cancelled()
    executor.shutdown(wait=True, cancel_futures=True)
    assert running.result() == "ran"
    assert all(f.cancelled() or f.result() == n for n, f in enumerate(queued))
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(add, 1)
    assert worker.call(add, 3) == 3  # a borrowed worker stays open
