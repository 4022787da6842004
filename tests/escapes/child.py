"""A confined worker for the escape suite (run as a program by harness.py).

It does what the real worker does before serving: imports torch and numpy,
builds a model, then calls ``sandbox.enter`` (unless --unconfined: the
control run). Then it serves attempts one by one from a request pipe, each
compiled as user code with ``policy.builtins()`` as its builtins, and answers
on a response pipe (its stdout is left to user code). After each attempt it
checks it can still compute with torch: a blocked attempt must leave the worker
able to serve the next request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy  # noqa: E402  (a worker holds these before it is confined)
import torch  # noqa: E402

import sandbox  # noqa: E402


def _target_usable(result: object, target: str) -> bool:
    """Is ``result`` the refused module or attribute named by ``target`` (``mod`` or ``mod:attr``)?"""
    if not target:
        return False
    module_name, _, attribute = target.partition(":")
    if isinstance(result, types.ModuleType):
        return not attribute and result.__name__ == module_name
    module = sys.modules.get(module_name)
    return bool(attribute) and module is not None and result is getattr(module, attribute, object())


def _healthy(model: torch.nn.Module) -> bool:
    with torch.no_grad():
        output = model(torch.ones(2, 4))
    return bool(torch.isfinite(output).all()) and float(numpy.ones(3).sum()) == 3.0


def _run(policy: sandbox.Policy, request: dict, model: torch.nn.Module) -> dict:
    namespace = {"__builtins__": policy.builtins(), "__name__": "request"}
    error = None
    try:
        exec(compile(request["source"], f"<attempt {request['name']}>", "exec"), namespace)
    except BaseException as caught:  # the attempt's failure is data; KILL and exit included
        error = f"{type(caught).__name__}: {caught}"
    result = namespace.get("result")
    try:
        shown = repr(result)[:4000]
    except Exception as caught:
        shown = f"<unrepresentable: {type(caught).__name__}>"
    return {
        "name": request["name"],
        "error": error,
        "result": shown,
        "target_usable": _target_usable(result, request["target"]),
        "healthy": _healthy(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--read", action="append", default=[])
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--responses", type=int, required=True)
    parser.add_argument("--unconfined", action="store_true")
    args = parser.parse_args()

    policy = sandbox.Policy.load(args.policy)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    requests = os.fdopen(args.requests, "r", encoding="utf-8")
    responses = os.fdopen(args.responses, "w", encoding="utf-8", buffering=1)
    report = None
    if not args.unconfined:
        report = sandbox.enter(policy, scratch=args.scratch, read_paths=args.read, confine="required").as_dict()
    responses.write(json.dumps({"ready": True, "pid": os.getpid(), "report": report}) + "\n")
    for line in requests:
        responses.write(json.dumps(_run(policy, json.loads(line), model)) + "\n")


if __name__ == "__main__":
    main()
