"""Faults and fairness with real processes: kill -9 of the worker, of a client and of the
server; clean stops; timeouts and memory limits; several client processes at once.
After each, nothing of the dead process remains: no name in /dev/shm, and no memfd of
its messages still held (by descriptor or mapping) by a survivor that is done with it."""
import glob
import re
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

import runner
from runner_support import wait_until

POLICY = "nnsight-local"
SHM_DIR = "/dev/shm"

CLIENT_SCRIPT = textwrap.dedent('''\
    import sys
    import time

    import torch

    import runner


    def slow(seconds, tensor):
        time.sleep(seconds)
        return float(tensor.sum())


    def echo(value):
        return value


    mode, path = sys.argv[1], sys.argv[2]
    with runner.Worker(socket=path) as worker:
        if mode == "slow":  # a large argument (in our shared memory), then a long request
            print("calling", flush=True)
            print(worker.call(slow, float(sys.argv[3]), torch.ones(1 << 20)), flush=True)
        else:
            for i in range(int(sys.argv[3])):
                tensor = torch.full((1 << 16,), float(i))
                assert torch.equal(worker.call(echo, tensor), tensor)
            print("ok", flush=True)
    ''')


def shm_names(*pids):
    """Names in /dev/shm that these processes could have left (any name holding one of
    their pids; other test runs on this machine may own the rest)."""
    tokens = {str(pid) for pid in pids}
    return sorted(name for name in os.listdir(SHM_DIR) if tokens & set(re.split(r"[^0-9]", name)))


def memfds(pid):
    """The transport's memfds that process ``pid`` holds, by descriptor or by mapping."""
    held = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("/memfd:sourcebox"):
                held.append(f"fd {fd}: {link}")
        with open(f"/proc/{pid}/maps") as maps:
            held += [line.strip() for line in maps if "/memfd:sourcebox" in line]
    except (FileNotFoundError, ProcessLookupError):
        return []  # gone, and everything it held with it
    return held


def hold_memfd(nbytes, seconds):
    os = __import__("torch").save.__builtins__["__import__"]("os")  # past the Python layer, as any user code can
    fd = os.memfd_create("hoard")
    chunk = b"x" * (1 << 20)
    for _ in range(nbytes >> 20):
        os.write(fd, chunk)  # never mapped: in no RSS
    time.sleep(seconds)
    return os.fstat(fd).st_size


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def big_tensor(n):
    return torch.ones(n)


def hold_memory(nbytes, seconds):
    block = bytearray(nbytes)  # zero-filled: every page is touched
    time.sleep(seconds)
    return len(block)


def tagged(tag, seconds):
    time.sleep(seconds)
    return tag, time.monotonic()


@pytest.fixture
def client_script(tmp_path):
    path = tmp_path / "client_proc.py"
    path.write_text(CLIENT_SCRIPT)
    return path


def spawn_client(script, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)




def test_kill_9_of_the_worker_fails_the_running_request_and_serves_the_queue(client_script):
    with runner.Worker(model="none", policy=POLICY) as worker:
        status = worker.status()
        old_pid = status["worker_pid"]
        kept = worker.call(big_tensor, 1 << 20)  # a result mapped from the worker's sealed memfd
        assert memfds(os.getpid())
        # Both close their copies right after sending it on.
        wait_until(lambda: memfds(old_pid) == [] and memfds(status["server_pid"]) == [],
                   what="the worker and the server to let go of the result")
        running = worker.submit(sleep_for, 60)
        wait_until(lambda: worker.status()["running"], what="the request to start")
        others = [spawn_client(client_script, "many", worker.socket_path, 5) for _ in range(2)]
        wait_until(lambda: worker.status()["clients"] >= 3, what="the other clients to connect")
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(runner.WorkerCrashed) as caught:
            running.result(timeout=60)
        assert caught.value.returncode == -signal.SIGKILL and "signal 9 (SIGKILL)" in str(caught.value)
        for other in others:
            out, err = other.communicate(timeout=120)
            assert other.returncode == 0 and out.strip() == "ok", err
        status = worker.status()
        assert status["restarts"] == 1 and status["worker_pid"] != old_pid
        assert shm_names(old_pid, status["server_pid"], os.getpid()) == []
        assert torch.all(kept == 1)  # our mapping outlives the worker that wrote it
        assert worker.call(sleep_for, 0) == 0
        wait_until(lambda: memfds(status["worker_pid"]) == [] and memfds(status["server_pid"]) == [],
                   what="the new worker and the server to hold no memfd")


def test_kill_9_of_a_client_mid_request_leaves_no_segment_and_disturbs_no_one(client_script):
    with runner.Worker(model="none", policy=POLICY) as worker:
        victim = spawn_client(client_script, "slow", worker.socket_path, 2)
        assert victim.stdout.readline().strip() == "calling"
        status = worker.status()
        wait_until(lambda: memfds(status["worker_pid"]), what="the victim's request to run with its memfd")
        victim.kill()
        victim.communicate()
        assert worker.call(sleep_for, 0) == 0  # after the victim's request: the worker let go of it
        wait_until(lambda: memfds(status["worker_pid"]) == [] and memfds(status["server_pid"]) == [],
                   what="the worker and the server to hold nothing of the victim's")
        assert shm_names(victim.pid, status["worker_pid"], status["server_pid"]) == []
        wait_until(lambda: worker.status()["clients"] == 1, what="the client to be forgotten")
        assert worker.status()["restarts"] == 0


def test_clean_stop_leaves_nothing_behind():
    worker = runner.Worker(model="none", policy=POLICY)
    result = worker.call(big_tensor, 1 << 20)
    assert worker.call(sleep_for, 0) == 0
    status = worker.status()
    worker.close()
    assert shm_names(status["worker_pid"], status["server_pid"], os.getpid()) == []
    assert not os.path.exists(worker.socket_path)
    assert torch.all(result == 1)


def test_close_fails_waiting_requests_as_stopped_and_leaves_no_thread_running():
    with runner.Worker(model="none", policy=POLICY) as server:
        client = runner.Worker(socket=server.socket_path)  # closing it leaves the server up
        running = client.submit(sleep_for, 2)
        wait_until(lambda: client.status()["running"], what="the request to start")
        client.close()
        with pytest.raises(runner.WorkerStopped, match="closed before this request finished"):
            running.result(timeout=30)
        # A thread of ours alive at interpreter exit could make torch abort the process.
        assert not client._link._reader.is_alive()
        assert server.call(sleep_for, 0) == 0


def test_kill_9_of_the_server_takes_the_worker_along_the_client_cleans_up_and_starts_another(tmp_path, monkeypatch):
    # A private temporary directory: any other server starting on this machine would sweep
    # the orphaned scratch directory this test watches.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    worker = runner.Worker(model="none", policy=POLICY)
    try:
        worker_pid = worker.status()["worker_pid"]
        kept = worker.call(big_tensor, 1 << 20)
        running = worker.submit(sleep_for, 60)
        wait_until(lambda: worker.status()["running"], what="the request to start")
        os.kill(worker.server_pid, signal.SIGKILL)
        with pytest.raises(runner.WorkerCrashed, match="lost the connection"):
            running.result(timeout=30)
        wait_until(lambda: not os.path.exists(f"/proc/{worker_pid}/fd"), what="the worker to die with its server")
        # Nobody had anything to sweep: the memfds died with their holders.
        assert shm_names(worker_pid, worker.server_pid, os.getpid()) == []
        assert torch.all(kept == 1)
        # Nobody was left to remove the dead server's worker scratch: the next server does,
        # which this Worker starts on its next call.
        dead_server = worker.server_pid
        orphaned = glob.glob(os.path.join(tempfile.gettempdir(), f"sourcebox-scratch-{dead_server}-*"))
        assert orphaned, "the killed server's worker scratch directory should still be there"
        assert worker.call(sleep_for, 0) == 0
        assert worker.server_pid != dead_server
        assert not any(os.path.exists(path) for path in orphaned)
    finally:
        worker.close()


def test_a_request_past_its_timeout_kills_and_restarts_the_worker():
    with runner.Worker(model="none", policy=POLICY, timeout=1.0) as worker:
        old_pid = worker.status()["worker_pid"]
        started = time.monotonic()
        with pytest.raises(runner.RequestTimeout, match="time limit"):
            worker.call(sleep_for, 60)
        assert time.monotonic() - started < 20
        assert worker.call(sleep_for, 0.1) == 0.1
        status = worker.status()
        assert status["restarts"] == 1 and status["worker_pid"] != old_pid
        assert shm_names(old_pid) == []


def test_memory_past_the_limit_kills_and_restarts_the_worker():
    limit = 1 << 30
    with runner.Worker(model="none", policy=POLICY, memory_limit=limit) as worker:
        assert worker.call(hold_memory, 1 << 20, 0) == 1 << 20
        with pytest.raises(runner.MemoryLimitExceeded, match="memory limit of 1024 MiB"):
            worker.call(hold_memory, 2 * limit, 30)
        assert worker.call(hold_memory, 1 << 20, 0) == 1 << 20
        assert worker.status()["restarts"] == 1


def test_memfd_memory_counts_against_the_memory_limit():
    limit = 512 << 20
    with runner.Worker(model="none", policy=POLICY, memory_limit=limit) as worker:
        assert worker.call(hold_memfd, 16 << 20, 0) == 16 << 20
        with pytest.raises(runner.MemoryLimitExceeded, match="RSS and memfds .* past the memory limit of 512 MiB"):
            worker.call(hold_memfd, limit, 30)
        assert worker.status()["restarts"] == 1


def test_several_client_processes_at_once(client_script):
    with runner.Worker(model="none", policy=POLICY) as worker:
        clients = [spawn_client(client_script, "many", worker.socket_path, 20) for _ in range(3)]
        for client in clients:
            out, err = client.communicate(timeout=120)
            assert client.returncode == 0 and out.strip() == "ok", err
        assert worker.status()["served"] >= 60
        assert shm_names(*(client.pid for client in clients)) == []


def test_queued_requests_are_taken_round_robin_across_clients():
    with runner.Worker(model="none", policy=POLICY) as first:
        with runner.Worker(socket=first.socket_path) as second:
            busy = [first.submit(tagged, f"first-{n}", 0.2) for n in range(5)]
            wait_until(lambda: first.status()["queued"] >= 4, what="the first client's queue")
            late = second.submit(tagged, "second", 0.0)
            finished = sorted([f.result(timeout=60) for f in busy] + [late.result(timeout=60)],
                              key=lambda pair: pair[1])
            order = [tag for tag, _ in finished]
            # One of the first client's requests runs, then the second client's turn comes
            # before the first client's queue is drained.
            assert order.index("second") <= 2, order
