"""sourcebox on Ray (issue 13, docs/SCALE.md): replicas as named actors, calls as frames.

One loopback Ray cluster serves the whole module (starting one costs seconds). Every Ray
process talks on 127.0.0.0/8 only: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray 2.60 use
127.0.0.1 instead of the host's interface address, there is no dashboard, and
authentication is off for this test cluster only (``RAY_AUTH_MODE=disabled``).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy
import psutil
import pytest

from ray_support import inet_addresses, stop_descendants  # first: the test clusters' environment

ray = pytest.importorskip("ray")

import runner  # noqa: E402
import runner.nnsight as sourcebox_nnsight  # noqa: E402
from runner import ray as sourcebox_ray  # noqa: E402
from runner_support import user_modules, wait_until  # noqa: E402

from test_capture_xver import OTHER_MINORS, interpreter_for, venv_with_msgpack  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "sourcebox-tests"

USER_MODULE = '''\
import sys
import time

SCALE = 3  # module state the shipped function reads


def triple(x):
    return x * SCALE


def where(name):
    """What the process running this sees of the module it came from."""
    import importlib.util
    return {"in_sys_modules": name in sys.modules, "findable": importlib.util.find_spec(name) is not None,
            "python": list(sys.version_info[:2])}


def identity(value):
    return value


def crash():
    import os
    os.kill(os.getpid(), 9)


def write(path):
    with open(path, "w") as handle:
        handle.write("escaped")
    return "written"


def worker_pid():
    import os
    return os.getpid()


def chatty(text):
    print("worker says", text)
    return text.upper()


def tagged(tag, seconds):
    time.sleep(seconds)
    return tag, time.monotonic()
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user module only this test process can import (not Ray's workers, not the worker)."""
    with user_modules(tmp_path_factory.mktemp("ray_user_project"), sbx_ray_user=USER_MODULE) as module:
        yield module


@pytest.fixture(scope="module")
def cluster():
    """A one-node loopback Ray cluster for this module; its processes are gone afterwards."""
    temp = tempfile.mkdtemp(prefix="sbxray-", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, namespace=NAMESPACE, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:"), address
        yield address
    finally:
        ours = psutil.Process().children(recursive=True)
        ray.shutdown()
        stop_descendants(ours)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def plain(cluster):
    """One replica of a worker without a model."""
    sourcebox_ray.deploy("none", namespace=NAMESPACE)
    yield "none"
    sourcebox_ray.undeploy("none", namespace=NAMESPACE)


def replica_info(model="none", index=0):
    return ray.get(ray.get_actor(sourcebox_ray.actor_name(model, index), namespace=NAMESPACE).info.remote())


def executor(model="none", **options):
    return runner.RayExecutor(model, namespace=NAMESPACE, **options)


def test_a_call_runs_in_the_replica_and_the_same_function_fails_as_a_plain_ray_task(plain, user):
    with executor() as pool:
        assert pool.submit(user.triple, 14).result() == 42  # module state travelled with it
        seen_by_worker = pool.submit(user.where, "sbx_ray_user").result()
    assert seen_by_worker == {"in_sys_modules": False, "findable": False, "python": list(sys.version_info[:2])}
    actor = ray.get_actor(sourcebox_ray.actor_name("none", 0), namespace=NAMESPACE)
    assert "sbx_ray_user" not in ray.get(actor.modules.remote())
    assert "runner" in ray.get(actor.modules.remote())  # the list is real
    # Control: Ray itself ships the function by reference, which its workers cannot import.
    with pytest.raises(Exception) as caught:
        ray.get(ray.remote(user.triple).remote(14), timeout=120)
    assert "ModuleNotFoundError" in str(caught.value) and "sbx_ray_user" in str(caught.value)


def test_no_function_is_serialized_by_ray(plain, user, monkeypatch):
    def refuse(obj):
        raise AssertionError(f"Ray was asked to serialize the function {obj!r}")

    ray.util.register_serializer(types.FunctionType, serializer=refuse, deserializer=lambda data: data)
    # cloudpickle reduces functions in reducer_override, ahead of the serializers Ray
    # registers: have it consult Ray's table for functions too, so the one above is in force.
    # numpy's own array rebuilder (by name) is how Ray's pickle carries the uint8 frames.
    pickler = ray.cloudpickle.CloudPickler
    original = pickler.reducer_override

    def reducer_override(self, obj):
        if isinstance(obj, types.FunctionType) and types.FunctionType in pickler.dispatch \
                and obj.__module__.partition(".")[0] != "numpy":
            return pickler.dispatch[types.FunctionType](obj)
        return original(self, obj)

    monkeypatch.setattr(pickler, "reducer_override", reducer_override)
    try:
        with executor() as pool:
            assert pool.submit(user.triple, numpy.arange(4)).result().tolist() == [0, 3, 6, 9]
            assert pool.submit(lambda a, b: a - b, 50, 8).result() == 42
        # Control: the serializer is in force for anything that does hand Ray a function.
        with pytest.raises(Exception, match="Ray was asked to serialize the function"):
            ray.put(user.triple)
        with pytest.raises(Exception, match="Ray was asked to serialize the function"):
            ray.put({"nested": [lambda: 1]})
    finally:
        ray.util.deregister_serializer(types.FunctionType)


def proc_status(pid):
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: fields[key].strip() for key in ("Seccomp", "NoNewPrivs", "Uid")}


def test_the_actor_is_unconfined_the_worker_confined_and_an_escape_is_refused(plain, user, tmp_path):
    info = replica_info()
    actor, worker = proc_status(info["actor_pid"]), proc_status(info["worker_pid"])
    assert actor["Seccomp"] == "0" and actor["NoNewPrivs"] == "0", actor
    assert worker["Seccomp"] == "2" and worker["NoNewPrivs"] == "1", worker
    target = tmp_path / "escaped.txt"
    with executor() as pool:
        with pytest.raises(PermissionError):
            pool.submit(user.write, str(target)).result()
    assert not target.exists()
    # Control: the same attempt in an unconfined worker writes the file.
    with runner.Worker(model="none", confine="off") as unconfined:
        assert unconfined.call(user.write, str(target)) == "written"
    assert target.read_text() == "escaped"


def test_calls_from_the_replicas_node_go_to_its_server_directly_and_relay_through_the_actor_on_request(plain, user):
    for same_node in (True, False):
        before = replica_info()
        with executor(same_node=same_node) as pool:
            assert [pool.submit(user.triple, n).result() for n in range(3)] == [0, 3, 6]
        after = replica_info()
        assert after["served"] - before["served"] == 3
        assert after["requests"] - before["requests"] == (0 if same_node else 3), same_node  # relayed by the actor


@pytest.mark.parametrize("same_node", [True, False], ids=["same-node", "relayed"])
def test_a_64_mib_identity_call_is_correct_and_its_cost_against_a_direct_call_is_reported(plain, user, same_node):
    value = numpy.random.default_rng(0).integers(0, 255, 64 << 20, dtype=numpy.uint8)
    through_ray, direct = [], []
    with executor(same_node=same_node) as pool, runner.Worker(model="none") as worker:
        for _ in range(3):  # interleaved, so both see the same machine
            started = time.perf_counter()
            back = pool.submit(user.identity, value).result()
            through_ray.append(time.perf_counter() - started)
            assert numpy.array_equal(back, value)
            started = time.perf_counter()
            assert numpy.array_equal(worker.call(user.identity, value), value)
            direct.append(time.perf_counter() - started)
        # The outcome's frames are views, not copies: read-only ones of Ray's object store
        # when relayed; of the worker's sealed result memfd, mapped copy-on-write, when sent
        # to the server directly (as Worker.call's).
        bundle = runner.encode_call_frames(user.identity, (value,), policy=pool.policy)
        outcome = pool.run_frames(bundle.header, bundle.frames)
        large = max(outcome.frames, key=lambda frame: memoryview(frame).nbytes)
        assert memoryview(large).nbytes == value.nbytes
        if same_node:
            assert not isinstance(memoryview(large).obj, (bytes, bytearray))  # the mapping, not a copy of it
        else:
            assert not large.flags.writeable and not large.flags.owndata
    # Reported, not asserted (no timing assertions on this shared machine): the issue asks for
    # at most 2x; relayed, Ray adds three copies of the bytes to Worker.call's two (docs/SCALE.md).
    ratio = sorted(through_ray)[1] / sorted(direct)[1]
    print(f"64 MiB identity ({'same node' if same_node else 'relayed'}): RayExecutor "
          f"{sorted(through_ray)[1] * 1e3:.0f} ms, Worker.call {sorted(direct)[1] * 1e3:.0f} ms, ratio {ratio:.2f}")


@pytest.mark.parametrize("same_node", [True, False], ids=["same-node", "relayed"])
def test_a_worker_crash_raises_once_without_retry_and_the_actor_serves_the_next_call(plain, user, same_node):
    before = replica_info()
    with executor(retries=2, same_node=same_node) as pool:
        with pytest.raises(runner.WorkerCrashed) as caught:
            pool.submit(user.crash).result()
        assert caught.value.returncode == -signal.SIGKILL
        after = replica_info()
        assert after["restarts"] == before["restarts"] + 1  # run once, not retried
        assert after["actor_pid"] == before["actor_pid"]    # the actor lived through it
        assert pool.submit(user.triple, 5).result() == 15


def shm_names(*pids):
    tokens = {str(pid) for pid in pids}
    return sorted(name for name in os.listdir("/dev/shm") if tokens & set(name.replace("-", "_").split("_")))


@pytest.mark.parametrize("same_node", [True, False], ids=["same-node", "relayed"])
def test_twenty_calls_in_flight_survive_the_actor_being_killed(plain, user, same_node):
    old = replica_info()
    with executor(tenant="survivor", max_in_flight=20, retries=3, same_node=same_node) as pool:
        futures = [pool.submit(user.tagged, n, 0.1) for n in range(20)]
        wait_until(lambda: sum(f.done() for f in futures) >= 3, what="the first answers")
        os.kill(old["actor_pid"], signal.SIGKILL)
        assert [f.result(timeout=120)[0] for f in futures] == list(range(20))
    new = replica_info()
    assert new["actor_pid"] != old["actor_pid"] and new["server_pid"] != old["server_pid"]
    # The old server and its worker went with the actor, and with them every memfd they held.
    wait_until(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                               for pid in (old["server_pid"], old["worker_pid"])),
               timeout=30, what="the old server and worker to exit")
    assert shm_names(old["actor_pid"], old["server_pid"], old["worker_pid"]) == []
    assert not os.path.exists(os.path.dirname(old["socket"])) or not os.listdir(os.path.dirname(old["socket"]))


def test_two_tenants_take_turns_at_one_replica(plain, user):
    relayed = replica_info()["requests"]
    with executor(tenant="alice", max_in_flight=20) as alice, executor(tenant="bob") as bob:
        queued = [alice.submit(user.tagged, f"alice-{n}", 0.2) for n in range(20)]
        wait_until(lambda: (replica_info()["queued"] or 0) >= 5, what="alice's queue at the server")
        late = bob.submit(user.tagged, "bob", 0.0)
        finished = sorted([f.result(timeout=120) for f in queued] + [late.result(timeout=120)], key=lambda p: p[1])
    order = [tag for tag, _ in finished]
    alice_done = [tag for tag in order if tag.startswith("alice")]
    assert order.index("bob") < order.index(alice_done[2]), order  # before alice's third of twenty
    # Alice's twenty calls, sent at once, all took the same-node path: had some been relayed
    # while her first decided it, she would be two clients at the server, with twice the share.
    assert replica_info()["requests"] == relayed


def test_code_that_prints_still_travels_after_ray_printed_in_this_driver(plain, user):
    import builtins

    # The crash and the kill above made Ray print worker deaths here, which by default makes
    # Ray swap builtins.print for its own function (runner.ray turns that off).
    assert type(builtins.print).__name__ == "builtin_function_or_method", builtins.print
    with executor() as pool:
        assert pool.submit(user.chatty, "hi").result() == "HI"


@pytest.fixture(scope="module")
def two_models(plain):
    sourcebox_ray.deploy("tiny-gpt2", namespace=NAMESPACE)
    yield
    sourcebox_ray.undeploy("tiny-gpt2", namespace=NAMESPACE)


def model_kind(model):
    return type(model).__name__


def test_each_call_lands_on_its_model(two_models, user):
    with executor("none") as none, executor("tiny-gpt2") as gpt2:
        for _ in range(3):
            assert none.submit(user.worker_pid).result() == replica_info("none")["worker_pid"]
            assert gpt2.submit(user.worker_pid).result() == replica_info("tiny-gpt2")["worker_pid"]
        assert gpt2.submit(model_kind, runner.MODEL).result().endswith("Model")  # the worker's model object
        with pytest.raises(Exception, match="hosts no model"):
            none.submit(model_kind, runner.MODEL).result()


def test_nnsight_remote_local_goes_through_the_executor(two_models):
    import nnsight
    import torch
    from runner import models

    with pytest.warns(FutureWarning):
        model = nnsight.LanguageModel(models.path("tiny-gpt2"))
    before = replica_info("tiny-gpt2")["served"]
    with executor("tiny-gpt2") as pool:
        sourcebox_nnsight.install(pool)
        try:
            with model.trace("Hello world", remote="local"):
                logits = model.lm_head.output.save()
        finally:
            sourcebox_nnsight.uninstall()
    with model.trace("Hello world"):
        local = model.lm_head.output.save()
    assert torch.allclose(logits, local, atol=1e-5)
    assert replica_info("tiny-gpt2")["served"] == before + 1


def test_every_connection_of_ray_stays_on_loopback(two_models):
    seen, outside = inet_addresses(listening=True)
    assert seen > 10 and outside == []


CLIENT_SCRIPT = '''\
import json, sys
from pathlib import Path
import capture

work = Path(sys.argv[2])
if sys.argv[1] == "encode":
    sys.path.insert(0, str(work))
    import xver_user
    bundle = capture.encode_variables({"fn": xver_user.shout, "args": ("hello",), "kwargs": {}})
    (work / "header.bin").write_bytes(bundle.header)
    for n, frame in enumerate(bundle.frames):
        (work / f"frame-{n}.bin").write_bytes(frame)
    print(json.dumps({"frames": len(bundle.frames)}))
else:
    outcome = json.loads((work / "outcome.json").read_text())
    frames = [(work / f"out-{n}.bin").read_bytes() for n in range(outcome["frames"])]
    value = capture.decode(frames[0], frames[1:], policy=capture.DATA_ONLY)
    print(json.dumps({"kind": outcome["kind"], "value": value, "client": list(sys.version_info[:2])}))
'''

XVER_USER = '''\
import sys


def shout(text):
    return {"text": text.upper() + "!", "worker": list(sys.version_info[:2])}
'''


def test_a_client_on_another_python_calls_a_replica_through_ray(plain, tmp_path):
    interpreter = next((found for found in map(interpreter_for, OTHER_MINORS) if found is not None), None)
    if interpreter is None:
        pytest.skip("no pyenv interpreter of another minor version")
    python = venv_with_msgpack(interpreter)
    capture_only = tmp_path / "capture-only"
    shutil.copytree(REPO_ROOT / "capture", capture_only / "capture", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "client.py").write_text(CLIENT_SCRIPT)
    (tmp_path / "xver_user.py").write_text(XVER_USER)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["PYTHONPATH"] = str(capture_only)

    def client(step):
        done = subprocess.run([str(python), str(tmp_path / "client.py"), step, str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    count = client("encode")["frames"]
    header = (tmp_path / "header.bin").read_bytes()
    frames = [numpy.fromfile(tmp_path / f"frame-{n}.bin", dtype=numpy.uint8) for n in range(count)]
    with executor() as pool:  # this (3.11) driver only relays the frames
        outcome = pool.run_frames(header, frames)
    assert outcome.kind == "reply"
    for n, frame in enumerate(outcome.frames):
        (tmp_path / f"out-{n}.bin").write_bytes(frame)
    (tmp_path / "outcome.json").write_text(json.dumps({"kind": outcome.kind, "frames": len(outcome.frames)}))
    answer = client("decode")
    assert answer["value"] == {"text": "HELLO!", "worker": list(sys.version_info[:2])}
    assert answer["client"] != list(sys.version_info[:2])


def test_cli_up_status_down(cluster):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))

    def cli(*arguments):
        done = subprocess.run([sys.executable, "-m", "runner", "ray", "--address", cluster, "--namespace", "sbx-cli",
                               *arguments], env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert "1 replica(s) of none ready: sourcebox/none/0" in cli("up", "none")
    status = json.loads(cli("status", "none", "--json"))
    assert list(status) == ["sourcebox/none/0"] and status["sourcebox/none/0"]["model"] == "none"
    assert psutil.pid_exists(status["sourcebox/none/0"]["server_pid"])
    assert "stopped 1 replica(s) of none" in cli("down", "none")
    assert sourcebox_ray.replicas("none", namespace="sbx-cli") == []
