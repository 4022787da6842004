"""Hostile-header fuzzing, in its own process so that a crash is reported instead of taking
the test run down with it.

Usage: python fuzz_header.py REPO_ROOT USER_DIR REPORT. Encodes a bundle of user code,
tensors and data, then replaces every value of its header, one at a time, with values of
the wrong type or absurd size, and decodes each result. A decode may succeed or raise
BundleError (or the policy's ImportError, for a reference to a module that does not
exist); anything else is recorded. REPORT receives
``{"mutations": n, "failures": [[path, replacement, error], ...]}``.
"""
import faulthandler
import json
import sys

faulthandler.enable()  # a segfault prints where it happened

repo_root, user_dir, report_path = sys.argv[1:]
sys.path[0:1] = [repo_root, user_dir]

import msgpack  # noqa: E402 - needs the paths above
import numpy as np  # noqa: E402
import torch  # noqa: E402

import capture  # noqa: E402
from fuzz.bundles import header_paths, replaced  # noqa: E402
import myclasses  # noqa: E402
import mymethods  # noqa: E402

MAX_MUTATIONS = 2500
REPLACEMENTS = [None, -1, 2**63, 1.5, "x", b"\x00", [], {}, msgpack.ExtType(1, b"\xff\xff\xff\xff")]


def main():
    shipped = {
        "counter": mymethods.make_counter(2), "add": mymethods.add, "cube": mymethods.cube,
        "config": myclasses.TrainConfig(layers=[3]), "span": myclasses.Span(1), "color": myclasses.Color.RED,
        "tensor": torch.arange(12.0).reshape(3, 4).t(), "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "blob": bytes(range(256)) * 1024, "data": [{1, 2}, frozenset("ab"), 2**100, 3 - 4j],
    }
    bundle = capture.encode(shipped)
    frames = list(bundle.frames)
    tree = msgpack.unpackb(bundle.header, raw=False, strict_map_key=False)
    candidates = [(path, value) for path in header_paths(tree) for value in REPLACEMENTS]
    step = max(1, len(candidates) // MAX_MUTATIONS)
    failures = []
    tried = 0
    for path, value in candidates[::step]:
        header = msgpack.packb(replaced(tree, path, value), use_bin_type=True)
        tried += 1
        try:
            capture.decode(header, frames)
        except (capture.BundleError, ImportError):
            pass
        except BaseException as error:  # everything else is what this fuzzer looks for
            failures.append([repr(path), repr(value), f"{type(error).__name__}: {error}"[:300]])
    with open(report_path, "w") as handle:
        json.dump({"mutations": tried, "failures": failures}, handle)


main()
