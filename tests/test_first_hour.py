"""A researcher's first hour (issue 16), from a project of their own with sourcebox installed non-editable.

The project is a small lab package (``mylab.probes`` with ``zscore`` and a
``MeanTracker`` class, ``mylab.steer`` with a ``SteerConfig`` dataclass), a script that
uses it through a worker (calls, steering, probes in traces, ``generate``, a plain
``TransformersModel``), and a pytest suite using the ``sourcebox_worker`` fixture and
``--sourcebox``. Everything runs in fresh processes from that project, against the
``installed_sourcebox`` copy. What needs user classes to come back from the worker is in
its own test, expected to fail until results decode as data.
"""

import textwrap

import pytest

LAB = {
    "mylab/__init__.py": '''\
        """My lab's interpretability helpers."""
        ''',
    "mylab/probes.py": '''\
        """Probes: statistics of activations."""
        import torch


        def zscore(x, dim=-1, eps=1e-6):
            """x standardized along dim: zero mean, unit variance."""
            return (x - x.mean(dim=dim, keepdim=True)) / (x.std(dim=dim, keepdim=True) + eps)


        class MeanTracker:
            """Running mean of activations over token positions."""

            def __init__(self):
                self.count = 0
                self.total = None

            def add(self, activations):
                rows = activations.reshape(-1, activations.shape[-1]).detach()
                self.total = rows.sum(0) if self.total is None else self.total + rows.sum(0)
                self.count += rows.shape[0]
                return self

            @property
            def mean(self):
                return self.total / self.count
        ''',
    "mylab/steer.py": '''\
        """Steering: push one layer's output along a direction."""
        from dataclasses import dataclass

        import torch


        @dataclass
        class SteerConfig:
            layer: int
            scale: float = 4.0

            def direction(self, width):
                return torch.linspace(-1.0, 1.0, width) * self.scale
        ''',
}

EXPERIMENT = '''\
    """My first experiment: the lab's helpers against the worker's model."""
    import torch
    from nnsight import TransformersModel

    import runner
    import runner.nnsight
    from mylab.probes import MeanTracker, zscore
    from mylab.steer import SteerConfig

    PROMPT = "The Eiffel Tower is in"

    with runner.Worker(model="tiny-gpt2") as worker:
        # Calls: my functions and my objects run on the worker; tensors come back.
        x = torch.arange(6.0)
        assert torch.allclose(worker.call(zscore, x), zscore(x))
        batches = [torch.ones(2, 4), torch.full((2, 4), 3.0)]
        mean = worker.call(lambda tracker: [tracker.add(b) for b in batches][-1].mean, MeanTracker())
        assert torch.equal(mean, torch.full((4,), 2.0)), mean

        model = TransformersModel(runner.models.path("tiny-gpt2"), task="text-generation")
        runner.nnsight.install(worker)

        # Steering with my config object, compared with the same edit run here.
        cfg = SteerConfig(layer=1)
        with model.trace(PROMPT, remote="local"):
            layer = model.transformer.h[cfg.layer]
            layer.output = layer.output + cfg.direction(64)
            steered = model.lm_head.output[0, -1].save()
        with model.trace(PROMPT, remote="local"):
            clean = model.lm_head.output[0, -1].save()
        with model.trace(PROMPT):
            layer = model.transformer.h[cfg.layer]
            layer.output = layer.output + cfg.direction(64)
            steered_here = model.lm_head.output[0, -1].save()
        assert torch.allclose(steered, steered_here, atol=1e-5)
        assert not torch.allclose(steered, clean)

        # Probes in a trace: my tracker accumulates on the worker; what I save comes back.
        tracker = MeanTracker()
        with model.trace(PROMPT, remote="local"):
            hidden = model.transformer.h[0].output
            tracker.add(hidden)
            mean = tracker.mean.save()
            standardized = zscore(hidden).save()
            raw = hidden.save()
        assert torch.allclose(mean, raw[0].mean(0), atol=1e-6)
        assert torch.allclose(standardized, zscore(raw))
        assert tracker.count == 0  # the worker's copy did the work

        # generate, through the worker and here.
        with model.generate("Hello", max_new_tokens=4, remote="local") as tracer:
            tokens = tracer.result.save()
        with model.generate("Hello", max_new_tokens=4) as tracer:
            tokens_here = tracer.result.save()
        assert torch.equal(tokens, tokens_here)
        print("generated:", repr(model.tokenizer.decode(tokens[0])))
    print("first hour: all done")
'''

USER_SUITE = {
    "conftest.py": '''\
        import pytest
        from nnsight import TransformersModel

        import runner


        @pytest.fixture(scope="session")
        def model():
            return TransformersModel(runner.models.path("tiny-gpt2"), task="text-generation")
        ''',
    "test_lab.py": '''\
        import os

        import torch

        import capture
        import runner
        import runner.nnsight
        from mylab.probes import MeanTracker, zscore
        from mylab.steer import SteerConfig


        def test_sourcebox_is_the_installed_copy():
            site = os.environ["PYTHONPATH"]
            assert capture.__file__.startswith(site) and runner.__file__.startswith(site)


        def test_zscore_runs_on_the_worker(sourcebox_worker):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
            assert torch.allclose(sourcebox_worker.call(zscore, x), zscore(x))


        def test_remote_local_goes_to_the_session_worker(sourcebox_worker):
            assert runner.nnsight.installed_worker() is sourcebox_worker


        def test_steering_moves_the_prediction(model):
            cfg = SteerConfig(layer=0, scale=8.0)
            with model.trace("Hello world", remote="local"):
                clean = model.lm_head.output[0, -1].save()
            with model.trace("Hello world", remote="local"):
                model.transformer.h[cfg.layer].output = model.transformer.h[cfg.layer].output + cfg.direction(64)
                steered = model.lm_head.output[0, -1].save()
            assert not torch.allclose(clean, steered)


        def test_tracker_in_a_trace(model):
            tracker = MeanTracker()
            with model.trace("Hello world", remote="local"):
                tracker.add(model.transformer.h[1].output)
                mean = tracker.mean.save()
            assert mean.shape == (64,)


        def test_generate(model):
            with model.generate("Hello", max_new_tokens=3, remote="local") as tracer:
                tokens = tracer.result.save()
            assert tokens.shape[-1] == len(model.tokenizer("Hello")["input_ids"]) + 3
        ''',
}

# Needs results decoded as data (issue 16, items 1 and 3): instances of the user's own
# classes come back from the worker; a dataclass under ndif-allowlist either travels or
# is refused naming the user's variable, its class and the module the destination lacks.
RESULTS = '''\
    import torch
    import nnsight
    from nnsight import TransformersModel

    import capture
    import runner
    import runner.nnsight
    from mylab.probes import MeanTracker
    from mylab.steer import SteerConfig

    with runner.Worker(model="tiny-gpt2", policy="ndif-allowlist") as worker:
        made = worker.call(lambda: MeanTracker().add(torch.ones(2, 4)))
        assert type(made) is MeanTracker and made.count == 2 and torch.equal(made.mean, torch.ones(4))

        mine = MeanTracker()
        updated = worker.call(lambda tracker: tracker.add(torch.full((3, 4), 2.0)), mine)
        assert type(updated) is MeanTracker and updated.count == 3 and mine.count == 0

        nested = worker.call(lambda: {"trackers": [MeanTracker().add(torch.zeros(1, 4))]})
        assert type(nested["trackers"][0]) is MeanTracker and nested["trackers"][0].count == 1

        model = TransformersModel(runner.models.path("tiny-gpt2"), task="text-generation")
        runner.nnsight.install(worker)
        with model.trace("Hello world", remote="local"):
            probe = MeanTracker().add(model.transformer.h[0].output)
            probe.save()  # nnsight mounts .save() on every object
        assert type(probe) is MeanTracker and probe.count == len(model.tokenizer("Hello world")["input_ids"])

        # nnsight.save names the nnsight package itself, which ndif-allowlist does not give user code.
        try:
            with model.trace("Hello world", remote="local"):
                saved = nnsight.save(MeanTracker().add(model.transformer.h[0].output))
            raise AssertionError("nnsight.save travelled to a destination without nnsight")
        except capture.CaptureError as refusal:
            message = str(refusal)
            assert "installed package 'nnsight'" in message and "ndif-allowlist" in message, message

        cfg = SteerConfig(layer=0)
        try:
            with model.trace("Hello world", remote="local"):
                model.transformer.h[cfg.layer].output = model.transformer.h[cfg.layer].output + cfg.direction(64)
                steered = model.lm_head.output.save()
            assert steered.shape[-1] == model.config.vocab_size
        except capture.CaptureError as refusal:
            message = str(refusal)
            assert "cfg" in message and "SteerConfig" in message and "dataclasses" in message, message
    print("results: all done")
'''

# Runs a script of the project's in a fresh process, then checks that sourcebox came from
# the installed copy.
_RUN_SCRIPT = """
import runpy, sys
site, script = sys.argv[1], sys.argv[2]
runpy.run_path(script, run_name="__main__")
import capture, runner, sandbox
for module in (capture, runner, sandbox):
    assert module.__file__.startswith(site + "/"), f"{module.__name__} ran from {module.__file__}, not from {site}"
"""


@pytest.fixture
def lab(tmp_path):
    """The researcher's project directory with their lab package."""
    for name, text in LAB.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def _run_script(installed, project, name, text):
    (project / name).write_text(textwrap.dedent(text))
    finished = installed.run(["-c", _RUN_SCRIPT, installed.site, project / name], cwd=project)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished.stdout


def test_calls_steering_probes_and_generate_through_the_worker(installed_sourcebox, lab):
    output = _run_script(installed_sourcebox, lab, "experiment.py", EXPERIMENT)
    assert "generated: 'Hello" in output
    assert output.rstrip().endswith("first hour: all done")


def test_the_labs_pytest_suite_runs_through_the_plugin(installed_sourcebox, lab):
    for name, text in USER_SUITE.items():
        (lab / name).write_text(textwrap.dedent(text))
    # The plugin comes from the installed copy's pytest11 entry point.
    finished = installed_sourcebox.run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--sourcebox"], cwd=lab)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "6 passed" in finished.stdout, finished.stdout


def test_the_labs_own_objects_come_back(installed_sourcebox, lab):
    output = _run_script(installed_sourcebox, lab, "results.py", RESULTS)
    assert output.rstrip().endswith("results: all done")
