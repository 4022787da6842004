"""The benchmark harness: a real (tiny) measurement, the committed results, the target logic.

The full harness runs in `make test` as `python -m benchmarks --quick`; these tests keep
the pieces honest in seconds.
"""
import copy
import dataclasses
import json
import os

import pytest

from benchmarks import baselines, goals, harness, hygiene, plots, report, serialization, targets, transport
from benchmarks.measure import Progress, interleaved, paired_ratios
from benchmarks.settings import QUICK
from benchmarks.usercode import write_and_import

COMMITTED_JSON = os.path.join(harness.DEFAULT_OUT, "latest.json")


@pytest.fixture(scope="module")
def committed_results():
    if not os.path.exists(COMMITTED_JSON):
        pytest.skip(f"{COMMITTED_JSON} is written by `make bench`; none is committed yet")
    with open(COMMITTED_JSON) as handle:
        return json.load(handle)


def test_interleaved_rounds_rotate_and_pair_up():
    order = []
    contenders = {name: (lambda name=name: order.append(name)) for name in "abc"}
    samples = interleaved(contenders, repeats=4, warmup=1)
    assert {name: len(values) for name, values in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(value > 0 for values in samples.values() for value in values)
    ratios = paired_ratios([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert (ratios["median"], ratios["min"], ratios["max"], ratios["n"]) == (2.0, 2.0, 3.0, 3)
    with pytest.raises(ValueError, match="equal rounds"):
        paired_ratios([1.0], [1.0, 2.0])


def test_a_real_scenario_measures_every_serializer_and_cold_loads_in_a_fresh_process(tmp_path):
    user = write_and_import(str(tmp_path))
    settings = dataclasses.replace(QUICK, code_repeats=2, cold_repeats=1)
    small = next(s for s in serialization.scenarios(user, settings) if s.key == "small_function")
    record = serialization.run_scenario(small, user, settings, Progress())

    ours = record["serializers"][baselines.OURS]
    assert ours["status"] == "ok" and ours["payload_bytes"] > 0 and ours["loads_warm"]["n"] == 2
    # The server cannot import the user's module: the bundle loads there, a pickle does not.
    assert ours["self_contained"] is True and ours["loads_cold"]["n"] == 1
    assert record["serializers"][baselines.PICKLE]["self_contained"] is False
    assert "No module named 'bench_helpers'" in record["serializers"][baselines.PICKLE]["cold_error"]
    assert record["serializers"][baselines.CLOUDPICKLE_BY_VALUE]["self_contained"] is True
    by_value = record["ratios"][baselines.CLOUDPICKLE_BY_VALUE]
    their_bytes = record["serializers"][baselines.CLOUDPICKLE_BY_VALUE]["payload_bytes"]
    assert by_value["size"] == ours["payload_bytes"] / their_bytes
    assert by_value["dumps"]["n"] == 2


def test_the_hygiene_phase_measures_a_clean_request_in_a_worker_like_child():
    measured = hygiene.run(dataclasses.replace(QUICK, call_repeats=2), Progress())
    assert measured["status"] == "ok" and measured["version_tags"] is True and measured["watched_dicts"] > 1000
    assert all(stats["n"] == 2 and stats["median"] > 0 for stats in measured["times"].values())
    assert measured["ratio_to_forward"]["n"] == 2 and measured["hash_seconds_per_gb"]["median"] > 0
    section = "\n".join(report._hygiene({"hygiene": measured}))
    assert "## Worker hygiene between requests" in section and hygiene.AFTER in section


def test_committed_results_are_valid_and_regenerate_results_md_exactly(committed_results):
    harness.validate(committed_results)
    assert committed_results["mode"] == "full"
    plot_names = [name for name in plots.PLOT_NAMES if os.path.exists(os.path.join(harness.DEFAULT_OUT, name))]
    with open(harness.RESULTS_MD) as handle:
        assert report.markdown(committed_results, "results", plot_names) == handle.read()


def _target(results, key):
    return next(entry for entry in targets.judge(results) if entry["key"] == key)


def test_a_slow_empty_call_is_a_miss_that_names_its_largest_part(committed_results):
    if committed_results["worker"]["status"] != "ok":
        pytest.skip("the committed run has no worker numbers")
    results = copy.deepcopy(committed_results)
    times = results["worker"]["empty_call"]["times"]
    times[transport.WORKER]["median"] = 5e-3
    times[transport.PING]["median"] = 4e-3
    times[transport.ENCODE]["median"] = 1e-4
    verdict = _target(results, "empty_call")
    assert verdict["verdict"] == targets.MISSED
    assert "largest part is the client<->server round trip" in verdict["analysis"][-1]


def test_a_code_payload_over_cloudpickle_by_value_is_explained(committed_results):
    results = copy.deepcopy(committed_results)
    library = next(record for record in results["serialization"] if record["key"] == "library")
    library["ratios"][baselines.CLOUDPICKLE_BY_VALUE]["size"] = 1.2
    library["ratios"][baselines.CLOUDPICKLE_BY_VALUE]["zstd_size"] = 0.9
    library["serializers"][baselines.CLOUDPICKLE_BY_VALUE]["payload_bytes"] = int(
        library["serializers"][baselines.OURS]["payload_bytes"] / 1.2)
    verdict = _target(results, "code_payloads")
    assert verdict["verdict"] == targets.MISSED
    sentence = next(text for text in verdict["analysis"] if text.startswith(library["title"]))
    assert "1.20x" in sentence and "compressing bundles on the wire" in sentence


def test_issue_15_targets_are_judged_from_the_run_with_one_row_per_target(committed_results):
    keys = [entry.key for entry in goals.ROWS]
    assert keys == ["empty_call", "trace_vs_nnsight", "trace_vs_local", "warm_loads", "repeated_trace_bytes",
                    "start", "restart", "zero_copy_argument", "cold_loads"]
    results = copy.deepcopy(committed_results)
    results.pop("hot", None)  # a run without the hot phase: its rows say so, not a verdict
    judged = {entry["key"]: entry for entry in goals.judge(results)}
    assert judged["start"]["verdict"] == goals.NOT_MEASURED and "hot phase" in judged["start"]["measured"]
    assert judged["cold_loads"]["verdict"] == goals.REPORT
    latency = results["traces"]["latency"][0]
    latency["worker_to_local"]["median"] = 1.29
    assert {e["key"]: e for e in goals.judge(results)}["trace_vs_local"]["verdict"] == goals.PASS
    latency["worker_to_local"]["median"] = 1.31
    entry = {e["key"]: e for e in goals.judge(results)}["trace_vs_local"]
    assert entry["verdict"] == goals.MISS and "1.31x" in entry["measured"] and entry["limit"] == "<= 1.30x"
    # One scenario over the limit is a miss for the row.
    code = [record for record in results["serialization"] if record["kind"] == "code"]
    for record in code:
        record["ratios"][baselines.CLOUDPICKLE_BY_VALUE]["loads_warm"]["median"] = 0.5
    assert {e["key"]: e for e in goals.judge(results)}["warm_loads"]["verdict"] == goals.PASS
    code[-1]["ratios"][baselines.CLOUDPICKLE_BY_VALUE]["loads_warm"]["median"] = 1.01
    assert {e["key"]: e for e in goals.judge(results)}["warm_loads"]["verdict"] == goals.MISS
    results["hot"] = {"status": "ok", "start": {"spec": "tiny-gpt2", "ratio": {"median": 1.1},
                                                "times": {"ready": {"median": 3.3}, "floor": {"median": 3.0}}},
                      "restart": {"spec": "tiny-gpt2", "times": {"median": 1.6, "max": 1.7, "n": 3},
                                  "failed_calls": 0},
                      "zero_copy": {"ratio_to_empty": {"median": 1.4},
                                    "times": {name: {"median": 1e-3} for name in ("in_place", "empty", "copied")}}}
    judged = {entry["key"]: entry for entry in goals.judge(results)}
    assert judged["start"]["verdict"] == goals.PASS and judged["restart"]["verdict"] == goals.MISS
    assert judged["zero_copy_argument"]["verdict"] == goals.PASS
    assert "## Targets of issue 15" in "\n".join(report.markdown(results, None, []).splitlines())
