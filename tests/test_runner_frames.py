"""The frames API (issue 13): a call as a bundle's header and frames, the answer as an
undecoded ``runner.Outcome``, decoded as data only wherever it ends up."""
import signal

import capture
import msgpack
import numpy
import pytest

import runner
from runner.frames import failure_outcome


def identity(value):
    return value


def fail(key):
    return {}[key]


def crash():
    import os
    os.kill(os.getpid(), 9)


@pytest.fixture(scope="module")
def worker():
    with runner.Worker(model="none") as started:
        yield started


def test_a_call_passes_through_as_frames_and_decodes_on_the_caller(worker):
    value = numpy.arange(1 << 18, dtype=numpy.float32)  # 1 MiB: above the shared-memory threshold
    bundle = runner.encode_call_frames(identity, (value,), policy=worker.policy)
    assert bundle.frames[0].obj is not None and numpy.shares_memory(numpy.asarray(bundle.frames[0]), value)
    outcome = worker.run_frames(bundle.header, bundle.frames)
    assert outcome.kind == "reply" and isinstance(outcome.meta["sources"]["id"], str)
    # The large frame is the worker's sealed result memfd, mapped here: not a copy.
    address = numpy.asarray(outcome.frames[1]).ctypes.data
    assert mapping_of(address).endswith("(deleted)") and "/memfd:" in mapping_of(address)
    assert not outcome.frames[1].readonly  # copy-on-write: the result's own memory
    assert numpy.array_equal(runner.decode_outcome(outcome), value)


def mapping_of(address):
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(part, 16) for part in line.split()[0].split("-"))
            if start <= address < end:
                return line.strip()
    return ""


def test_read_only_frames_decode_too(worker):
    outcome = worker.run_frames(*split(runner.encode_call_frames(identity, ({"a": numpy.ones(3)},))))
    frozen = runner.Outcome(outcome.kind, outcome.meta, [bytes(frame) for frame in outcome.frames])
    assert numpy.array_equal(runner.decode_outcome(frozen)["a"], numpy.ones(3))


def split(bundle):
    return bundle.header, bundle.frames


def test_a_miss_is_handed_back_and_a_full_resend_cures_it():
    with runner.Worker(model="none") as fresh:
        bundle = runner.encode_call_frames(identity, (7,), policy=fresh.policy)
        by_digest = runner.encode_call_frames(identity, (7,), policy=fresh.policy,
                                              known_sources=bundle.source_digests)
        outcome = fresh.run_frames(by_digest.header, by_digest.frames)
        assert outcome.kind == "miss" and outcome.meta["missing"] == list(bundle.source_digests)
        with pytest.raises(runner.RunnerError, match="known_sources"):
            runner.decode_outcome(outcome)
        assert runner.decode_outcome(fresh.run_frames(bundle.header, bundle.frames)) == 7
        # Held now: the same call by digest alone is answered.
        assert runner.decode_outcome(fresh.run_frames(by_digest.header, by_digest.frames)) == 7


def test_failures_are_outcomes_raised_on_decode_as_their_own_types(worker):
    outcome = worker.run_frames(*split(runner.encode_call_frames(fail, ("nope",))))
    assert outcome.kind == "error" and outcome.frames == []
    with pytest.raises(KeyError, match="nope"):
        runner.decode_outcome(outcome)
    crashed = worker.run_frames(*split(runner.encode_call_frames(crash)))
    with pytest.raises(runner.WorkerCrashed) as caught:
        runner.decode_outcome(crashed)
    assert caught.value.returncode == -signal.SIGKILL
    relayed = failure_outcome(runner.WorkerCrashed("lost the connection", None, "tail"))
    with pytest.raises(runner.WorkerCrashed, match="lost the connection"):
        runner.decode_outcome(relayed)
    with pytest.raises(runner.ServerBusy, match="too many"):
        runner.decode_outcome(failure_outcome(runner.ServerBusy("too many clients")))


def test_run_bytes_outcome_is_plain_msgpack_read_in_place(worker):
    value = numpy.arange(1 << 18, dtype=numpy.float32)
    data = worker.run_bytes(runner.encode_call(identity, (value,), policy=worker.policy))
    assert numpy.array_equal(runner.decode_result(data), value)
    # Any msgpack reader sees {"result": bundle bytes}: the fast path changes no format.
    unpacked = msgpack.unpackb(data, raw=False)
    assert list(unpacked) == ["result"]
    assert numpy.array_equal(capture.loads(unpacked["result"], policy=capture.DATA_ONLY), value)
    with pytest.raises(KeyError, match="nope"):
        runner.decode_result(worker.run_bytes(runner.encode_call(fail, ("nope",))))
