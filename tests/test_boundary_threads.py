"""The worker's threads, identity and lifetime, tried as an attacker would, judged by effect.

Each attack is user code shipped as source to a real server (``runner.Worker``: the
supervisor and its sandboxed worker process) from a user module the worker cannot import,
and each has a CONTROL that shows the same attack has its effect when the layer meant to
stop it is off: a minimal child that starts a library thread before
``sandbox.enter(confine="best-effort")``, or a server with ``confine="off"`` (test-only).

* threads: a thread that exists before ``enter`` keeps full rights (Landlock, capabilities
  and no-new-privs are per thread); tqdm's monitor thread, which the model load starts, is
  hijacked through ``threading.enumerate()`` to write outside scratch and read a file;
* every task of the worker is confined;
* identity: a root worker runs as an unprivileged user (the supervisor's memory, signals to
  it, root-owned files in scratch);
* tasks: a request starting 2,000 threads meets ``RLIMIT_NPROC`` and the worker serves on;
* lifetime: a worker whose request clears its parent-death signal still dies with its
  supervisor.
"""

from __future__ import annotations

import json
import errno
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

import runner
import sandbox
from runner_support import environment, user_modules


@pytest.fixture(scope="module", autouse=True)
def _without_hygiene():
    """These attacks leave threads, files and hooks in the worker on purpose, to test
    confinement alone: with its hygiene on (``runner.hygiene``) the worker would retire
    after each of them, before the next request could find what was left."""
    with environment(SOURCEBOX_TEST_NO_HYGIENE="1"):
        yield


REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0
THREADS_TO_START = 2000

# The attacker's module: shipped as source (the worker cannot import it). Hooks that must
# run in another thread reach that thread's loop through the objects it looks up.
ATTACKS = '''\
import os
import sys
import threading
import time


def mremap_dontunmap():
    """Keep a second view of a mapping while its owner unmaps it (found in review: a
    left-behind thread kept a client's request memory this way). The errno, 0 on success."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = libc.mremap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
    size = 4096
    address = libc.mmap(None, size, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    moved = libc.mremap(address, size, size, 1 | 4, None)  # MREMAP_MAYMOVE | MREMAP_DONTUNMAP
    return 0 if moved != ctypes.c_void_p(-1).value else ctypes.get_errno()


def start_progress_bar():
    """What a library's progress bar does in the worker (transformers' "Loading weights"
    bar did it during the load before the load was quieted): tqdm starts its monitor
    thread, which outlives the bar."""
    import tqdm

    tqdm.tqdm.monitor_interval = 10
    tqdm.tqdm(total=1).close()
    return [thread.name for thread in threading.enumerate()]


def hijack_threads(marker, secret_path):
    """Run code in every other Python thread that can be reached. tqdm's monitor thread
    looks up ``self.was_killed`` each round: replacing it hands its next step to us."""
    me = threading.get_ident()
    done = threading.Event()
    results = {}

    class Hook:
        def __init__(self, thread):
            self.thread = thread

        def is_set(self):
            outcome = {"tid": threading.get_native_id()}
            try:
                with open(marker, "w") as out:
                    out.write("written by a hijacked thread")
                outcome["write"] = "written"
            except OSError as error:
                outcome["write"] = type(error).__name__
            try:
                outcome["secret"] = open(secret_path).read()
            except OSError as error:
                outcome["secret"] = type(error).__name__
            results[self.thread.name] = outcome
            done.set()
            return True  # the monitor's loop ends

        def wait(self, timeout=None):
            return self.is_set()

    others = [thread for thread in threading.enumerate() if thread.ident != me]
    for thread in others:
        event = getattr(thread, "was_killed", None)
        if isinstance(event, threading.Event):
            thread.was_killed = Hook(thread)
            event.set()  # wake it now: it asks the hook next
    done.wait(30)
    return {"threads": [thread.name for thread in others], "hijacked": results,
            "caller_tid": threading.get_native_id()}


def supervisor_memory():
    """Read the supervisor's initial environment block through /proc/<pid>/mem."""
    parent = os.getppid()
    with open("/proc/%d/stat" % parent) as status:
        fields = status.read().rpartition(")")[2].split()
    start, end = int(fields[47]), int(fields[48])
    try:
        with open("/proc/%d/mem" % parent, "rb") as memory:
            memory.seek(start)
            return memory.read(end - start).decode("latin-1")
    except OSError as error:
        return type(error).__name__


def signal_supervisor():
    import signal
    try:
        os.kill(os.getppid(), signal.SIGTERM)
    except OSError as error:
        return type(error).__name__
    return "sent"


def append_to(path):
    try:
        with open(path, "a") as out:
            out.write("changed by the worker")
    except OSError as error:
        return type(error).__name__
    return "written"


def start_threads(count):
    """Start ``count`` threads that wait forever; raises when the kernel refuses one."""
    threading.stack_size(256 << 10)
    hold = threading.Event()
    for _ in range(count):
        threading.Thread(target=hold.wait, daemon=True).start()
    return count


def forward(model, ids):
    import torch

    with torch.no_grad():
        return model._module(torch.tensor([ids])).logits[0, -1].tolist()


def matmul_and_forward(model):
    """Parallel work for torch's thread pool: a large element-wise op, then a forward pass."""
    import torch

    torch.zeros(1 << 22).add_(1)
    with torch.no_grad():
        return model._module(torch.tensor([[1, 2, 3] * 20])).logits[0, -1].tolist()


def clear_death_signal_then(seconds):
    """prctl(PR_SET_PDEATHSIG, 0), then stay busy (not reading the channel); a file in
    scratch (the working directory) says when."""
    import torch
    ctypes = torch.save.__builtins__["__import__"]("ctypes")
    cleared = ctypes.CDLL(None, use_errno=True).prctl(1, 0, 0, 0, 0)
    open("busy", "w").close()
    time.sleep(seconds)
    return cleared
'''


@pytest.fixture(scope="module")
def attacks(tmp_path_factory):
    """The attacker's module, imported on the client from a directory the worker cannot see."""
    with user_modules(tmp_path_factory.mktemp("attacker"), boundary_attacks=ATTACKS) as module:
        yield module


@pytest.fixture(scope="module")
def targets():
    """A world-writable directory with a world-readable secret: only Landlock keeps an
    unprivileged worker out of it (mode bits and uids would not)."""
    directory = Path(tempfile.mkdtemp(prefix="sourcebox-boundary-"))
    directory.chmod(0o777)
    secret = directory / "secret.txt"
    secret.write_text("boundary-secret-" + os.urandom(8).hex())
    secret.chmod(0o644)
    yield directory, secret
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def _start(confine: str, **variables: str) -> runner.Worker:
    with environment(**variables):
        # Two torch threads whatever the machine's default budget: the pool's threads are
        # among the tasks these tests check.
        return runner.Worker(model="tiny-gpt2", confine=confine, timeout=120, threads=2)


SUPERVISOR_SECRET = "supervisor-secret-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def confined():
    worker = _start("required", SOURCEBOX_BOUNDARY_SECRET=SUPERVISOR_SECRET)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def unconfined():
    """The control server: ``confine="off"`` (the Python layer only)."""
    worker = _start("off", SOURCEBOX_BOUNDARY_SECRET=SUPERVISOR_SECRET)
    yield worker
    worker.close()


def _task_status(pid: int) -> dict[int, dict[str, str]]:
    tasks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        tasks[int(tid)] = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return tasks


def _gone(pid: int, within: float) -> bool:
    """Has ``pid`` ended (exited or left as a zombie) within ``within`` seconds?"""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


# ------------------------------------------------------------------------------ threads

CHILD = """
import io, json, sys
import tqdm
import sandbox

bar = tqdm.tqdm(total=10, file=io.StringIO())  # a library's progress bar: starts tqdm's monitor thread
sys.path.insert(0, {attacker_dir!r})
import boundary_attacks
try:
    report = sandbox.enter("default", scratch={scratch!r}, confine={confine!r})
except sandbox.ConfinementUnavailable as error:
    print(json.dumps({{"refused": str(error), "layer": error.layer}}))
    sys.exit(0)
print(json.dumps({{"report": report.as_dict(),
                   "attack": boundary_attacks.hijack_threads({marker!r}, {secret!r})}}))
"""


def _child(tmp_path: Path, attacks, confine: str, marker: Path, secret: Path) -> dict:
    script = tmp_path / f"child_{confine}.py"
    script.write_text(textwrap.dedent(CHILD.format(
        attacker_dir=str(Path(attacks.__file__).parent), scratch=str(tmp_path / f"scratch-{confine}"),
        confine=confine, marker=str(marker), secret=str(secret))))
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                               env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_control_a_thread_started_before_enter_is_hijacked_to_write_and_read(tmp_path, attacks, targets):
    directory, secret = targets
    marker = directory / "marker-control"
    result = _child(tmp_path, attacks, "best-effort", marker, secret)
    layers = result["report"]["layers"]
    assert layers["threads"]["status"] == "unavailable" and "tqdm_monitor" in layers["threads"]["detail"]
    hijacked = result["attack"]["hijacked"]
    assert list(hijacked) == ["tqdm_monitor"], result["attack"]
    assert hijacked["tqdm_monitor"]["tid"] != result["attack"]["caller_tid"]
    # The effect: the hijacked thread wrote outside scratch and read the secret.
    assert marker.read_text() == "written by a hijacked thread"
    assert hijacked["tqdm_monitor"]["secret"] == secret.read_text()
    marker.unlink()


def test_required_refuses_when_a_thread_exists_and_names_it(tmp_path, attacks, targets):
    directory, secret = targets
    marker = directory / "marker-required"
    result = _child(tmp_path, attacks, "required", marker, secret)
    assert result["layer"] == "threads"
    assert "tqdm_monitor" in result["refused"] and "1 thread(s) besides the caller" in result["refused"]
    assert not marker.exists()


def test_the_workers_library_threads_cannot_be_hijacked_out_of_the_sandbox(confined, attacks, targets):
    directory, secret = targets
    marker = directory / "marker-worker"
    assert confined.call(attacks.start_progress_bar).count("tqdm_monitor") == 1
    result = confined.call(attacks.hijack_threads, str(marker), str(secret))
    # tqdm's monitor started after enter(), as every library thread now does: it inherited every layer.
    assert "tqdm_monitor" in result["threads"], result
    outcome = result["hijacked"]["tqdm_monitor"]
    assert outcome["tid"] != result["caller_tid"]  # the code did run in the other thread
    assert outcome["write"] == "PermissionError" and outcome["secret"] == "PermissionError", outcome
    assert not marker.exists()
    assert secret.read_text() not in json.dumps(result)


def test_every_task_of_the_worker_is_confined(confined, attacks):
    confined.call(attacks.forward, runner.MODEL, [1, 2, 3])  # torch's pool starts now, if not before
    info = confined.status()
    pid = info["worker_pid"]
    assert "threads       active" in info["sandbox"], info["sandbox"]
    tasks = _task_status(pid)
    assert len(tasks) >= 2, tasks  # the main thread and the threads started after enter()
    for tid, status in tasks.items():
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", (tid, status)
        if ROOT:
            assert int(status["CapEff"], 16) == 1 << 2, (tid, status["CapEff"])  # CAP_DAC_READ_SEARCH only
            assert status["Uid"].split() == [str(sandbox.confine.UNPRIVILEGED_UID)] * 4, (tid, status["Uid"])
            assert status["Gid"].split() == [str(sandbox.confine.UNPRIVILEGED_GID)] * 4, (tid, status["Gid"])
        else:
            assert int(status["CapEff"], 16) == 0, (tid, status["CapEff"])


def test_a_model_built_at_first_use_leaves_no_thread_behind(tmp_path, attacks):
    """Building the embedded model starts threads (tokenizers' pool, a progress bar): the
    worker builds it in a child process, so a confined worker still starts on a fresh cache."""
    worker = _start("required", SOURCEBOX_CACHE=str(tmp_path / "cache"))
    try:
        assert list((tmp_path / "cache" / "models").iterdir())  # built by this start
        assert "threads       active" in worker.status()["sandbox"]
        assert len(worker.call(attacks.forward, runner.MODEL, [1, 2])) == 512
    finally:
        worker.close()


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize("setting", ["confined", "control"])
def test_the_worker_cannot_read_the_supervisors_memory(setting, confined, unconfined, attacks):
    worker = confined if setting == "confined" else unconfined
    seen = worker.call(attacks.supervisor_memory)
    if setting == "confined":
        assert SUPERVISOR_SECRET not in seen and seen == "PermissionError", seen[:200]
    else:
        assert SUPERVISOR_SECRET in seen  # the control: the same read works without the layers


@pytest.mark.skipif(not ROOT, reason="the worker changes its uid only when the server runs as root")
@pytest.mark.parametrize("setting", ["confined", "control"])
def test_root_owned_files_in_scratch_stay_unwritten(setting, confined, unconfined, attacks):
    """Landlock lets the worker write anywhere in scratch; only the uid change keeps it
    out of a root-owned file there."""
    worker = confined if setting == "confined" else unconfined
    scratch = Path(os.readlink(f"/proc/{worker.status()['worker_pid']}/cwd"))
    planted = scratch / f"root-owned-{setting}.txt"
    planted.write_text("root's\n")
    planted.chmod(0o644)
    assert planted.stat().st_uid == 0
    answer = worker.call(attacks.append_to, str(planted))
    if setting == "confined":
        assert answer == "PermissionError" and planted.read_text() == "root's\n"
    else:
        assert answer == "written" and planted.read_text() == "root's\nchanged by the worker"


# -------------------------------------------------------------------------------- tasks

VICTIM = """
import json, sys
sys.path.insert(0, {attacker_dir!r})
import runner, boundary_attacks
with runner.Worker(socket={socket!r}) as worker:
    print(json.dumps(worker.call(boundary_attacks.forward, runner.MODEL, [5, 6, 7])))
"""


def _victim(worker: runner.Worker, attacks) -> list[float]:
    completed = subprocess.run(
        [sys.executable, "-c", VICTIM.format(attacker_dir=str(Path(attacks.__file__).parent),
                                             socket=worker.socket_path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_thousands_of_threads_meet_the_task_bound_and_the_worker_serves_on(confined, attacks):
    expected = confined.call(attacks.forward, runner.MODEL, [5, 6, 7])
    pid = confined.status()["worker_pid"]
    with pytest.raises(RuntimeError, match="can't start new thread"):
        confined.call(attacks.start_threads, THREADS_TO_START)
    started = len(os.listdir(f"/proc/{pid}/task"))
    assert started <= sandbox.confine.MAX_TASKS < THREADS_TO_START
    assert confined.status()["worker_pid"] == pid  # the same worker, still up
    assert _victim(confined, attacks) == expected  # another client gets a correct result


def test_a_request_exhausting_the_bound_first_leaves_torch_working(attacks):
    """On a fresh worker, the first request uses up the task bound: torch's thread pool was
    started with the worker, so the next request's parallel work needs no new thread
    (libgomp ends the process when it cannot create one)."""
    worker = _start("required")
    try:
        pid = worker.status()["worker_pid"]
        with pytest.raises(RuntimeError, match="can't start new thread"):
            worker.call(attacks.start_threads, THREADS_TO_START)
        assert len(worker.call(attacks.matmul_and_forward, runner.MODEL)) == 512
        assert worker.status()["worker_pid"] == pid
    finally:
        worker.close()


def test_control_without_the_bound_every_thread_starts(unconfined, attacks):
    pid = unconfined.status()["worker_pid"]
    assert unconfined.call(attacks.start_threads, THREADS_TO_START) == THREADS_TO_START
    assert len(os.listdir(f"/proc/{pid}/task")) > THREADS_TO_START


# Last for both servers: the control's supervisor does not survive it.
@pytest.mark.parametrize("setting", ["confined", "control"])
def test_the_worker_cannot_signal_the_supervisor(setting, confined, unconfined, attacks):
    worker = confined if setting == "confined" else unconfined
    server = psutil.Process(worker.status()["server_pid"])
    answer = worker.call(attacks.signal_supervisor)
    if setting == "confined":
        assert answer == "PermissionError"
        assert server.is_running() and worker.call(attacks.forward, runner.MODEL, [1])  # still serving
    else:
        assert answer == "sent"
        assert _gone(server.pid, within=60), "the control supervisor survived SIGTERM from its worker"


# ----------------------------------------------------------------------------- lifetime


def _kill_supervisor_during(worker: runner.Worker, attacks, busy_seconds: float) -> tuple[int, int | None]:
    """Send a request that clears the parent-death signal and stays busy, then kill -9 the
    supervisor. Returns the worker's pid and what prctl returned (None: no reply came)."""
    info = worker.status()
    busy = Path(os.readlink(f"/proc/{info['worker_pid']}/cwd")) / "busy"
    outcome: dict = {}

    def send() -> None:
        try:
            outcome["cleared"] = worker.call(attacks.clear_death_signal_then, busy_seconds)
        except Exception as error:  # the server is killed under the call
            outcome["error"] = error

    caller = threading.Thread(target=send)
    caller.start()
    if busy_seconds:
        deadline = time.monotonic() + 60  # until the request runs: the worker is not reading its channel
        while not busy.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    else:
        caller.join()
    os.kill(info["server_pid"], signal.SIGKILL)
    caller.join(timeout=60)
    return info["worker_pid"], outcome.get("cleared")


def test_the_worker_dies_with_its_supervisor_even_if_it_clears_pdeathsig(attacks):
    worker = _start("required")
    try:
        pid, _ = _kill_supervisor_during(worker, attacks, busy_seconds=600)
        assert _gone(pid, within=30), "the confined worker outlived its supervisor"
    finally:
        worker.close()


def test_control_a_busy_worker_that_cleared_pdeathsig_outlives_its_supervisor(attacks):
    worker = _start("off")
    pid = None
    try:
        pid, _ = _kill_supervisor_during(worker, attacks, busy_seconds=600)
        assert not _gone(pid, within=5), "without the seccomp rule the worker should outlive its supervisor"
    finally:
        if pid is not None and psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)
        worker.close()


def test_an_idle_worker_exits_when_its_channel_closes(attacks):
    """Without the parent-death signal (cleared where the filter is off), the end of the
    channel alone ends an idle worker."""
    worker = _start("off")
    pid = None
    try:
        pid, cleared = _kill_supervisor_during(worker, attacks, busy_seconds=0)
        assert cleared == 0  # prctl succeeded: only the channel's end can stop it now
        assert _gone(pid, within=30), "the idle worker did not exit at the end of its channel"
    finally:
        if pid is not None and psutil.pid_exists(pid) and not _gone(pid, within=0.1):
            os.kill(pid, signal.SIGKILL)
        worker.close()


def test_a_second_view_that_outlives_an_unmap_is_refused(confined, unconfined, attacks):
    assert confined.call(attacks.mremap_dontunmap) == errno.EPERM
    assert unconfined.call(attacks.mremap_dontunmap) == 0  # CONTROL: without seccomp it works
