"""Properties of bundles as a whole: plain data only, nothing runs while one is inspected,
the same objects give the same bytes, shipped code keeps its file and line numbers, and
capture works without torch."""
import json
import marshal
import shutil
import textwrap

import msgpack
import pytest

import capture
from capture_support.harness import (
    REPO_ROOT, SUPPORT_DIR, CaseList, UserCode, checked_dumps, header_problems, minimal_env, run_python,
    ship_and_load,
)


def test_header_check_catches_code_and_opaque_extension_payloads():
    """The plain-data check applied to every bundle in these tests would notice smuggled code."""
    smuggled_code = msgpack.packb({"source": marshal.dumps(compile("1", "<x>", "eval"))})
    opaque_ext = msgpack.packb([msgpack.ExtType(5, b"\x80\x04" + b"x" * 40)])
    assert header_problems(smuggled_code)
    assert header_problems(opaque_ext)
    assert not header_problems(msgpack.packb({"nodes": [["list", 1, "two", b"bytes", None, 2.5]]}))


# --- nothing executes while a bundle is inspected ------------------------------------

AUDITED_INSPECT = textwrap.dedent("""
    import json, runpy, sys
    repo_root, bundle, user_dir, report = sys.argv[1:]
    events = []

    def audit(event, args):
        if event == "compile" and user_dir in str(args[1]):
            events.append(f"compile {args[1]}")
        elif event == "exec" and user_dir in getattr(args[0], "co_filename", ""):
            events.append(f"exec {args[0].co_filename}")

    sys.addaudithook(audit)
    sys.path.insert(0, repo_root)
    sys.argv = ["capture", "inspect", bundle]
    try:
        runpy.run_module("capture", run_name="__main__", alter_sys=True)
    finally:
        with open(report, "w") as handle:
            json.dump(events, handle)
""")


@pytest.fixture(scope="module")
def side_effect_bundle(tmp_path_factory):
    """A bundle of code that writes marker files when run, and the empty marker directory."""
    markers = tmp_path_factory.mktemp("markers")
    user_dir = tmp_path_factory.mktemp("user")
    with UserCode(user_dir, ["side_effects"]) as user:
        user.side_effects.MARKER_DIR = str(markers)
        data = checked_dumps([user.side_effects.Marked, user.side_effects.Marked(), user.side_effects.with_default])
    bundle = tmp_path_factory.mktemp("bundle") / "side_effects.bundle"
    bundle.write_bytes(data)
    return bundle, markers, user_dir


def test_inspect_lists_the_bundle_without_running_it(side_effect_bundle, tmp_path):
    bundle, markers, _ = side_effect_bundle
    shown = run_python(["-m", "capture", "inspect", str(bundle)], cwd=tmp_path,
                       env=minimal_env(PYTHONPATH=str(REPO_ROOT)))
    assert shown.returncode == 0, shown.stderr
    for name in ("side_effects", "Marked", "with_default"):
        assert name in shown.stdout, f"inspect does not mention {name}:\n{shown.stdout}"
    assert list(markers.iterdir()) == [], "inspecting the bundle ran shipped code"


def test_inspect_neither_compiles_nor_executes_shipped_code(side_effect_bundle, tmp_path):
    bundle, markers, user_dir = side_effect_bundle
    report = tmp_path / "audit.json"
    audited = run_python(["-I", "-c", AUDITED_INSPECT, str(REPO_ROOT), str(bundle), str(user_dir), str(report)], cwd=tmp_path)
    assert audited.returncode == 0, audited.stderr
    assert json.loads(report.read_text()) == []
    assert list(markers.iterdir()) == []


side_effect_cases = CaseList()


@side_effect_cases.case(build=None)
def check_side_effects(obj, expected):
    _, marked, _ = obj
    assert marked.method() == "method"


def test_loading_runs_shipped_code_but_not_unrelated_top_level_statements(side_effect_bundle, tmp_path):
    """Also the premise of the two tests above: this bundle's code does leave markers when run."""
    bundle, markers, _ = side_effect_bundle
    run = ship_and_load(side_effect_cases, None, tmp_path, bundles={"side_effects": bundle.read_bytes()},
                        absent_modules=["side_effects"])
    run.result("side_effects")
    left = sorted(marker.name for marker in markers.iterdir())
    for marker in markers.iterdir():
        marker.unlink()
    assert "method" in left
    assert "module-top-level" not in left, "loading re-ran a top-level statement no shipped definition needs"


def test_inspect_refuses_garbage_with_a_clear_message(tmp_path):
    garbage = tmp_path / "not-a-bundle.bin"
    garbage.write_bytes(b"\x00garbage" * 10)
    shown = run_python(["-m", "capture", "inspect", str(garbage)], cwd=tmp_path,
                       env=minimal_env(PYTHONPATH=str(REPO_ROOT)))
    assert shown.returncode != 0
    assert "not-a-bundle.bin" in shown.stderr + shown.stdout
    assert "Traceback" not in shown.stderr


# --- deterministic bytes -------------------------------------------------------------

def test_same_objects_give_the_same_bytes_under_different_hash_seeds(tmp_path):
    pytest.importorskip("torch", reason="the determinism bundle holds a tensor")
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    with UserCode(user_dir, ["mymethods", "myclasses", "hashed_objects"]):
        pass  # only the copies are needed: the producers import them
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed-{seed}.bundle"
        produced = run_python([str(SUPPORT_DIR / "produce_bundle.py"), str(REPO_ROOT), str(user_dir), "hashed_objects", str(out)],
                              cwd=tmp_path, env=minimal_env(PYTHONHASHSEED=seed))
        assert produced.returncode == 0, produced.stderr
        outputs.append(out)
    orders = [json.loads(out.with_suffix(".bundle.order").read_text()) for out in outputs]
    assert orders[0] != orders[1], "the two hash seeds iterate the set alike: the test would prove nothing"
    first, second = (out.read_bytes() for out in outputs)
    assert first == second


def test_dumping_twice_in_one_process_gives_the_same_bytes(tmp_path):
    with UserCode(tmp_path, ["mymethods", "myclasses"]) as user:
        objects = [user.mymethods.make_counter(2), user.myclasses.TrainConfig(), {"b", "a", "c"}, user.mymethods]
        assert capture.dumps(objects) == capture.dumps(objects)


# --- tracebacks and inspect.getsource point at the user's file ------------------------

traceback_cases = CaseList()


@traceback_cases.case(build=None)
def check_tracebacks(obj, expected):
    import inspect
    import traceback

    doubled_positive, validator, halved_positive = obj
    frames = {}
    for name, call in (("function", doubled_positive), ("method", validator.validate), ("lambda", halved_positive)):
        try:
            call(-1)
        except ValueError as error:
            assert str(error) == "expected a positive number, got -1"
            frames[name] = [[f.filename, f.lineno, f.name, f.line] for f in traceback.extract_tb(error.__traceback__)[1:]]
        else:
            raise AssertionError(f"the {name} did not raise")
    sources = {
        "function": inspect.getsource(doubled_positive),
        "method": inspect.getsource(validator.validate),
        "lambda": inspect.getsource(halved_positive),
    }
    return {"frames": frames, "sources": sources}


@pytest.fixture(scope="module")
def raised_remotely(tmp_path_factory):
    """Shipped failing code run in a child after the user's files were deleted, so every line
    of source the child shows must have come inside the bundle."""
    user_dir = tmp_path_factory.mktemp("user")
    with UserCode(user_dir, ["failing"]) as user:
        failing = user.failing
        data = checked_dumps([failing.doubled_positive, failing.Validator(), failing.halved_positive])
        path = str(user.path_of("failing"))
        source = user.path_of("failing").read_text()
    shutil.rmtree(user_dir)
    run = ship_and_load(traceback_cases, None, tmp_path_factory.mktemp("load"),
                        bundles={"tracebacks": data}, absent_modules=["failing"])
    return run.result("tracebacks"), path, source.splitlines()


def line_marked(lines, marker):
    """(line number, stripped text) of the one line ending in ``# <marker>``."""
    [found] = [(number, text.strip()) for number, text in enumerate(lines, 1) if text.rstrip().endswith(marker)]
    return found


def test_traceback_shows_the_users_file_and_lines(raised_remotely):
    result, path, lines = raised_remotely
    raise_line, raise_text = line_marked(lines, "# RAISE")
    call_line, call_text = line_marked(lines, "# CALL")
    method_line, method_text = line_marked(lines, "# METHOD")
    lambda_line, lambda_text = line_marked(lines, "LAMBDA")
    raised = [path, raise_line, "check_positive", raise_text]
    called = [path, call_line, "doubled_positive", call_text]
    assert result["frames"]["function"] == [called, raised]
    assert result["frames"]["method"] == [[path, method_line, "validate", method_text], called, raised]
    assert result["frames"]["lambda"] == [[path, lambda_line, "<lambda>", lambda_text], raised]


def test_inspect_getsource_returns_the_original_source(raised_remotely):
    result, _, lines = raised_remotely
    source = "\n".join(lines) + "\n"
    function_start = source.index("def doubled_positive")
    assert result["sources"]["function"] == source[function_start:source.index("\n\n\n", function_start) + 1]
    method_start = source.index("    def validate")
    assert result["sources"]["method"] == source[method_start:source.index("\n\n\n", method_start) + 1]
    lambda_line = [line for line in lines if line.startswith("halved_positive")][0]
    assert result["sources"]["lambda"] == lambda_line + "\n"


# --- capture needs neither torch nor the other heavy packages -------------------------

WITHOUT_TORCH = textwrap.dedent("""
    import sys
    for blocked in ("torch", "numpy", "transformers", "nnsight"):
        sys.modules[blocked] = None  # any import of them now raises ImportError
    repo_root, user_dir = sys.argv[1:]
    sys.path[:0] = [repo_root, user_dir]
    import capture
    import mymethods
    import myclasses

    counter = mymethods.make_counter(1)
    data = capture.dumps({"counter": counter, "config": myclasses.TrainConfig(), "values": [1, 2.5, "x", {3}, b"\\0"]})
    loaded = capture.loads(data)
    assert loaded["counter"]() == 2
    assert loaded["config"].total_units() == 128
    assert loaded["values"] == [1, 2.5, "x", {3}, b"\\0"]
    print("round trip without torch: ok")
""")

LAZY_IMPORTS = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import capture
    capture.loads(capture.dumps({"values": [1, 2.5, "x", {3}]}))
    heavy = sorted({"torch", "numpy", "transformers", "nnsight"} & set(sys.modules))
    assert not heavy, f"import capture and a plain round trip imported {heavy}"
    print("no heavy imports: ok")
""")


def test_capture_imports_and_round_trips_without_torch(tmp_path):
    with UserCode(tmp_path, ["mymethods", "myclasses"]):
        ran = run_python(["-I", "-c", WITHOUT_TORCH, str(REPO_ROOT), str(tmp_path)], cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "ok" in ran.stdout


def test_capture_imports_torch_only_when_a_tensor_is_met(tmp_path):
    ran = run_python(["-I", "-c", LAZY_IMPORTS, str(REPO_ROOT)], cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "ok" in ran.stdout

