"""A sample of ``make fuzz`` (issue 11): mutated bundles decoded in limited child
processes, and every hostile-connection case against a live server followed by a
well-behaved client. The full run is ``make fuzz``."""
import pytest

from fuzz import bundles, sockets

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("first", [0, 1_000_000], ids=["systematic", "random"])
def test_mutated_bundles_raise_only_bundle_errors(first):
    """2,500 cases each: every header field with every msgpack type (the first cases),
    then random bit flips, truncations, splices, huge sizes and hostile nodes."""
    report = bundles.run(2_500, first=first, jobs=2)
    assert report.cases == 2_500
    assert sum(report.counts.get(kind, 0) for kind in bundles.FINE) == 2_500, \
        "\n".join(map(str, report.failures[:20]))
    assert report.counts.get("refused", 0) > 500 and report.counts.get("ok", 0) > 50  # it reached the decoder


def test_the_harness_counts_a_crash_and_a_wrong_exception_as_failures():
    """The harness's own control: a child that dies, and an exception other than the
    documented ones, are failures."""
    import capture
    assert bundles._classify(TypeError("x")) == "wrong" and bundles._classify(MemoryError()) == "memory"
    assert bundles._classify(capture.BundleError("x")) == "refused" and bundles._classify(ImportError()) == "policy"
    report = bundles.Report()
    child = bundles._Child(1, 0, 2, 64, 0.5)
    child.process.kill()  # dies before its first answer: a crash, not a start-up error
    child.fresh = False
    while not child.done:
        for row in child.poll():
            report.add(*row)
    assert report.counts.get("crash", 0) >= 1 and report.failed >= 1


@pytest.fixture(scope="module")
def server():
    live = sockets.Server.start()
    yield live
    live.close()


@pytest.mark.parametrize("case", list(sockets.CASES))
def test_a_hostile_connection_leaves_the_server_serving_others(server, case):
    outcome, detail = sockets.run_case(server, case, value=len(case))
    assert outcome == "served", f"{case}: {outcome}: {detail}"


def test_a_small_soak_loses_nothing_through_a_worker_kill_and_a_client_kill():
    """``make soak`` in miniature: 2 client processes x 20 requests (empty calls, 1 MiB
    tensors both ways, calls that raise), the worker killed at 30 %, a client at 60 %."""
    from fuzz import soak

    summary = soak.soak(2, 20, kills=True)
    assert summary["passed"], soak.format_summary(summary)
    assert len(summary["kills"]) == 2 and summary["answers"] >= 20
