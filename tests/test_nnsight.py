"""remote='local' through a real sourcebox worker: what must work, compared with a plain local trace.

The user's helper modules live in a temporary directory on the client's sys.path only;
the worker (started before that directory exists) cannot import them, so everything
they define has to travel as source.
"""

import sys
import textwrap
import threading
import traceback

import pytest
import torch

import nnsight
from runner import models
from runner import nnsight as sourcebox_nnsight
from runner_support import user_modules

MYMETHODS = '''\
import torch

SCALE = 2.0
_seen = []


def normalize(x, dim=-1, eps=1e-8):
    return x / (x.norm(dim=dim, keepdim=True) + eps)


double = lambda x: x * SCALE


def make_shift(amount):
    def shift(x):
        return x + amount
    return shift


class Projector:
    def __init__(self, width):
        self.direction = torch.ones(width) / width ** 0.5

    def project(self, x):
        return x @ self.direction


class Probe(torch.nn.Module):
    def __init__(self, width, classes):
        super().__init__()
        self.linear = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.linear(x).softmax(-1)


def remember(x):
    _seen.append(tuple(x.shape))
    return len(_seen)


def seen():
    return list(_seen)
'''


@pytest.fixture(scope="module")
def mymethods(tmp_path_factory):
    with user_modules(tmp_path_factory.mktemp("user_project"), mymethods=MYMETHODS) as module:
        yield module


@pytest.fixture(scope="module")
def model():
    with pytest.warns(FutureWarning):
        return nnsight.LanguageModel(models.path("tiny-gpt2"))


@pytest.fixture
def routed(sourcebox_worker):
    """remote='local' goes to the session's worker for this test only."""
    sourcebox_nnsight.install(sourcebox_worker)
    try:
        yield sourcebox_worker
    finally:
        sourcebox_nnsight.uninstall()


def test_imported_function(model, mymethods, routed):
    normalize = mymethods.normalize
    with model.trace("Hello", remote="local"):
        hidden = model.transformer.h[0].output
        result = normalize(hidden).save()
    assert torch.allclose(result.norm(dim=-1), torch.ones_like(result.norm(dim=-1)), atol=1e-5)


def test_worker_cannot_import_the_user_module(mymethods, sourcebox_worker):
    import importlib

    with pytest.raises(Exception, match="mymethods"):
        sourcebox_worker.call(importlib.import_module, "mymethods")


def test_only_saved_values_come_back_and_match_a_local_trace(model, routed):
    with model.trace("The Eiffel Tower is in", remote="local"):
        first = model.transformer.h[0].output.save()
        second = model.transformer.h[1].output.save()
        unsaved = model.transformer.h[1].output * 2
        logits = model.lm_head.output.save()
    assert "unsaved" not in locals()

    with model.trace("The Eiffel Tower is in"):
        local_first = model.transformer.h[0].output.save()
        local_second = model.transformer.h[1].output.save()
        local_logits = model.lm_head.output.save()
    assert torch.equal(first, local_first)
    assert torch.equal(second, local_second)
    assert torch.equal(logits, local_logits)
    assert logits.device.type == "cpu"


def test_saved_views_hold_their_own_elements(model, routed):
    results = {}
    for prompt in ("The Colosseum is in Rome", "The Colosseum is in Paris"):
        with model.trace(prompt, remote="local"):
            middle = model.transformer.h[0].output[:, 2:4].save()
            last = model.lm_head.output[0, -1].save()
        with model.trace(prompt):
            local_middle = model.transformer.h[0].output[:, 2:4].save()
            local_last = model.lm_head.output[0, -1].save()
        assert torch.equal(last, local_last)
        assert torch.equal(middle, local_middle)
        results[prompt] = last
    assert not torch.equal(*results.values())


def test_edits_reach_the_model(model, routed):
    steering = torch.linspace(-1.0, 1.0, 64)  # made on the client, read by the body

    with model.trace("Hello world", remote="local"):
        model.transformer.h[0].output[:] = 0
        zeroed = model.transformer.h[0].output.save()
        zeroed_logits = model.lm_head.output.save()
    with model.trace("Hello world", remote="local"):
        model.transformer.h[1].output = model.transformer.h[1].output * 3
        tripled_logits = model.lm_head.output.save()
    with model.trace("Hello world", remote="local"):
        model.transformer.h[0].output = model.transformer.h[0].output + steering
        steered_logits = model.lm_head.output.save()

    with model.trace("Hello world"):
        model.transformer.h[0].output[:] = 0
        local_zeroed_logits = model.lm_head.output.save()
    with model.trace("Hello world"):
        model.transformer.h[1].output = model.transformer.h[1].output * 3
        local_tripled_logits = model.lm_head.output.save()
    with model.trace("Hello world"):
        model.transformer.h[0].output = model.transformer.h[0].output + steering
        local_steered_logits = model.lm_head.output.save()
    with model.trace("Hello world"):
        clean_logits = model.lm_head.output.save()

    assert zeroed.abs().max() == 0
    assert torch.equal(zeroed_logits, local_zeroed_logits)
    assert torch.equal(tripled_logits, local_tripled_logits)
    assert torch.equal(steered_logits, local_steered_logits)
    for edited in (zeroed_logits, tripled_logits, steered_logits):
        assert not torch.allclose(edited, clean_logits)


def test_user_functions_lambdas_closures_classes_instances_and_modules(model, mymethods, routed):
    shift = mymethods.make_shift(0.5)
    projector = mymethods.Projector(64)
    torch.manual_seed(0)
    probe = mymethods.Probe(64, 3)

    with model.trace("Hello world", remote="local"):
        hidden = model.transformer.h[1].output
        doubled = mymethods.double(hidden).save()
        shifted = shift(hidden).save()
        projected = projector.project(hidden).save()
        fresh = mymethods.Projector(64).project(hidden).save()
        probabilities = probe(hidden).save()
        raw = hidden.save()

    assert torch.allclose(doubled, raw * 2.0)
    assert torch.allclose(shifted, raw + 0.5)
    assert torch.allclose(projected, raw @ projector.direction)
    assert torch.allclose(fresh, projected)
    assert torch.allclose(probabilities, probe(raw))
    assert torch.allclose(probabilities.sum(-1), torch.ones(probabilities.shape[:-1]))


def test_module_level_state_is_shared_between_helpers_and_fresh_per_request(model, mymethods, routed):
    for _ in range(2):
        with model.trace("Hello world", remote="local"):
            hidden = model.transformer.h[0].output
            mymethods.remember(hidden)
            count = mymethods.remember(hidden)
            shapes = nnsight.save(mymethods.seen())
            count = nnsight.save(count)
        assert count == 2
        assert shapes == [(1, 3, 64), (1, 3, 64)]
    assert mymethods.seen() == []  # the helpers ran on the worker, not here


def test_several_invokers(model, routed):
    with model.trace(remote="local") as tracer:
        with tracer.invoke("Hello world"):
            first = model.lm_head.output.save()
        with tracer.invoke("The quick brown fox jumps"):
            second = model.lm_head.output.save()
    with model.trace() as tracer:
        with tracer.invoke("Hello world"):
            local_first = model.lm_head.output.save()
        with tracer.invoke("The quick brown fox jumps"):
            local_second = model.lm_head.output.save()
    assert torch.equal(first, local_first)
    assert torch.equal(second, local_second)


def test_generate_with_iter_and_result(model, routed):
    with model.generate("Hello", max_new_tokens=4, remote="local") as tracer:
        steps = nnsight.save(list())
        for _ in tracer.iter[:4]:
            steps.append(model.transformer.h[1].output[:, -1])
        tokens = tracer.result.save()
    with model.generate("Hello", max_new_tokens=4) as tracer:
        local_tokens = tracer.result.save()
    prompt_length = len(model.tokenizer("Hello")["input_ids"])
    assert tokens.shape == (1, prompt_length + 4)
    assert torch.equal(tokens, local_tokens)
    assert len(steps) == 4 and all(step.shape == (1, 64) for step in steps)


def test_gradients(model, routed):
    with model.trace("Hello world", remote="local"):
        hidden = model.transformer.h[0].output
        loss = model.lm_head.output.sum()
        with loss.backward():
            gradient = hidden.grad.save()
    with model.trace("Hello world"):
        hidden = model.transformer.h[0].output
        loss = model.lm_head.output.sum()
        with loss.backward():
            local_gradient = hidden.grad.save()
    assert gradient.shape == (1, 3, 64)
    assert torch.allclose(gradient, local_gradient)
    assert gradient.abs().sum() > 0


def test_cache(model, routed):
    with model.trace("Hello world", remote="local") as tracer:
        cache = tracer.cache()
    with model.trace("Hello world") as tracer:
        local_cache = tracer.cache()
    assert set(cache.keys()) == set(local_cache.keys())
    assert torch.equal(cache["model.transformer.h.1"].output, local_cache["model.transformer.h.1"].output)
    assert torch.equal(cache.transformer.h[0].output, local_cache.transformer.h[0].output)


def test_print_reaches_the_users_stdout(model, routed, capsys):
    with model.trace("Hello world", remote="local"):
        hidden = model.transformer.h[0].output
        print("hidden shape:", tuple(hidden.shape))
        print("to stderr", file=sys.stderr)
    captured = capsys.readouterr()
    assert "hidden shape: (1, 3, 64)" in captured.out
    assert "to stderr" in captured.err


def test_explicit_backend_works_without_install(model, sourcebox_worker):
    backend = sourcebox_nnsight.WorkerBackend(sourcebox_worker)
    with model.trace("Hello world", backend=backend):
        hidden = model.transformer.h[0].output.save()
    assert hidden.shape == (1, 3, 64)


def test_without_opting_in_nnsight_keeps_its_own_remote_local(model, sourcebox_worker):
    from nnsight.intervention.backends.local import LocalSimulationBackend

    if sourcebox_nnsight.installed_worker() is not None:
        pytest.skip("this session routes remote='local' to a worker (--sourcebox / SOURCEBOX=1)")
    assert isinstance(model._remote_backend("local", True, None, False), LocalSimulationBackend)
    sourcebox_nnsight.install(sourcebox_worker)
    try:
        assert model._remote_backend("local", True, None, False).worker is sourcebox_worker
        inner = object()  # installs nest: the innermost worker wins until it is uninstalled
        sourcebox_nnsight.install(inner)
        assert model._remote_backend("local", True, None, False).worker is inner
        sourcebox_nnsight.uninstall()
        assert model._remote_backend("local", True, None, False).worker is sourcebox_worker
    finally:
        sourcebox_nnsight.uninstall()
    assert isinstance(model._remote_backend("local", True, None, False), LocalSimulationBackend)
    with model.trace("Hello world", remote="local"):
        hidden = model.transformer.h[0].output.save()
    assert hidden.shape == (1, 3, 64)


def test_big_saved_tensor(model, routed):
    with model.trace("Hello world", remote="local"):
        hidden = model.transformer.h[0].output
        # 3 * 64 * 87382 floats: about 64 MiB, far above the shared-memory threshold.
        big = hidden.repeat(1, 1, 87382).save()
    assert big.shape == (1, 3, 64 * 87382)
    assert torch.equal(big[..., :64], big[..., 64:128])
    assert big.nbytes >= 64 << 20


def test_a_request_for_another_model_is_refused(sourcebox_worker):
    with pytest.warns(FutureWarning):
        other = nnsight.LanguageModel(models.path("tiny-gpt2-3l"))
    backend = sourcebox_nnsight.WorkerBackend(sourcebox_worker)
    with pytest.raises(Exception) as failure:
        with other.trace("Hello", backend=backend):
            other.transformer.h[0].output.save()
    message = str(failure.value)
    assert "tiny-gpt2-3l-" in message and "this worker hosts model 'tiny-gpt2-" in message


# --- faithfulness: what fails on the server fails here, at the user's line ---------


def _line_of(marker: str, path: str = __file__) -> int:
    with open(path) as source:
        return next(number for number, line in enumerate(source, 1) if marker in line and "_line_of" not in line)


def _last_frame(error: BaseException) -> traceback.FrameSummary:
    return traceback.extract_tb(error.__traceback__)[-1]


def test_an_error_in_the_body_points_at_the_users_line(model, routed):
    with pytest.raises(ZeroDivisionError) as failure:
        with model.trace("Hello world", remote="local"):
            hidden = model.transformer.h[0].output
            ratio = 1 / 0  # user-error-line
    frame = _last_frame(failure.value)
    assert (frame.filename, frame.lineno) == (__file__, _line_of("# user-error-line"))
    assert "1 / 0" in frame.line


def test_an_object_that_cannot_travel_is_refused_at_the_line_that_reads_it(model, routed):
    import capture

    guard = threading.Lock()
    with pytest.raises(capture.CaptureError) as failure:
        with model.trace("Hello world", remote="local"):
            hidden = model.transformer.h[0].output.save()
            held = guard  # unshippable-line
    frame = _last_frame(failure.value)
    assert (frame.filename, frame.lineno) == (__file__, _line_of("# unshippable-line"))
    assert "guard" in str(failure.value)


@pytest.fixture(scope="module")
def faithfulness_helpers(tmp_path_factory):
    project = tmp_path_factory.mktemp("helpers_project")
    (project / "late_helpers.py").write_text(textwrap.dedent('''\
        def via_late_import(x):
            import late_helpers_two  # late-import-line
            return late_helpers_two.twice(x)


        def via_pandas(x):
            import pandas  # pandas-line
            return pandas.Series(x.flatten().tolist()).mean()


        def read_local_file(path):
            with open(path) as handle:  # open-line
                return handle.read()
        '''))
    (project / "late_helpers_two.py").write_text("def twice(x):\n    return 2 * x\n")
    sys.path.insert(0, str(project))
    try:
        import late_helpers

        yield late_helpers
    finally:
        sys.path.remove(str(project))
        for name in ("late_helpers", "late_helpers_two"):
            sys.modules.pop(name, None)


def test_a_user_module_imported_at_call_time_fails_at_its_import(model, faithfulness_helpers, routed):
    helpers_file = faithfulness_helpers.__file__
    with pytest.raises(ImportError) as failure:
        with model.trace("Hello world", remote="local"):
            doubled = faithfulness_helpers.via_late_import(model.transformer.h[0].output).save()
    frame = _last_frame(failure.value)
    assert (frame.filename, frame.lineno) == (helpers_file, _line_of("# late-import-line", helpers_file))
    assert "late_helpers_two" in str(failure.value) and "policy 'default'" in str(failure.value)


def test_a_package_outside_the_policy_fails_at_its_import(model, faithfulness_helpers, profile_workers):
    # nnsight's own remote='local' keeps the stdlib and a few packages; pandas is not one.
    backend = sourcebox_nnsight.WorkerBackend(profile_workers("nnsight-local"))
    helpers_file = faithfulness_helpers.__file__
    with pytest.raises(ImportError) as failure:
        with model.trace("Hello world", backend=backend):
            mean = nnsight.save(faithfulness_helpers.via_pandas(model.transformer.h[0].output))
    frame = _last_frame(failure.value)
    assert (frame.filename, frame.lineno) == (helpers_file, _line_of("# pandas-line", helpers_file))
    assert "pandas" in str(failure.value) and "nnsight-local" in str(failure.value)


def test_opening_a_local_file_fails(model, faithfulness_helpers, routed, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the client's data")
    helpers_file = faithfulness_helpers.__file__
    with pytest.raises(Exception) as failure:
        with model.trace("Hello world", remote="local"):
            hidden = model.transformer.h[0].output
            text = nnsight.save(faithfulness_helpers.read_local_file(str(secret)))
    frame = _last_frame(failure.value)
    assert (frame.filename, frame.lineno) == (helpers_file, _line_of("# open-line", helpers_file))
    assert "text" not in locals()


@pytest.fixture(scope="module")
def profile_workers():
    """Workers under other policies than the session's, started on first use."""
    import runner

    started = {}

    def worker(profile):
        if profile not in started:
            started[profile] = runner.Worker(model="tiny-gpt2", policy=profile)
        return started[profile]

    try:
        yield worker
    finally:
        for running in started.values():
            running.close()


def test_functools_is_refused_under_the_ndif_allowlist(model, profile_workers):
    backend = sourcebox_nnsight.WorkerBackend(profile_workers("ndif-allowlist"))
    with pytest.raises(ImportError) as failure:
        with model.trace("Hello world", backend=backend):
            hidden = model.transformer.h[0].output
            import functools  # functools-line

            total = functools.reduce(lambda a, b: a + b, [hidden, hidden]).save()
    frame = _last_frame(failure.value)
    assert (frame.filename, frame.lineno) == (__file__, _line_of("# functools-line"))
    assert "functools" in str(failure.value) and "ndif-allowlist" in str(failure.value)


# --- repeated traces: the second identical trace sends its digest alone -----------------


def _normalized_trace(model, normalize, **options):
    with model.trace("The Eiffel Tower is in Paris", **options):
        first = normalize(model.transformer.h[0].output).save()
        last_norm = model.transformer.h[-1].output.norm(dim=-1).save()
    return first, last_norm


def _bytes_written(worker, trace):
    before = worker.stats()["bytes_sent"]
    result = trace()
    return result, worker.stats()["bytes_sent"] - before


def test_a_repeated_trace_sends_only_its_digest(model, mymethods, routed):
    first, first_bytes = _bytes_written(routed, lambda: _normalized_trace(model, mymethods.normalize, remote="local"))
    again, again_bytes = _bytes_written(routed, lambda: _normalized_trace(model, mymethods.normalize, remote="local"))
    assert again_bytes <= 400 < first_bytes  # the block, its variables and normalize's source stayed there
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    local = _normalized_trace(model, mymethods.normalize)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(again, local))


def test_a_restarted_worker_answers_a_repeated_trace_through_the_miss_path(model, mymethods):
    import os
    import signal
    import time

    import runner

    with runner.Worker(model="tiny-gpt2") as worker:
        backend = sourcebox_nnsight.WorkerBackend(worker)
        first = _normalized_trace(model, mymethods.normalize, backend=backend)
        status = worker.status()
        os.kill(status["worker_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while worker.status()["restarts"] == status["restarts"] or worker.status()["state"] != "ready":
            assert time.monotonic() < deadline, "the supervisor did not restart the worker"
            time.sleep(0.05)
        again, sent = _bytes_written(worker, lambda: _normalized_trace(model, mymethods.normalize, backend=backend))
        assert worker.stats()["resends"] == 1  # the digest missed in the new, empty store, then the request went
        assert sent > 400 and all(torch.equal(a, b) for a, b in zip(first, again))


def test_a_trace_request_under_a_false_digest_is_refused_and_never_kept(sourcebox_worker):
    import msgpack

    import runner

    honest = msgpack.packb({"model": "m"}, use_bin_type=True)
    false_name = sourcebox_nnsight._request_digest(b"another request")
    with pytest.raises(Exception, match="does not match its digest"):
        sourcebox_worker.request(sourcebox_nnsight.TRACE_REQUEST, {"digest": false_name, "request": honest})
    # Not kept: the same name alone is a miss (resent once, as it was, then given up).
    with pytest.raises(runner.RunnerError, match="does not hold"):
        sourcebox_worker.request(sourcebox_nnsight.TRACE_REQUEST, {"digest": false_name})
