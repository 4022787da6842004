"""Bundles made here load and run on other Python minor versions, in venvs that hold only
msgpack and a copy of the capture package (no torch, no numpy, nothing of this project).

Interpreters come from pyenv (``$(pyenv root)/versions/3.10*`` and so on); each gets a venv
from ``runner.envs.cached``, created once per machine and reused.
"""
import shutil
import sys
from pathlib import Path

import pytest

from capture_support.harness import REPO_ROOT, CaseList, UserCode, checked_dumps, ship_and_load
from runner import envs

OTHER_MINORS = ["3.10", "3.12", "3.13"]

cases = CaseList()
# Interpreters and environments come from runner.envs (shared with the worker tests on
# other Pythons, tests/test_runner_crosspy.py); these names stay for other tests' use.
pyenv_root = envs.pyenv_root


def interpreter_for(minor: str) -> Path | None:
    """The newest pyenv-installed ``python3`` of a minor version, if any."""
    return envs.interpreter_for(minor)


def venv_with_msgpack(interpreter: Path) -> Path:
    """The python of a venv of ``interpreter`` holding only msgpack (built once per machine
    in ``~/.cache/sourcebox/envs``, then reused).

    The interpreter is there, so a venv that cannot be built fails the test: skipping
    would turn the claim that bundles load on other Pythons into silence.
    """
    try:
        return envs.cached(interpreter, ["msgpack"])
    except envs.EnvError as error:
        pytest.fail(f"{interpreter} is installed, but its msgpack-only test environment could not be built: "
                    f"{error}", pytrace=False)


@cases.case(build=lambda user: user.mymethods.scale_and_shift)
def check_function_with_defaults_and_annotations(obj, expected):
    assert obj(2) == 2 * 2 * 3 + 1.0
    assert obj.__kwdefaults__ == {"factor": 2}
    assert obj.__annotations__["return"] is float


def build_counter(user):
    counter = user.mymethods.make_counter(5)
    counter()
    return counter


@cases.case(build=build_counter)
def check_nonlocal_counter(obj, expected):
    assert obj() == 7
    assert obj() == 8


@cases.case(build=lambda user: (user.mymethods.is_even, user.mymethods.PAIR, user.mymethods.countdown))
def check_recursion_lambdas_and_generators(obj, expected):
    is_even, (increment, times_ten), countdown = obj
    assert is_even(10) and not is_even(3)
    assert (increment(1), times_ten(1)) == (2, 10)
    assert list(countdown(3)) == [3, 2, 1]


@cases.case(build=lambda user: (user.mymethods.cube, user.mymethods.cached_square, user.mymethods.shout))
def check_partial_lru_cache_and_user_decorator(obj, expected):
    cube, cached_square, shout = obj
    assert cube(2) == 8
    assert cached_square(5) == 25
    assert shout("a") == ["A", "A", "A"]


@cases.case(build=lambda user: (user.myclasses.Rectangle(2, 3), user.myclasses.TrainConfig(layers=[1, 2]),
                                user.myclasses.Color.GREEN, user.myclasses.Point(1, -2)))
def check_classes_and_instances(obj, expected):
    rectangle, config, green, point = obj
    assert rectangle.describe() == "Rectangle with 4 sides, area 6"
    assert type(rectangle).square(2).is_square
    assert config.total_units() == 3 and config == type(config)(layers=[1, 2])
    assert green is type(green).GREEN and green.label() == "green"
    assert point.manhattan() == 3


def build_cache(user):
    user.cachemod.put("seed", 1)
    return user.cachemod.put, user.cachemod.get


@cases.case(build=build_cache)
def check_module_namespace_is_shared(obj, expected):
    put, get = obj
    put("k", 2)
    assert (get("k"), get("seed")) == (2, 1)


@cases.case(build=lambda user: [{"b", "a"}, frozenset({1, 2}), 2**100, -(3**70), 1 - 2j, b"\x00\xff", bytearray(b"x"),
                                (1, [2, {"k": None}]), bytes(range(256)) * 1024])
def check_plain_values(obj, expected):
    assert obj[:8] == [{"a", "b"}, frozenset({1, 2}), 2**100, -(3**70), 1 - 2j, b"\x00\xff", bytearray(b"x"),
                       (1, [2, {"k": None}])]
    assert obj[8] == bytes(range(256)) * 1024


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Every case dumped once, here on this interpreter, and a copy of the capture package alone."""
    with UserCode(tmp_path_factory.mktemp("user"), ["mymethods", "myclasses", "cachemod"]) as user:
        made = {}
        for name, case in cases.cases.items():
            try:
                made[name] = checked_dumps(case.build(user))
            except Exception as error:  # reported by the case it belongs to
                made[name] = f"dumping on {sys.version.split()[0]} failed: {type(error).__name__}: {error}"
    capture_only = tmp_path_factory.mktemp("capture-only")
    shutil.copytree(REPO_ROOT / "capture", capture_only / "capture", ignore=shutil.ignore_patterns("__pycache__"))
    return made, capture_only


@pytest.fixture(scope="module", params=OTHER_MINORS)
def loaded_elsewhere(request, bundles, tmp_path_factory):
    minor = request.param
    interpreter = interpreter_for(minor)
    if interpreter is None:  # the only reason to skip: nothing to test on
        pytest.skip(f"Python {minor} is not installed: no {pyenv_root() / 'versions' / (minor + '.*')}/bin/python3 "
                    f"(pyenv {'is' if shutil.which('pyenv') else 'is not'} on PATH); `pyenv install {minor}` "
                    "enables this check")
    python = venv_with_msgpack(interpreter)
    made, capture_only = bundles
    return ship_and_load(cases, None, tmp_path_factory.mktemp(f"load-{minor}"), python=str(python),
                         capture_root=capture_only, bundles=made,
                         absent_modules=["mymethods", "myclasses", "cachemod", "torch", "numpy"])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", cases.names)
def test_bundle_made_here_runs_on_another_python(loaded_elsewhere, name):
    loaded_elsewhere.result(name)
