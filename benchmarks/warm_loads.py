"""Warm loads of the code scenarios against cloudpickle-by-value, in one run (issue 15).

``python -m benchmarks.warm_loads [--rounds N]`` prints, per code scenario, sourcebox's and
cloudpickle-by-value's warm ``loads`` (median over interleaved rounds) and their ratio
computed round by round, plus how many sourcebox loads replayed a cached plan. The full
run (``make bench``) measures the same in its serialization phase; this is the quick way
to see that one target.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import capture

from . import baselines, serialization
from .measure import interleaved, paired_ratios, summarize
from .settings import QUICK
from .usercode import write_and_import


def measure(rounds: int = 25) -> list[dict]:
    """One record per code scenario: both medians (seconds), the ratio, plan hits while timing."""
    user = write_and_import(tempfile.mkdtemp(prefix="sourcebox-bench-user-"))
    records = []
    for scenario in serialization.scenarios(user, QUICK):
        if scenario.kind != "code":
            continue
        user.reload()
        obj = scenario.build()
        ours, theirs = baselines.make(baselines.OURS), baselines.make(baselines.CLOUDPICKLE_BY_VALUE, user.modules)
        payloads = {baselines.OURS: ours.dumps(obj), baselines.CLOUDPICKLE_BY_VALUE: theirs.dumps(obj)}
        for serializer in (ours, theirs):  # checked before anything is timed
            if not scenario.check(obj, serializer.loads(payloads[serializer.name])):
                raise AssertionError(f"{serializer.name} did not carry the {scenario.title}")
        plans_before = capture.plan_cache_info().hits
        samples = interleaved({name: (lambda s=serializer, p=payloads[name]: s.loads(p))
                               for name, serializer in ((baselines.OURS, ours), (baselines.CLOUDPICKLE_BY_VALUE, theirs))},
                              repeats=rounds)
        records.append({"scenario": scenario.title,
                        "sourcebox": summarize(samples[baselines.OURS]),
                        "cloudpickle_by_value": summarize(samples[baselines.CLOUDPICKLE_BY_VALUE]),
                        "ratio": paired_ratios(samples[baselines.OURS], samples[baselines.CLOUDPICKLE_BY_VALUE]),
                        "plan_hits": capture.plan_cache_info().hits - plans_before})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warm_loads", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args(argv)
    for record in measure(args.rounds):
        print(f"{record['scenario'][:60]:<60} sourcebox {record['sourcebox']['median'] * 1e6:8.1f} us  "
              f"cloudpickle-by-value {record['cloudpickle_by_value']['median'] * 1e6:8.1f} us  "
              f"ratio {record['ratio']['median']:.2f}x  plan hits {record['plan_hits']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
