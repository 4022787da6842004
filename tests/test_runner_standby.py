"""The standby worker (issue 15): started ahead and confined exactly like the first, it
serves the next call after a crash once promoted."""
import importlib
import os
import subprocess
import sys
import time

import pytest

import runner

from runner.owned_server import listening
from runner_support import wait_until

MODULE = "standby_helpers"
HELPERS = '''
import os
import signal


def write(path):
    try:
        with open(path, "w") as handle:
            handle.write("escaped")
        return "written"
    except OSError as error:
        return type(error).__name__


def crash():
    os.kill(os.getpid(), signal.SIGKILL)


def pid():
    return os.getpid()
'''
# What the kernel says about a process's confinement (Landlock is judged by effect).
CONFINEMENT_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
                      "Seccomp", "Seccomp_filters")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    directory = tmp_path_factory.mktemp("standby")
    (directory / f"{MODULE}.py").write_text(HELPERS)
    # Everything allowed but the helpers (they travel as source): the OS layers alone decide.
    (directory / "allow-all.toml").write_text(
        f'name = "allow-all"\ndefault = "allow"\n\n[[rules]]\naction = "deny"\nmodules = ["{MODULE}"]\n'
        'reason = "user code travels as source"\n')
    sys.path.insert(0, str(directory))
    try:
        yield directory, importlib.import_module(MODULE)
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop(MODULE, None)


def confinement(pid):
    with open(f"/proc/{pid}/status") as handle:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)
    return {name: fields.get(name) for name in CONFINEMENT_FIELDS}


def dead(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(") ", 1)[1][0] in "ZX"  # a zombie: exited, not yet reaped
    except FileNotFoundError:
        return True


def ready_standby(worker, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        standby = worker.status()["standby"]
        if standby is not None and standby["state"] == "ready":
            return standby["pid"]
        time.sleep(0.1)
    raise AssertionError(f"no standby worker became ready within {seconds}s")


@pytest.mark.parametrize("confine", ["required", "off"], ids=["confined", "CONTROL-unconfined"])
def test_a_standby_is_confined_like_the_first_and_serves_after_a_crash(project, tmp_path, confine):
    directory, helpers = project
    # Open to everyone: only Landlock can keep the worker (uid 65534 when confined) out.
    outside = tmp_path / "open"
    outside.mkdir()
    outside.chmod(0o777)
    with runner.Worker(model="none", policy=str(directory / "allow-all.toml"), confine=confine) as worker:
        first = worker.call(helpers.pid)
        standby = ready_standby(worker)
        assert standby != first
        assert confinement(standby) == confinement(first)
        first_write = worker.call(helpers.write, str(outside / "first"))
        with pytest.raises(runner.WorkerCrashed):
            worker.call(helpers.crash)
        # The next call is served, by the standby, promoted.
        assert worker.call(helpers.pid) == standby
        promoted_write = worker.call(helpers.write, str(outside / "promoted"))
        assert worker.status()["restarts"] == 1
    expected = "PermissionError" if confine == "required" else "written"
    assert (first_write, promoted_write) == (expected, expected)
    assert sorted(os.listdir(outside)) == ([] if confine == "required" else ["first", "promoted"])


def test_without_a_standby_a_crash_still_restarts_the_worker(project, tmp_path):
    directory, helpers = project
    path = str(tmp_path / "worker.sock")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    server = subprocess.Popen([sys.executable, "-m", "runner", "serve", "--socket", path, "--model", "none",
                               "--policy", str(directory / "allow-all.toml"), "--no-standby"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(path), what="the server to listen")
        with runner.Worker(socket=path, policy=str(directory / "allow-all.toml")) as worker:
            first = worker.call(helpers.pid)
            with pytest.raises(runner.WorkerCrashed):
                worker.call(helpers.crash)
            assert worker.call(helpers.pid) != first
            assert worker.status()["standby"] is None and worker.status()["restarts"] == 1
    finally:
        subprocess.run([sys.executable, "-m", "runner", "stop", path], env=env, capture_output=True, timeout=60)
        server.wait(timeout=60)


def test_a_call_after_the_worker_died_while_idle_runs_on_the_next_worker(project):
    directory, helpers = project
    with runner.Worker(model="none", policy=str(directory / "allow-all.toml")) as worker:
        first = worker.call(helpers.pid)
        os.kill(first, 9)
        # Dead (a zombie until the supervisor reaps it) before the call goes out: the call is
        # handed to no dead worker; it waits for the next one.
        wait_until(lambda: dead(first), what="the worker to die")
        assert worker.call(helpers.pid) not in (first, None)
