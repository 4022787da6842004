"""The escape suite: every attempt, inside a confined worker, judged by effect.

Three policies: ``ndif-allowlist`` (the strictest contract: most attempts
first have to get past the Python layer), ``default`` (the local worker's),
and ``allow-all`` (no Python-layer refusals at all: the OS layer alone must
stop every effect). One worker per policy serves all attempts in turn, so
each blocked attempt also proves the worker can serve the next request.

A control run executes the same attacks in an unconfined worker and checks
that each one does have an effect there: an attempt that does nothing even
unconfined would prove nothing.
"""

from __future__ import annotations

import pytest

from escapes.attempts import ATTEMPTS, Attempt
from escapes.harness import ConfinedWorker
from escapes.witness import Witness

import sandbox

POLICIES = ("ndif-allowlist", "default", "allow-all")


@pytest.fixture(scope="module")
def witness(tmp_path_factory):
    observer = Witness(tmp_path_factory.mktemp("escapes"))
    yield observer
    observer.close()


@pytest.fixture(scope="module")
def allow_all_policy(witness):
    path = witness.root / "allow-all.toml"
    path.write_text('name = "allow-all"\ndefault = "allow"\n')
    return str(path)


def _policy_spec(name: str, allow_all_policy: str) -> str:
    return allow_all_policy if name == "allow-all" else name


@pytest.fixture(scope="module", params=POLICIES)
def worker(request, witness, allow_all_policy):
    confined = ConfinedWorker(witness, _policy_spec(request.param, allow_all_policy))
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
    layers = worker.report["layers"]
    assert {name: layer["status"] for name, layer in layers.items()} == dict.fromkeys(sandbox.LAYERS, "active")


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=lambda attempt: attempt.name)
def test_attempt_is_blocked(worker, witness, attempt):
    if not _counts(attempt, worker.policy):
        pytest.skip(f"policy {worker.policy.name!r} provides {attempt.target}: nothing to escape to")
    before = witness.baseline(worker.pid)
    outcome = worker.run(attempt)
    effects = witness.judge(attempt, outcome, before, worker.pid)
    witness.reset()
    assert not effects, f"{attempt.name} ({attempt.goal}) escaped: {effects}; worker said {outcome}"
    assert outcome.healthy, f"the worker cannot serve after {attempt.name}: {outcome}"


def test_attacks_work_without_confinement(witness, allow_all_policy):
    """Control: unconfined and under allow-all, each attack does have an effect."""
    control = ConfinedWorker(witness, allow_all_policy, confined=False)
    try:
        inert = []
        for attempt in ATTEMPTS:
            if not attempt.control or (attempt.target and not attempt.always):
                continue
            before = witness.baseline(control.pid)
            outcome = control.run(attempt)
            if not witness.judge(attempt, outcome, before, control.pid):
                inert.append(f"{attempt.name}: {outcome.error}")
            witness.reset()
    finally:
        control.close()
    assert not inert, "attacks with no effect even unconfined (they test nothing):\n" + "\n".join(inert)
