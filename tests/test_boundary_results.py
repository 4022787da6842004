"""What comes back from the worker, through the real server, as a researcher works.

The user's lab package (``sbx_lab``) lives in a temporary directory on the client's
``sys.path`` only: the worker cannot import it, so its classes travel as source and the
worker rebuilds them in namespaces of its own. Results holding instances of those
classes come back as the client's own classes, under every policy; what the worker
made itself is refused with a message that says so. A worker poisoned by one client
cannot make another client's decode run code (judged by a file written or not, with a
control that decodes the same reply bytes the old way).
"""
import json
import os
import subprocess
import sys
import warnings

import msgpack
import pytest

import capture
import runner
from runner_support import environment

PROBES = '''\
class MeanTracker:
    """Accumulates a running mean on the worker; comes back with its state."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def add(self, x):
        self.total += float(x)
        self.count += 1
        return self

    @property
    def mean(self):
        return self.total / max(self.count, 1)


class Holder:
    def __init__(self, tracker):
        self.tracker = tracker


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a, self.b = a, b


class Outer:
    class Inner:
        def __init__(self, n):
            self.n = n


class ProbeError(ValueError):
    pass


def make():
    return MeanTracker().add(2).add(4)


def nested():
    tracker = MeanTracker().add(1)
    return {"list": [tracker, tracker], "holder": Holder(tracker), "inner": [Outer.Inner(3)],
            "slots": Slotted(tracker, (1, 2))}


def make_local_class():
    class Local:
        pass
    return Local()


def make_lambda():
    return lambda x: x + 1


def make_function():
    def helper():
        return 1
    return helper


def give_back_make():
    return make


def fail_with_own_type():
    raise ProbeError("probe saw a NaN")


def fail_with_worker_made_type():
    class MadeHere(Exception):
        pass
    raise MadeHere("made on the worker")
'''

ATTACKS = '''\
class Boom:
    """Its __reduce__ names open(): a naive reader calls open(path, "w")."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def attack(path):
    return [1, {"probe": Boom(path)}]


def poison(path):
    """Every nn.Module any client gets back afterwards carries the payload."""
    import torch

    torch.nn.Module.__reduce_ex__ = lambda self, protocol: (open, (path, "w"))
    return "poisoned"


def make_linear():
    import torch

    return torch.nn.Linear(2, 2)


def fail_naming_stdlib_module():
    class Evil(Exception):
        pass
    Evil.__module__, Evil.__qualname__ = "this", "Evil"  # importing `this` prints to stdout
    raise Evil("import me")
'''


STEER = '''\
from dataclasses import dataclass


@dataclass
class SteerConfig:
    layer: int = 0
    scale: float = 2.0
'''


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    (project / "sbx_lab").mkdir()
    (project / "sbx_lab" / "__init__.py").write_text("")
    (project / "sbx_lab" / "probes.py").write_text(PROBES)
    (project / "sbx_lab" / "attacks.py").write_text(ATTACKS)
    (project / "sbx_lab" / "steer.py").write_text(STEER)
    sys.path.insert(0, str(project))
    from sbx_lab import attacks, probes, steer

    yield {"probes": probes, "attacks": attacks, "steer": steer, "project": project}
    sys.path.remove(str(project))
    for name in ("sbx_lab", "sbx_lab.probes", "sbx_lab.attacks", "sbx_lab.steer"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module", params=["default", "ndif-allowlist", "nnsight-local"])
def worker(request):
    with runner.Worker(model="none", policy=request.param) as worker:
        yield worker


def test_an_instance_of_the_users_class_comes_back_as_that_class(lab, worker):
    probes = lab["probes"]
    tracker = worker.call(probes.make)
    assert type(tracker) is probes.MeanTracker and (tracker.count, tracker.mean) == (2, 3.0)
    # One sent from here, changed there, comes back changed.
    updated = worker.call(lambda m: m.add(10) or m, probes.MeanTracker())
    assert type(updated) is probes.MeanTracker and vars(updated) == {"total": 10.0, "count": 1}


def test_instances_nested_anywhere_come_back_with_sharing(lab, worker):
    probes = lab["probes"]
    result = worker.call(probes.nested)
    tracker = result["list"][0]
    assert type(tracker) is probes.MeanTracker and tracker.mean == 1.0
    assert result["list"][1] is tracker and result["holder"].tracker is tracker
    assert type(result["holder"]) is probes.Holder
    assert type(result["inner"][0]) is probes.Outer.Inner and result["inner"][0].n == 3
    assert type(result["slots"]) is probes.Slotted and result["slots"].a is tracker and result["slots"].b == (1, 2)


@pytest.mark.parametrize("make, what, path, name", [
    ("make_local_class", "class", "result", "make_local_class.<locals>.Local"),
    ("make_lambda", "function", "result", "make_lambda.<locals>.<lambda>"),
    ("make_function", "function", "result", "make_function.<locals>.helper"),
])
def test_what_the_worker_made_itself_is_refused_saying_so(lab, worker, make, what, path, name):
    with pytest.raises(capture.CaptureError) as refused:
        worker.call(getattr(lab["probes"], make))
    error = refused.value
    assert error.path == path and error.type_name == f"{what} {name}"
    assert f"the worker created this {what}" in error.reason and f"the client has no {what} of that name" in error.reason
    assert error.workaround.startswith("Return data instead")


def test_a_lambda_the_client_sent_cannot_come_back_by_name(worker):
    with pytest.raises(capture.CaptureError) as refused:
        worker.call(lambda f: {"fn": f}, lambda x: x)
    error = refused.value
    assert error.path == "result['fn']" and error.type_name.startswith("function ") and "<lambda>" in error.type_name
    assert "the client sent this function, but it is a lambda" in error.reason
    assert "the client has nothing to find it by name" in error.reason
    assert error.workaround.startswith("Define it at module level")


def test_a_function_does_not_come_back_even_the_clients_own(lab, worker):
    with pytest.raises(capture.BundleError, match=r"refused result: it is a reference to sbx_lab.probes.make "
                                                  r"\(.*callable"):
        worker.call(lab["probes"].give_back_make)


def test_errors_come_back_as_the_clients_type_or_remote_error(lab, worker):
    with pytest.raises(lab["probes"].ProbeError, match="probe saw a NaN") as caught:
        worker.call(lab["probes"].fail_with_own_type)
    assert caught.value.remote_traceback[-1][2] == "fail_with_own_type"
    with pytest.raises(runner.RemoteError, match="made on the worker") as caught:
        worker.call(lab["probes"].fail_with_worker_made_type)
    assert "fail_with_worker_made_type.<locals>.MadeHere" in caught.value.type_name
    assert "probes.py" in str(caught.value.__cause__)


# -- traces -------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["default", "ndif-allowlist", "nnsight-local"])
def traced(request):
    with runner.Worker(model="tiny-gpt2", policy=request.param) as worker:
        yield worker


@pytest.fixture(scope="module")
def model():
    import nnsight
    from runner import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nnsight.LanguageModel(models.path("tiny-gpt2"))


def test_a_probe_saved_in_a_trace_comes_back_as_the_users_class(lab, model, traced):
    from runner.nnsight import WorkerBackend

    probes = lab["probes"]
    with model.trace("Hello world", backend=WorkerBackend(traced)):
        probe = probes.MeanTracker()
        probe.add(model.transformer.h[0].output.mean())
        probe.add(model.transformer.h[1].output.mean())
        probe.save()  # nnsight mounts .save() on every object
    with model.trace("Hello world"):
        first = model.transformer.h[0].output.mean().save()
        second = model.transformer.h[1].output.mean().save()
    assert type(probe) is probes.MeanTracker and probe.count == 2
    assert probe.mean == pytest.approx((float(first) + float(second)) / 2, abs=1e-5)


def test_a_dataclass_config_in_a_trace_is_refused_by_its_name_where_dataclasses_are_missing(lab, model, traced):
    from runner.nnsight import WorkerBackend

    cfg = lab["steer"].SteerConfig(layer=0, scale=3.0)

    def steered():
        with model.trace("Hello world", backend=WorkerBackend(traced)):
            hidden = model.transformer.h[cfg.layer].output
            hidden[:] = hidden * cfg.scale
            logits = model.lm_head.output.save()
        return logits

    if traced.info["policy"] != "ndif-allowlist":
        assert steered().shape[-1] == model.config.vocab_size
        return
    with pytest.raises(capture.CaptureError) as refused:
        steered()
    message = str(refused.value)
    assert refused.value.path == "cfg" and "SteerConfig dataclass" in message
    assert "'dataclasses'" in message and "ndif-allowlist" in message and "dataclasses.sys" not in message
    assert "plain class" in message and "a policy whose destination has dataclasses" in message


# -- a poisoned worker against the client ------------------------------------------------

@pytest.fixture(scope="module")
def confined():
    """A worker of its own: the attacks below leave it poisoned, on purpose, to test the
    client's data-only decoding alone (its hygiene, runner.hygiene, would retire it)."""
    with environment(SOURCEBOX_TEST_NO_HYGIENE="1"):  # read by the server it starts
        worker = runner.Worker(model="none", policy="nnsight-local", confine="required")
    with worker:
        yield worker


def test_a_result_built_to_call_open_on_the_client_does_not(lab, confined, tmp_path):
    marker = tmp_path / "written-on-the-client"
    with pytest.raises(capture.BundleError, match=r"refused result\[1\]\['probe'\]: .*io\.open"):
        confined.call(lab["attacks"].attack, str(marker))
    raw = confined.run_bytes(runner.encode_call(lab["attacks"].attack, (str(marker),), policy="nnsight-local"))
    with pytest.raises(capture.BundleError):
        runner.decode_result(raw)
    assert not marker.exists()
    # CONTROL: the same reply bytes decoded the old way (no policy) call open() here.
    capture.loads(msgpack.unpackb(raw)["result"], policy=None)
    assert marker.exists()


def test_an_error_reply_never_makes_the_client_import(lab, confined, capfd):
    sys.modules.pop("this", None)
    with pytest.raises(runner.RemoteError, match="import me") as caught:
        confined.call(lab["attacks"].fail_naming_stdlib_module)
    assert caught.value.type_name == "this.Evil"
    assert "this" not in sys.modules and "Beautiful is better" not in capfd.readouterr().out
    # CONTROL: the module the reply names is one whose import has an effect here.
    raw = confined.run_bytes(runner.encode_call(lab["attacks"].fail_naming_stdlib_module, policy="nnsight-local"))
    import importlib

    importlib.import_module(msgpack.unpackb(raw)["error"]["module"])
    assert "Beautiful is better" in capfd.readouterr().out
    sys.modules.pop("this")


CLIENT = '''\
import json, os, sys
sys.path.insert(0, {project!r})
import capture, msgpack, runner
from sbx_lab import attacks

role, marker = sys.argv[1], sys.argv[2]
with runner.Worker(socket={socket!r}) as worker:
    if role == "attacker":
        print(json.dumps({{"poison": worker.call(attacks.poison, marker)}}))
        sys.exit(0)
    outcome = {{}}
    try:
        worker.call(attacks.make_linear)
        outcome["call"] = "a clean result"
    except capture.BundleError as error:
        outcome["call"] = str(error)
    outcome["marker_after_call"] = os.path.exists(marker)
    raw = worker.run_bytes(runner.encode_call(attacks.make_linear, policy="nnsight-local"))
    try:
        runner.decode_result(raw)
    except capture.BundleError:
        pass
    outcome["marker_after_decode_result"] = os.path.exists(marker)
    capture.loads(msgpack.unpackb(raw)["result"], policy=None)  # CONTROL: the old decode
    outcome["marker_after_old_decode"] = os.path.exists(marker)
    print(json.dumps(outcome))
'''


def test_a_worker_poisoned_by_one_client_runs_nothing_in_another(lab, confined, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT.format(project=str(lab["project"]), socket=confined.socket_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))

    def client(role, marker):
        done = subprocess.run([sys.executable, str(script), role, str(marker)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    # The attacker's payload names a file in the victim's directory.
    victim_marker = tmp_path / "victim" / "written-by-the-attacker"
    victim_marker.parent.mkdir()
    assert client("attacker", victim_marker) == {"poison": "poisoned"}
    outcome = client("victim", victim_marker)
    assert "refused result: it is a call to io.open" in outcome["call"]
    assert outcome["marker_after_call"] is False and outcome["marker_after_decode_result"] is False
    assert outcome["marker_after_old_decode"] is True
