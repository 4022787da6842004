"""Ship objects built from user code in this process; load them in a fresh one that lacks it.

A test module registers cases on a ``CaseList``: how to build the object from the user's
modules (imported here from a private temporary directory) and a check function that runs
in the loading process. ``ship_and_load`` dumps every case, runs ONE child interpreter for
all of them (``python -I``: no cwd, no PYTHONPATH, no user site; the user's directory is not
on its path), and returns per-case outcomes that fail with the case's own error.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest

SUPPORT_DIR = Path(__file__).resolve().parent
REPO_ROOT = SUPPORT_DIR.parents[1]
USERCODE_DIR = SUPPORT_DIR / "usercode"
CHILD_MAIN = SUPPORT_DIR / "child_main.py"

# One child loads a whole test module's bundles; torch alone costs ~2 s of that.
CHILD_TIMEOUT_S = 240
# A header node that is not a msgpack scalar or container may only be an ext reference:
# a small index, never a serialized object.
MAX_EXT_PAYLOAD = 8


class UserCode:
    """User modules and packages copied from ``usercode/`` into a private directory.

    Inside the ``with`` block the directory is on ``sys.path``, as a researcher's project
    would be; on exit it is removed and every module imported from it is forgotten, so the
    next test module gets fresh copies. Modules are reached as attributes: ``user.mymethods``.
    """

    def __init__(self, directory: Path, names: list[str]):
        self.directory = Path(directory)
        self.names = names

    def __enter__(self) -> "UserCode":
        for name in self.names:
            source = USERCODE_DIR / name
            if source.is_dir():
                shutil.copytree(source, self.directory / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(source.with_suffix(".py"), self.directory / f"{name}.py")
        sys.path.insert(0, str(self.directory))
        importlib.invalidate_caches()
        return self

    def __exit__(self, *exc_info) -> None:
        sys.path.remove(str(self.directory))
        inside = str(self.directory) + os.sep
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(inside):
                del sys.modules[name]

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return importlib.import_module(name)

    def path_of(self, name: str) -> Path:
        """The file a user module was imported from (what tracebacks must name)."""
        return self.directory / f"{name}.py"


@dataclass
class Case:
    name: str
    build: Callable[[UserCode], Any]
    check: Callable  # check(obj, expected), run in the loading process; may return JSON
    expect: Callable[[Any], Any] | None = None  # expected value from the original object


class CaseList:
    """Cases of one test module, registered with ``@cases.case(build=...)`` on their check."""

    def __init__(self):
        self.cases: dict[str, Case] = {}

    def case(self, build, expect=None, name=None):
        """Register the decorated check; ``name`` defaults to its name without ``check_``,
        and lets several cases share one check function."""
        def register(check):
            case_name = name or check.__name__.removeprefix("check_")
            assert case_name not in self.cases, f"two cases named {case_name}"
            self.cases[case_name] = Case(case_name, build, check, expect)
            return check
        return register

    @property
    def names(self) -> list[str]:
        return list(self.cases)


def header_problems(header: bytes) -> list[str]:
    """Anything in a bundle header that is not plain data: ext payloads big enough to hold an
    object, or byte strings that unmarshal to code objects."""
    import marshal
    import types

    problems = []

    def walk(node, path):
        if isinstance(node, msgpack.ExtType):
            if len(node.data) > MAX_EXT_PAYLOAD:
                problems.append(f"{path}: ext type {node.code} with a {len(node.data)}-byte payload")
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(key, f"{path}.key({key!r})")
                walk(value, f"{path}[{key!r}]")
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{path}[{index}]")
        elif isinstance(node, bytes):
            try:
                if isinstance(marshal.loads(node), types.CodeType):
                    problems.append(f"{path}: bytes that unmarshal to a code object")
            except (ValueError, EOFError, TypeError):
                pass
        elif not (node is None or isinstance(node, (bool, int, float, str))):
            problems.append(f"{path}: {type(node).__name__}")

    try:
        tree = msgpack.unpackb(header, raw=False, strict_map_key=False)
    except UnicodeDecodeError as error:
        return [f"a msgpack str that is not UTF-8, which other readers reject: {error}"]
    walk(tree, "header")
    return problems


def header_strings(header: bytes) -> list[str]:
    """Every string in a bundle header (to see whether a name or source text travelled)."""
    found = []

    def walk(node):
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(key)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(msgpack.unpackb(header, raw=False, strict_map_key=False))
    return found


def checked_dumps(obj) -> bytes:
    """``capture.dumps`` plus the properties every bundle must have: ``encode`` agrees with
    ``dumps``, and the header is plain data."""
    import capture

    data = capture.dumps(obj)
    bundle = capture.encode(obj)
    assert bundle.to_bytes() == data, "encode(obj).to_bytes() differs from dumps(obj)"
    problems = header_problems(bundle.header)
    assert not problems, "bundle header holds more than plain data:\n" + "\n".join(problems)
    return data


@dataclass
class Outcome:
    expected: Any = None
    dump_error: str | None = None
    load_result: dict | None = None


class LoadRun:
    """What happened to each case: dumped here, loaded and checked in the child."""

    def __init__(self, outcomes: dict[str, Outcome], isolation: list[str], modules: list[str], child_log: str):
        self.outcomes = outcomes
        self.isolation = isolation
        self.modules_in_child = modules
        self.child_log = child_log

    def expected(self, name: str):
        """What the case's ``expect`` computed from the original object in this process."""
        return self.outcomes[name].expected

    def result(self, name: str):
        """The check's return value; fails the calling test with the case's own error."""
        if self.isolation:
            pytest.fail("the loading process was not isolated:\n" + "\n".join(self.isolation))
        outcome = self.outcomes[name]
        if outcome.dump_error:
            pytest.fail(f"case {name}: building or dumping failed in the test process:\n{outcome.dump_error}")
        if outcome.load_result is None:
            pytest.fail(f"case {name}: the loading process died before reporting it:\n{self.child_log[-4000:]}")
        if not outcome.load_result["ok"]:
            pytest.fail(f"case {name}: loading or checking failed in the loading process:\n{outcome.load_result['error']}")
        return outcome.load_result["value"]


def check_source(check: Callable) -> tuple[str, str, int]:
    lines, first_line = inspect.getsourcelines(check)
    return inspect.getsourcefile(check), "".join(lines), first_line


def ship_and_load(
    cases: CaseList,
    user: UserCode | None,
    workdir: Path,
    *,
    python: str = sys.executable,
    capture_root: Path = REPO_ROOT,
    bundles: dict[str, bytes | str] | None = None,
    absent_modules: list[str] = (),
    preload: list[str] = (),
) -> LoadRun:
    """Dump every case (or take ready ``bundles`` by case name) and load them all in one child.

    ``absent_modules`` adds module names (besides the user's) that the child must not find;
    ``preload`` names modules the child imports before loading (so their own loaders, such
    as ``torch.load``, can be guarded too).
    """
    workdir = Path(workdir)
    (workdir / "bundles").mkdir(parents=True, exist_ok=True)
    child_cwd = workdir / "empty-cwd"
    child_cwd.mkdir(exist_ok=True)
    outcomes = {}
    spec_cases = []
    for name, case in cases.cases.items():
        outcomes[name] = Outcome()
        try:
            if bundles is not None:  # made elsewhere: bytes, or the traceback of a failed dump
                data, expected = bundles.get(name, f"no bundle was made for case {name}"), None
                if isinstance(data, str):
                    outcomes[name].dump_error = data
                    continue
            else:
                obj = case.build(user)
                expected = case.expect(obj) if case.expect else None
                outcomes[name].expected = expected
                data = checked_dumps(obj)
        except Exception:
            outcomes[name].dump_error = traceback.format_exc()
            continue
        bundle_path = workdir / "bundles" / f"{name}.bundle"
        bundle_path.write_bytes(data)
        check_file, source, first_line = check_source(case.check)
        spec_cases.append({
            "name": name, "bundle": str(bundle_path), "expected": expected,
            "check_file": check_file, "check_source": source, "check_line": first_line,
        })
    absent = list(absent_modules) + (list(user.names) if user else [])
    spec = {
        "capture_root": str(capture_root), "absent_modules": absent, "preload": list(preload),
        "results": str(workdir / "results.json"), "cases": spec_cases,
    }
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    completed = subprocess.run(
        [python, "-I", str(CHILD_MAIN), str(spec_path)],
        cwd=child_cwd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
        env=minimal_env(),
    )
    child_log = f"exit status {completed.returncode}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    try:
        results = json.loads((workdir / "results.json").read_text())
    except FileNotFoundError:
        results = {"__isolation__": [f"the loading process reported nothing:\n{child_log}"], "__cases__": {}}
    for name, result in results["__cases__"].items():
        outcomes[name].load_result = result
    return LoadRun(outcomes, results["__isolation__"], results.get("__modules__", []), child_log)


def minimal_env(**extra: str) -> dict[str, str]:
    """An environment without PYTHON* variables (and so without the test process's paths)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(extra)
    return env


def run_python(args: list[str], *, cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the test interpreter with ``args``; the result keeps stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=env if env is not None else minimal_env(),
    )


def collect_bundles(directory: Path) -> dict[str, bytes | str]:
    """Bundles a producer process wrote as ``<case>.bundle`` (or ``<case>.error`` with the
    traceback of a failed dump), by case name, ready for ``ship_and_load(bundles=...)``."""
    found: dict[str, bytes | str] = {}
    for path in Path(directory).iterdir():
        if path.suffix == ".bundle":
            found[path.stem] = path.read_bytes()
        elif path.suffix == ".error":
            found[path.stem] = f"dumping failed in the producing process:\n{path.read_text()}"
    return found
