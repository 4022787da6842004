"""``python -m fuzz [--bundles N] [--seed S] [--jobs J] [--no-sockets] [--socket-rounds R]``
and ``python -m fuzz soak [...]``: see fuzz/__init__.py and docs/RUNNER.md."""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:
        from . import soak
        return soak.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m fuzz", description="Fuzz bundle decoding and a live server.")
    parser.add_argument("--bundles", type=int, default=100_000, help="mutated bundles to decode (default 100000)")
    parser.add_argument("--seed", type=int, default=1, help="cases are a function of the seed and their number")
    parser.add_argument("--jobs", type=int, default=2, help="child processes decoding at once")
    parser.add_argument("--memory-mb", type=int, default=1024, help="memory a child may add while decoding")
    parser.add_argument("--case-seconds", type=float, default=10.0, help="time one decode may take")
    parser.add_argument("--no-sockets", action="store_true", help="skip the live-server cases")
    parser.add_argument("--socket-rounds", type=int, default=2, help="times each socket case runs")
    args = parser.parse_args(argv)
    failed = 0

    from . import bundles
    shown = [0.0]

    def bundle_progress(report: bundles.Report) -> None:
        if time.monotonic() - shown[0] > 10:
            shown[0] = time.monotonic()
            print(f"  bundles: {report.cases}/{args.bundles} {report.counts}", flush=True)

    report = bundles.run(args.bundles, seed=args.seed, jobs=args.jobs, memory_mb=args.memory_mb,
                         case_seconds=args.case_seconds, progress=bundle_progress)
    print(f"bundles: {report.cases} decoded in {report.seconds:.0f} s (seed {args.seed})")
    for policy, counts in sorted(report.by_policy.items()):
        print(f"  {policy:10} " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    for number, policy, mutator, outcome, detail in report.failures[:50]:
        print(f"  FAIL case {number} ({policy}, {mutator}): {outcome}: {detail}")
    failed += report.failed

    if not args.no_sockets:
        from . import sockets
        results = sockets.run(rounds=args.socket_rounds)
        print(f"sockets: {len(results)} cases x {args.socket_rounds} rounds on one live server")
        for name, counts in results.items():
            bad = sum(n for outcome, n in counts.items() if outcome != "served")
            print(f"  {name:24} " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())) + (" FAIL" if bad else ""))
            failed += bad
    print("fuzz: " + ("FAILED" if failed else "passed") + f" ({failed} failing case(s))")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
