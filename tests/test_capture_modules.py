"""Whole user modules and packages, and code born in a ``__main__`` script or an IPython cell,
shipped and run in a fresh interpreter that cannot import any of it."""
import pytest

from capture_support.harness import (
    REPO_ROOT, USERCODE_DIR, CaseList, UserCode, collect_bundles, minimal_env, run_python, ship_and_load,
)

USER_MODULES = ["cachemod", "userpkg", "heavy_importer", "stub_heavy_pkg"]
cases = CaseList()


def build_cache_functions(user):
    user.cachemod.put("seed", 1)
    user.cachemod.get("seed")
    return user.cachemod.put, user.cachemod.get, user.cachemod.lookups


@cases.case(build=build_cache_functions)
def check_functions_of_one_module_share_its_namespace(obj, expected):
    put, get, lookups = obj
    assert put.__globals__ is get.__globals__ is lookups.__globals__
    put("k", 2)
    assert get("k") == 2
    assert get("seed") == 1
    assert lookups() == 3  # `global LOOKUPS` in get rebinds the shared module global


def build_module(user):
    user.cachemod.put("before-dump", 0)
    return user.cachemod


@cases.case(build=build_module)
def check_whole_module_object(obj, expected):
    assert obj.__name__ == "cachemod"
    assert obj.CACHE["before-dump"] == 0
    obj.put("a", 1)
    assert obj.get("a") == 1
    assert obj.CACHE["a"] == 1


def build_package_objects(user):
    stats = user.userpkg.stats
    running = stats.RunningMean()
    running.push(4)
    return stats.normalize, running


@cases.case(build=build_package_objects)
def check_relative_imports_inside_a_package(obj, expected):
    normalize, running = obj
    assert normalize([5, 20]) == [0.5, 1.0]
    assert running.mean == 4.0
    assert running.push(30) == 7.0  # 30 is clamped to 10 by userpkg.utils.clamp


@cases.case(build=lambda user: user.userpkg)
def check_whole_package_object(obj, expected):
    assert obj.VERSION == "0.1"
    assert obj.clamp(50) == 10
    assert obj.stats.normalize([2, 4]) == [0.5, 1.0]


@cases.case(build=lambda user: user.userpkg.stats.limit_report)
def check_relative_import_inside_a_function_body(obj, expected):
    assert obj() == "limit 10, clamps 99 to 10"


@cases.case(build=lambda user: user.heavy_importer.mean)
def check_unused_top_level_import_of_a_package_the_destination_lacks(obj, expected):
    import sys

    assert obj([1, 2, 3]) == 2
    assert "stub_heavy_pkg" not in sys.modules


@cases.case(build=lambda user: user.heavy_importer.plot)
def check_package_only_the_client_has_travels_when_used(obj, expected):
    assert obj([1, 2]) == "plot of 2 values via stub_heavy_pkg"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    with UserCode(tmp_path_factory.mktemp("user"), USER_MODULES) as user:
        return ship_and_load(cases, user, tmp_path_factory.mktemp("load"))


@pytest.mark.parametrize("name", cases.names)
def test_module_code_travels(loaded, name):
    loaded.result(name)


# Code defined in a script run as __main__: the script dumps it; the child loads it.
main_cases = CaseList()


@main_cases.case(build=None)
def check_main_function(obj, expected):
    import sys

    assert obj(5) == 15
    assert not hasattr(sys.modules["__main__"], "add_offset"), "shipped code leaked into the loader's __main__"


@main_cases.case(build=None)
def check_main_instance(obj, expected):
    assert type(obj).__name__ == "Accumulator"
    assert obj.items == [11]
    assert obj.add(2).items == [11, 12]


@main_cases.case(build=None)
def check_main_lambda(obj, expected):
    assert obj(4) == 16


@pytest.fixture(scope="module")
def loaded_from_main(tmp_path_factory):
    script_dir = tmp_path_factory.mktemp("script")
    script = script_dir / "main_script.py"
    script.write_text((USERCODE_DIR / "main_script.py").read_text())
    out = tmp_path_factory.mktemp("main-bundles")
    produced = run_python([str(script), str(out)], cwd=script_dir, env=minimal_env(PYTHONPATH=str(REPO_ROOT)))
    assert produced.returncode == 0, produced.stderr
    return ship_and_load(main_cases, None, tmp_path_factory.mktemp("load"),
                         bundles=collect_bundles(out), absent_modules=["main_script"])


@pytest.mark.parametrize("name", main_cases.names)
def test_code_from_a_main_script_travels(loaded_from_main, name):
    loaded_from_main.result(name)


# Code defined in IPython cells (a notebook's kernel runs the same shell).
ipython_cases = CaseList()


@ipython_cases.case(build=None)
def check_ipython_function(obj, expected):
    import sys

    assert obj(2) == 6
    assert obj.__doc__ == "Scale by FACTOR."
    assert "IPython" not in sys.modules, "loading a cell's function imported IPython"


@ipython_cases.case(build=None)
def check_ipython_class(obj, expected):
    thing_class, thing = obj
    assert isinstance(thing, thing_class)
    assert thing.go(2) == 7


@pytest.fixture(scope="module")
def loaded_from_ipython(tmp_path_factory):
    pytest.importorskip("IPython", reason="IPython is a dev dependency (setup.cfg [dev])")
    out = tmp_path_factory.mktemp("ipython-bundles")
    env = minimal_env(PYTHONPATH=str(REPO_ROOT), IPYTHONDIR=str(tmp_path_factory.mktemp("ipythondir")))
    produced = run_python([str(USERCODE_DIR / "ipython_session.py"), str(out)], cwd=out, env=env)
    assert produced.returncode == 0, produced.stderr
    return ship_and_load(ipython_cases, None, tmp_path_factory.mktemp("load"), bundles=collect_bundles(out))


@pytest.mark.parametrize("name", ipython_cases.names)
def test_code_from_an_ipython_cell_travels(loaded_from_ipython, name):
    loaded_from_ipython.result(name)

