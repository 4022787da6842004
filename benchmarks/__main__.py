"""``python -m benchmarks [--quick] [--out DIR] [--report-only]``: see docs/BENCHMARKS.md."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import harness, report
from .measure import Progress
from .settings import FULL, QUICK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure sourcebox against pickle, cloudpickle and dill, and nnsight's own remote requests.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in under a minute: fewer rounds, no 256 MiB tensors, no cold loads of the "
                             "10M-parameter module, worker traces on the 2-layer model only")
    parser.add_argument("--out", metavar="DIR",
                        help=f"where latest.json and the plots go (default: {harness.DEFAULT_OUT} for a full run, "
                             f"{harness.QUICK_OUT} for --quick); a full run into the default directory also "
                             f"regenerates {harness.RESULTS_MD}, any other run writes RESULTS.md into DIR")
    parser.add_argument("--report-only", action="store_true",
                        help="do not measure: regenerate RESULTS.md and the plots from DIR/latest.json")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out or (harness.QUICK_OUT if args.quick else harness.DEFAULT_OUT))
    progress = Progress()

    if args.report_only:
        json_path = os.path.join(out, "latest.json")
        if not os.path.exists(json_path):
            parser.error(f"--report-only needs {json_path}; run the benchmarks first or name the directory with --out")
        with open(json_path) as handle:
            results = json.load(handle)
        harness.validate(results)
        paths = harness.write_report(results, out, _results_md(out, results["mode"] == "quick"))
    else:
        settings = QUICK if args.quick else FULL
        progress(f"{'quick' if args.quick else 'full'} run; results go to {out}")
        results = harness.run(settings, progress)
        paths = harness.write(results, out, _results_md(out, args.quick))
        print(report.terminal_summary(results))
    print("\nwrote:\n" + "\n".join(f"  {path}" for path in paths))
    if results["failures"]:
        print(f"\n{len(results['failures'])} phase(s) failed:\n" + "\n".join(results["failures"]), file=sys.stderr)
        return 1
    return 0


def _results_md(out: str, quick: bool) -> str:
    if not quick and out == os.path.abspath(harness.DEFAULT_OUT):
        return harness.RESULTS_MD
    return os.path.join(out, "RESULTS.md")


if __name__ == "__main__":
    sys.exit(main())
