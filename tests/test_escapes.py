"""The escape suite: every attempt, inside a confined worker, judged by effect.

Three policies: ``ndif-allowlist`` (the strictest contract: most attempts
first have to get past the Python layer), ``default`` (the local worker's),
and ``allow-all`` (no Python-layer refusals but for the suite's own code:
the OS layer alone must stop every effect). One worker per policy serves all attempts in turn, so
each blocked attempt also proves the worker can serve the next request.

Two kinds of worker run the same attempts: ``child`` (tests/escapes/child.py,
``sandbox.enter`` around a plain exec of the source) and ``runner``, the
product's own worker (``runner.Worker``: supervisor and sandboxed worker
process), where each attempt is a function of a user module that capture
ships as source (tests/escapes/via_runner.py).

A control run per kind executes the same attacks without the OS layer and
checks that each one does have an effect there: an attempt that does nothing
even unconfined would prove nothing.
"""

from __future__ import annotations


import pytest

from escapes.attempts import ATTEMPTS, Attempt
from escapes.harness import ConfinedWorker
from escapes.via_runner import USER_PACKAGE, RunnerWorker
from escapes.witness import Witness
from runner_support import environment

import sandbox

POLICIES = ("ndif-allowlist", "default", "allow-all")
WORKERS = [(kind, policy) for kind in ("child", "runner") for policy in POLICIES]

# No Python-layer refusals, except for the suite's own code: it is not on the
# worker, and refusing it makes capture ship it as source, as any user module.
ALLOW_ALL = f"""name = "allow-all"
default = "allow"

[[rules]]
action = "deny"
modules = ["escapes", "{USER_PACKAGE}"]
reason = "the escape suite's own code is not on the worker: it travels as source"
"""


@pytest.fixture(scope="module", autouse=True)
def _without_hygiene():
    """Attempts that fail can leave descriptors, paths or patched modules behind; the
    worker's hygiene (runner.hygiene) would retire it after each. This suite judges the
    confinement alone, on one worker, so hygiene is off for it."""
    with environment(SOURCEBOX_TEST_NO_HYGIENE="1"):
        yield


@pytest.fixture(scope="module")
def witness(tmp_path_factory):
    observer = Witness(tmp_path_factory.mktemp("escapes"))
    yield observer
    observer.close()


@pytest.fixture(scope="module")
def allow_all_policy(witness):
    path = witness.root / "allow-all.toml"
    path.write_text(ALLOW_ALL)
    return str(path)


def _policy_spec(name: str, allow_all_policy: str) -> str:
    return allow_all_policy if name == "allow-all" else name


@pytest.fixture(scope="module", params=WORKERS, ids=lambda param: "-".join(param))
def worker(request, witness, allow_all_policy, tmp_path_factory):
    kind, policy = request.param
    spec = _policy_spec(policy, allow_all_policy)
    if kind == "child":
        confined = ConfinedWorker(witness, spec)
    else:
        confined = RunnerWorker(witness, spec, tmp_path_factory.mktemp(f"runner-{policy}"))
    yield confined
    confined.close()


def _counts(attempt: Attempt, policy: sandbox.Policy) -> bool:
    """Does this attempt mean something under ``policy``?"""
    if not attempt.target or attempt.always:
        return True
    module, _, attribute = attempt.target.partition(":")
    return not policy.decide(module, attribute or None).action.permits


def test_the_suite_is_large_enough():
    assert len({attempt.name for attempt in ATTEMPTS}) == len(ATTEMPTS) >= 40


def test_worker_is_fully_confined(worker):
    assert worker.layers == dict.fromkeys(sandbox.LAYERS, "active"), worker.report


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=lambda attempt: attempt.name)
def test_attempt_is_blocked(worker, witness, attempt):
    if not _counts(attempt, worker.policy):
        pytest.skip(f"policy {worker.policy.name!r} provides {attempt.target}: nothing to escape to")
    if attempt.name in worker.not_applicable:
        pytest.skip(worker.not_applicable[attempt.name])
    before = witness.baseline(worker.pid)
    outcome = worker.run(attempt)
    assert outcome.ran, f"{attempt.name} never ran in the worker: {outcome.error}"
    effects = witness.judge(attempt, outcome, before, worker.pid, scratch=worker.scratch)
    witness.reset(scratch=worker.scratch)
    assert not effects, f"{attempt.name} ({attempt.goal}) escaped: {effects}; worker said {outcome}"
    assert outcome.healthy, f"the worker cannot serve after {attempt.name}: {outcome}"


@pytest.mark.parametrize("kind", ("child", "runner"))
def test_attacks_work_without_confinement(kind, witness, allow_all_policy, tmp_path_factory):
    """Control: without the OS layer and under allow-all, each attack does have an effect.

    The child runs unconfined (no ``sandbox.enter``); the runner's worker runs with
    ``confine="off"`` (the Python layer only), which also shows that wrapping an
    attempt in a shipped function leaves it working.
    """
    if kind == "child":
        control = ConfinedWorker(witness, allow_all_policy, confined=False)
    else:
        control = RunnerWorker(witness, allow_all_policy, tmp_path_factory.mktemp("runner-control"), confine="off")
    try:
        inert = []
        for attempt in ATTEMPTS:
            if not attempt.control or (attempt.target and not attempt.always):
                continue
            if attempt.name in control.not_applicable or attempt.name in control.control_exempt:
                continue
            before = witness.baseline(control.pid)
            outcome = control.run(attempt)
            if not outcome.ran or not witness.judge(attempt, outcome, before, control.pid, scratch=control.scratch):
                inert.append(f"{attempt.name}: {outcome.error}")
            witness.reset(scratch=control.scratch)
    finally:
        control.close()
    assert not inert, "attacks with no effect even unconfined (they test nothing):\n" + "\n".join(inert)
