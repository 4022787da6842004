"""The server survives what a request, a reply or a connection contains (issue 11, server
side). Real servers (``python -m runner serve``), real client processes and hand-written
raw-protocol clients; each case is judged by effect: the server still accepts and serves a
well-behaved client in another process, its memory stays bounded (psutil), a client gets
the error it should. Limits are set small through ``serve`` options so each case is quick."""
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import capture
import sandbox
import msgpack
import psutil
import pytest

import runner
from runner import auth, child, protocol, supervisor
from runner.protocol import GREETING_MAGIC, MESSAGE_MAGIC, PROTOCOL_VERSION
from runner_support import raw_client

POLICY = "nnsight-local"
MiB = 1 << 20


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def echo(value):
    return value


def print_then_sleep(nbytes, seconds):
    print("x" * nbytes, end="", flush=True)  # no newline
    time.sleep(seconds)


def raise_huge_message(nbytes):
    raise ValueError("x" * nbytes)


def raise_huge_int():
    raise ValueError(2 ** 70)


def many_frames(count):
    import torch
    return [torch.zeros(1) for _ in range(count)]


def print_long_lines(nbytes, lines):
    block = "y" * (1 << 20)
    for _ in range(lines):
        for _ in range(nbytes >> 20):
            print(block, end="")
        print()
    print("\x1b[31mRED\x1b[0m\rover", flush=True)
    return "printed"


def torch_threads():
    import torch
    return torch.get_num_threads()


# A well-behaved client in a process of its own: it connects, calls, and prints the result.
GOOD_CLIENT = textwrap.dedent('''\
    import sys
    import runner


    def add_one(value):
        return value + 1


    with runner.Worker(socket=sys.argv[1]) as worker:
        print(sum(worker.call(add_one, n) for n in range(int(sys.argv[2]))), flush=True)
    ''')


def child_env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def served(path, calls=3, timeout=120):
    """Whether a separate client process connects to ``path`` and gets correct answers."""
    script = os.path.join(os.path.dirname(path), "good_client.py")
    with open(script, "w") as file:
        file.write(GOOD_CLIENT)
    done = subprocess.run([sys.executable, script, path, str(calls)], env=child_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return int(done.stdout) == sum(n + 1 for n in range(calls))


def wait_until(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Server:
    """``python -m runner serve`` with the given options; its log goes to a file."""

    def __init__(self, directory, *options, model="none", env=None):
        self.path = str(directory / "w.sock")
        self.log_path = directory / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "serve", "--socket", self.path, "--model", model, "--policy", POLICY,
             *map(str, options)], env=env or child_env(), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT)
        wait_until(lambda: os.path.exists(self.path) or self.proc.poll() is not None, 60, "the server to listen")
        assert self.proc.poll() is None, self.log()
        self.socket_path = self.path  # what runner_support.raw_client expects

    @property
    def pid(self):
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(*options, **kwargs):
        server = Server(tmp_path, *options, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def request_frames(fn, *args):
    bundle = capture.encode_variables({"fn": fn, "args": args, "kwargs": {}},
                                      policy=sandbox.Policy.load(POLICY))
    return [bundle.header, *bundle.frames]


def answer(conn):
    message = conn.recv()
    message.close()
    return message


# -- 1. the supervisor survives what a request, a reply or a connection contains ----------

def test_a_failure_with_huge_output_or_a_huge_error_text_is_cut_and_the_server_serves_on(serve):
    server = serve("--timeout", "3")
    with runner.Worker(socket=server.path) as worker:
        # 20 MiB without a newline, then killed by the timeout: the failure's output tail.
        with pytest.raises(runner.RequestTimeout) as caught:
            worker.call(print_then_sleep, 20 * MiB, 60)
        assert "more bytes of this line cut" in caught.value.stderr_tail
        assert len(str(caught.value)) < 256 << 10
        # An error text of 20 MiB: the worker's error reply.
        with pytest.raises(ValueError, match=r"more characters cut\]$") as caught:
            worker.call(raise_huge_message, 20 * MiB)
        assert len(str(caught.value)) < 128 << 10
        assert worker.status()["restarts"] == 1  # the timeout's; the error cost no restart
    assert served(server.path)
    assert server.proc.poll() is None


def test_a_request_header_near_the_limit_fails_alone(serve):
    server = serve()
    conn = raw_client(server)
    frames = request_frames(echo, 1)
    # The supervisor forwards the kind: a 15 MiB one would not fit the worker's header.
    conn.send(protocol.REQUEST, 1, {"kind": "k" * (15 * MiB), "form": "frames"}, frames)
    refused = answer(conn)
    assert refused.kind == protocol.ERROR and "must be a string of 1 to 256 characters" in refused.meta["error"]["message"]
    # Metadata the supervisor does not forward may be large: the request runs.
    conn.send(protocol.REQUEST, 2, {"kind": "call", "form": "frames", "note": "n" * (15 * MiB)}, frames)
    assert answer(conn).kind == protocol.REPLY
    conn.close()
    assert served(server.path)


def test_a_message_declaring_a_huge_size_gets_memory_only_for_the_bytes_sent(serve):
    server = serve("--max-queued-bytes", "1G")
    process = psutil.Process(server.pid)
    before = process.memory_info().rss
    conns = []
    for _ in range(3):
        conn = raw_client(server)
        declared = (1 << 30) - 64
        header = msgpack.packb({"k": protocol.REQUEST, "i": 1, "m": {}, "f": [[0, declared]]})
        conn.sock.sendall(struct.pack("<4sIQ", MESSAGE_MAGIC, len(header), declared) + header + b"z" * 10)
        conns.append(conn)
    time.sleep(1.0)  # time to allocate, were it going to
    grown = process.memory_info().rss - before
    assert grown < 64 * MiB, f"the supervisor grew by {grown >> 20} MiB for 3 x 54 bytes"
    assert served(server.path)
    for conn in conns:
        conn.close()


def test_a_connection_that_does_not_finish_its_handshake_is_dropped(serve):
    server = serve("--handshake-timeout", "1")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(server.path)
    silent.settimeout(30)
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(server.path)
    slow.settimeout(30)
    greeting = struct.pack("<8sI", GREETING_MAGIC, PROTOCOL_VERSION)
    received = b""
    for byte in greeting:  # a byte at a time, each within the deadline, never done in time
        try:
            slow.send(bytes([byte]))
        except OSError:
            break
        time.sleep(0.2)
    assert silent.recv(64) == greeting and silent.recv(64) == b""  # the server closed it
    while chunk := slow.recv(64):
        received += chunk
    assert received == greeting
    silent.close()
    slow.close()
    assert served(server.path)


def test_connections_past_the_cap_are_told_the_server_is_busy(serve):
    server = serve("--max-clients", "3")
    with runner.Worker(socket=server.path) as worker:
        idle = [raw_client(server) for _ in range(2)]
        with pytest.raises(runner.ServerBusy, match=r"busy: it serves 3 connections already \(its --max-clients\)"):
            runner.Worker(socket=server.path)
        idle.pop().close()
        wait_until(lambda: worker.status()["clients"] == 2, what="the closed connection to be forgotten")
        assert served(server.path)
        assert worker.call(echo, 5) == 5
        for conn in idle:
            conn.close()


def test_a_client_queueing_more_than_its_share_is_told_the_server_is_busy(serve):
    server = serve("--max-queued-bytes", "1M")
    with runner.Worker(socket=server.path, shm_threshold=64 * MiB) as worker:  # all inline
        running = worker.submit(sleep_for, 4)  # the others queue behind it
        wait_until(lambda: worker.status()["running"], what="the request to start")
        queued = [worker.submit(echo, b"q" * (300 << 10)) for _ in range(5)]
        outcomes = []
        for future in queued:
            try:
                outcomes.append(len(future.result(timeout=60)))
            except runner.ServerBusy as exc:
                assert "--max-queued-bytes" in str(exc)
                outcomes.append("busy")
        assert outcomes[:3] == [300 << 10] * 3 and "busy" in outcomes, outcomes
        assert running.result(timeout=60) == 4
        assert worker.call(echo, b"q" * (300 << 10)) == b"q" * (300 << 10)  # served again once drained
    assert served(server.path)


def test_running_out_of_descriptors_pauses_accepting_instead_of_ending_it(serve):
    server = serve()
    wait_until(lambda: "ready in" in server.log(), 60, "the worker to be ready")
    process = psutil.Process(server.pid)
    limits = process.rlimit(psutil.RLIMIT_NOFILE)
    # 0, 1 and 2 are open (stdin, the log), so no new descriptor fits under 3.
    process.rlimit(psutil.RLIMIT_NOFILE, (3, limits[1]))
    try:
        early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        early.connect(server.path)  # lands in the backlog; accepting it fails with EMFILE
        wait_until(lambda: "accept failed" in server.log(), what="the accept to fail")
    finally:
        process.rlimit(psutil.RLIMIT_NOFILE, limits)
    early.settimeout(30)
    assert early.recv(12) == struct.pack("<8sI", GREETING_MAGIC, PROTOCOL_VERSION)  # accepted after all
    early.close()
    assert served(server.path)


def test_the_stop_of_a_client_that_leaves_at_once_is_not_lost(serve):
    server = serve()
    conn, _, owner = auth.handshake(server.path)  # proves the secret it reads beside the socket
    assert owner
    conn.send(protocol.STOP, 1)
    conn.close()  # before the answer
    assert server.proc.wait(30) == 0
    assert not os.path.exists(server.path)


def test_a_request_without_frames_is_refused_with_a_clear_message(serve):
    server = serve()
    conn = raw_client(server)
    conn.send(protocol.REQUEST, 1, {"kind": "call", "form": "frames"}, [])
    refused = answer(conn)
    assert refused.kind == protocol.ERROR and "at least one frame" in refused.meta["error"]["message"]
    conn.send(protocol.REQUEST, 2, {"kind": "call", "form": "bytes"}, [b"a", b"b"])
    refused = answer(conn)
    assert "bytes form carries one frame" in refused.meta["error"]["message"]
    conn.close()


# -- 2. the worker survives a reply it cannot encode --------------------------------------

def test_an_error_or_result_that_cannot_travel_becomes_a_clear_error_and_the_worker_lives(serve):
    server = serve()
    with runner.Worker(socket=server.path) as worker:
        pid = worker.status()["worker_pid"]
        with pytest.raises(ValueError, match="1180591620717411303424"):
            worker.call(raise_huge_int)  # 2**70: past what msgpack carries
        with pytest.raises(ValueError, match="at most 65536 frames"):
            worker.call(many_frames, 70_000)
        status = worker.status()
        assert status["worker_pid"] == pid and status["restarts"] == 0
        assert worker.call(echo, 7) == 7


# -- 3. no client can stall another --------------------------------------------------------

def stalled_client(server, requests=40):
    """A raw client that sends requests with 100 KB inline answers and reads none."""
    conn = raw_client(server)
    frames = request_frames(echo, b"r" * 100_000)
    for n in range(1, requests + 1):
        conn.send(protocol.REQUEST, n, {"kind": "call", "form": "frames"}, frames)
    return conn


def test_a_client_that_stops_reading_holds_up_no_other_client(serve):
    server = serve("--send-timeout", "600")
    with runner.Worker(socket=server.path) as worker:
        stalled = stalled_client(server)
        wait_until(lambda: worker.status()["served"] >= 40, 120, "the stalled client's requests to run")
        assert served(server.path)  # another process, while the stalled one is still connected
        assert worker.call(echo, 3) == 3
        assert worker.status()["clients"] == 2  # us and the stalled client: nobody gave up on it
        stalled.close()


def test_a_client_that_does_not_read_is_dropped_not_waited_for(serve):
    server = serve("--send-timeout", "1")
    with runner.Worker(socket=server.path) as worker:
        stalled = stalled_client(server)
        wait_until(lambda: worker.status()["clients"] == 1, 120, "the stalled client to be dropped")
        assert "dropped client pid" in server.log()
        stalled.close()
        assert worker.call(echo, 3) == 3


# -- 4. worker output reaches the log bounded and escaped ---------------------------------

def peak_rss(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmHWM:"))


def test_worker_output_is_read_bounded_and_its_control_characters_escaped(serve):
    server = serve()
    with runner.Worker(socket=server.path) as worker:
        before = peak_rss(server.pid)
        assert worker.call(print_long_lines, 64 * MiB, 2) == "printed"
        wait_until(lambda: "over" in server.log(), what="the output to reach the log")
        grown = peak_rss(server.pid) - before
        assert grown < 32 * MiB, f"the supervisor's peak grew by {grown >> 20} MiB for two 64 MiB lines"
    log = server.log()
    assert "\x1b" not in log and "\r" not in log
    assert "\\x1b[31mRED\\x1b[0m\\x0dover" in log
    assert log.count(f"[... {64 * MiB - child.MAX_LINE_CHARS} more bytes of this line cut]") == 2


# -- 5. the server's timeout is a maximum, and a number ------------------------------------

def test_the_servers_timeout_is_a_maximum_a_client_cannot_raise(serve):
    server = serve("--timeout", "1")
    with runner.Worker(socket=server.path, timeout=1000) as worker:
        with pytest.raises(runner.RequestTimeout, match="time limit"):
            worker.call(sleep_for, 60)
        assert worker.call(sleep_for, 0) == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, 0, True, "5"])
def test_a_timeout_that_is_not_a_finite_positive_number_is_refused(value):
    with pytest.raises(ValueError, match="finite positive number of seconds"):
        runner.Worker(socket="/nonexistent/w.sock", model="none", timeout=value)


def test_the_server_refuses_bad_timeouts_from_the_command_line_and_from_a_request(serve, tmp_path):
    for text in ("nan", "inf", "-5", "0"):
        done = subprocess.run([sys.executable, "-m", "runner", "serve", "--socket", str(tmp_path / "x.sock"),
                               "--timeout", text], env=child_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "finite positive number of seconds" in done.stderr, done.stderr
    server = serve()
    conn = raw_client(server)
    for n, value in enumerate([float("nan"), float("inf"), -1.0, True], 1):
        conn.send(protocol.REQUEST, n, {"kind": "call", "form": "frames", "timeout": value}, request_frames(echo, 1))
        refused = answer(conn)
        assert refused.kind == protocol.ERROR and "finite positive number" in refused.meta["error"]["message"]
    conn.close()
    with runner.Worker(socket=server.path) as worker:
        assert worker.status()["timeout"] == supervisor.DEFAULT_TIMEOUT
        with pytest.raises(ValueError, match="finite positive"):
            worker.request("call", None, timeout=float("nan"))


# -- 6. nothing of torch's is left in the temporary directory ------------------------------

def test_the_worker_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    with runner.Worker(model="tiny-gpt2", policy=POLICY) as worker:
        assert worker.call(echo, 1) == 1
        assert not [name for name in os.listdir(temporary) if name.startswith("torchinductor")]
    assert os.listdir(temporary) == []


# -- 7. the worker's thread budget ---------------------------------------------------------

def test_the_workers_torch_threads_follow_the_budget():
    with runner.Worker(model="none", policy=POLICY, threads=2) as worker:
        assert worker.call(torch_threads) == 2
        assert worker.status()["threads"] == 2
    with runner.Worker(model="none", policy=POLICY) as worker:
        default = max(1, len(os.sched_getaffinity(0)) // 2)
        assert worker.call(torch_threads) == default
