"""Loading side of the capture tests: a fresh interpreter that has never seen the user's code.

Run as ``python -I child_main.py SPEC.json``. The spec lists bundles to load, and for each
the source of a check function (written in a test module) that exercises the loaded
object. Every case reports on its own into the results file, so one interpreter (and one
``import torch``) serves a whole test module while each case still fails by itself.

Before anything is loaded the child verifies its isolation (the user's modules must not
be importable) and replaces ``pickle``/``marshal`` loading with guards: a bundle must
rebuild everything from source and raw data, so any call to them fails the case.

``describe`` is also imported by the test process: both sides describe objects the same
way, and the test compares the two descriptions.

This file must stay importable on every Python the cross-version test uses (3.10+).
"""
import ast
import faulthandler
import importlib.util
import io
import json
import sys
import traceback
import types

# A case whose load or check hangs is dumped to stderr and the child exits, so the test
# process reports that case by name instead of one opaque timeout.
CASE_TIMEOUT_S = 60


class GuardHit(AssertionError):
    """pickle or marshal was used to rebuild objects while loading a bundle."""


def install_unpickling_guards(hits):
    """Make pickle's and marshal's loading functions raise (and record) GuardHit, and record
    every global an unpickler of any kind resolves (the ``pickle.find_class`` audit event).

    The classes stay in place (torch subclasses them at import time). The import system
    itself reads .pyc files with marshal.loads; those calls (from frozen importlib frames)
    still pass, so lazily imported modules keep working.
    """
    import _pickle
    import marshal
    import pickle

    def refuse(qualname):
        def refused(*args, **kwargs):
            hits.append(qualname)
            raise GuardHit(f"{qualname} was called while loading a bundle")
        return refused

    for module, attribute in (
        (pickle, "loads"), (pickle, "load"), (pickle, "_loads"), (pickle, "_load"),
        (_pickle, "loads"), (_pickle, "load"), (marshal, "load"),
    ):
        setattr(module, attribute, refuse(f"{module.__name__}.{attribute}"))

    import_system_loads = marshal.loads

    def marshal_loads_for_imports_only(data, *args, **kwargs):
        if sys._getframe(1).f_code.co_filename.startswith("<frozen "):
            return import_system_loads(data, *args, **kwargs)
        hits.append("marshal.loads")
        raise GuardHit("marshal.loads was called while loading a bundle")

    marshal.loads = marshal_loads_for_imports_only

    def audit(event, args):
        if event == "pickle.find_class":
            hits.append(f"an unpickler resolving {args[0]}.{args[1]}")

    sys.addaudithook(audit)
    if "torch" in sys.modules:  # torch.load unpickles with its own Unpickler
        sys.modules["torch"].load = refuse("torch.load")


def guards_work(hits):
    """Self-test: the guards really catch pickle and marshal (else the cases prove nothing)."""
    import marshal
    import pickle
    caught = 0
    for attempt in (lambda: pickle.loads(b"\x80\x04K\x01."), lambda: marshal.loads(b"\xe9\x01\x00\x00\x00")):
        try:
            attempt()
        except GuardHit:
            caught += 1
    pickle.Unpickler(io.BytesIO(pickle.dumps(len))).load()  # resolves builtins.len
    found_class = bool(hits)
    hits.clear()
    return caught == 2 and found_class


def isolation_problems(spec):
    """What the loading process can see that it must not: the user's own modules."""
    problems = []
    for name in spec["absent_modules"]:
        found = importlib.util.find_spec(name)
        if found is not None:
            problems.append(f"user module {name!r} is importable in the loading process (from {found.origin})")
    return problems


def compile_check(case):
    """Compile the check function from its test module's source, at its real file and line.

    Decorators are dropped (they register the case in the test process); pytest's assertion
    rewriting is applied where pytest is installed, so failed asserts show their values.
    """
    padded = "\n" * (case["check_line"] - 1) + case["check_source"]
    tree = ast.parse(padded)
    function = tree.body[0]
    function.decorator_list = []
    try:
        from _pytest.assertion.rewrite import rewrite_asserts
    except ImportError:  # the cross-version venvs hold only msgpack and capture
        pass
    else:
        rewrite_asserts(tree, padded.encode(), case["check_file"])
    namespace = {"__name__": "capture_check", "describe": describe}
    exec(compile(tree, case["check_file"], "exec"), namespace)
    return namespace[function.name]


def to_json(value):
    """A check's return value as JSON (repr for whatever JSON cannot hold)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return {"unserializable repr": repr(value)}


def run_case(capture, case, hits):
    with open(case["bundle"], "rb") as handle:
        data = handle.read()
    check = compile_check(case)
    obj = capture.loads(data)
    if hits:
        raise GuardHit(f"loading used {hits}")
    value = check(obj, case["expected"])
    if hits:
        raise GuardHit(f"the loaded object used {hits}")
    return value


def main(spec_path):
    with open(spec_path) as handle:
        spec = json.load(handle)
    results = {"__isolation__": isolation_problems(spec), "__cases__": {}}

    def flush():
        with open(spec["results"], "w") as handle:
            json.dump(results, handle)

    for name in spec.get("preload", []):
        importlib.import_module(name)
    hits = []
    install_unpickling_guards(hits)
    if not guards_work(hits):
        results["__isolation__"].append("the pickle/marshal guards did not catch a test call")
    sys.path.insert(0, spec["capture_root"])
    import capture

    flush()
    for case in spec["cases"]:
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        print(f"--- case {case['name']}", file=sys.stderr, flush=True)
        hits.clear()
        try:
            value = run_case(capture, case, hits)
            results["__cases__"][case["name"]] = {"ok": True, "value": to_json(value)}
        except BaseException:  # every failure, SystemExit from user code included, is the case's
            results["__cases__"][case["name"]] = {"ok": False, "error": traceback.format_exc()}
        faulthandler.cancel_dump_traceback_later()
        flush()
    results["__modules__"] = sorted(name for name in sys.modules if "." not in name)
    flush()


def describe(value, _seen=None):
    """A JSON description of a value: types, contents, tensor layout, and which objects are shared.

    Mutable containers, tensors, arrays and instances are numbered when first met; meeting
    one again gives ``{"same as": n}``, so equal descriptions mean equal structure, equal
    sharing and equal cycles. Immutable values (numbers, strings, tuples) are compared by value.
    """
    seen = {} if _seen is None else _seen

    def again(obj):
        if id(obj) in seen:
            return {"same as": seen[id(obj)][0]}
        seen[id(obj)] = (len(seen), obj)  # holding obj keeps its id from being reused
        return None

    kind = type(value)
    if value is None or kind in (bool, int, str):
        return {kind.__name__: value}
    if kind in (float, complex):
        return {kind.__name__: repr(value)}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is tuple:
        return {"tuple": [describe(item, seen) for item in value]}
    if kind is frozenset:
        return {"frozenset": sorted((describe(item, seen) for item in value), key=json.dumps)}
    module = getattr(kind, "__module__", "")
    if module.startswith("torch") and kind.__name__ in ("Tensor", "Parameter"):
        import torch

        data = value.detach()
        return again(value) or {
            kind.__name__: str(value.dtype), "shape": list(value.shape), "stride": list(value.stride()),
            "requires_grad": value.requires_grad, "is_leaf": value.is_leaf,
            "values": (torch.view_as_real(data) if data.is_complex() else data).tolist(),
        }
    if module == "numpy" and kind.__name__ == "ndarray":
        return again(value) or {
            "ndarray": value.dtype.str, "shape": list(value.shape), "writeable": bool(value.flags.writeable),
            "values": describe(value.tolist(), {}),
        }
    if module == "numpy":  # numpy scalars
        return {kind.__name__: repr(value.item())}
    repeat = again(value)
    if repeat:
        return repeat
    if kind is bytearray:
        return {"bytearray": value.hex()}
    if kind is list:
        return {"list": [describe(item, seen) for item in value]}
    if kind is set:
        return {"set": sorted((describe(item, seen) for item in value), key=json.dumps)}
    if isinstance(value, dict):
        described = {kind.__qualname__: [[describe(k, seen), describe(v, seen)] for k, v in value.items()]}
        if hasattr(value, "default_factory"):
            described["default_factory"] = describe(value.default_factory, seen)
        if kind is not dict and getattr(value, "__dict__", None):
            described["state"] = describe(vars(value), seen)
        return described
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return {"callable": getattr(value, "__qualname__", repr(value))}
    slots = [name for klass in kind.__mro__ for name in getattr(klass, "__slots__", ())]
    state = {name: getattr(value, name) for name in slots if hasattr(value, name)}
    state.update(getattr(value, "__dict__", {}))
    return {"object": kind.__qualname__, "state": describe(state, seen)}


if __name__ == "__main__":
    main(sys.argv[1])
