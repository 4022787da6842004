"""Producer process for the determinism test: dumps ``MODULE.build()`` under whatever
PYTHONHASHSEED it was started with.

Usage: python produce_bundle.py REPO_ROOT USER_DIR MODULE OUT. Writes OUT (the bundle) and
OUT.order (the module's ``iteration_order()``, to show the hash seed took effect).
"""
import importlib
import json
import sys

repo_root, user_dir, module_name, out = sys.argv[1:]
sys.path[0:1] = [repo_root, user_dir]  # replaces this script's own directory

import capture  # noqa: E402 - needs the paths above

module = importlib.import_module(module_name)
with open(out, "wb") as handle:
    handle.write(capture.dumps(module.build()))
with open(out + ".order", "w") as handle:
    json.dump(module.iteration_order(), handle)
