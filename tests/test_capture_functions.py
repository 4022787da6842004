"""Functions travel as source: each case is dumped here and loaded and run in a fresh
interpreter whose sys.path does not hold the user's modules.

The ``check_*`` functions run in that interpreter (their source is sent there), so they
import what they use themselves.
"""
import pytest

from capture_support.harness import CaseList, UserCode, ship_and_load

USER_MODULES = ["mymethods", "shadowing", "future_annotations", "guarded_imports"]
cases = CaseList()


def build_scale_and_shift(user):
    user.mymethods.SCALE = 5  # rebinding after import: the current value must travel
    return user.mymethods.scale_and_shift


@cases.case(build=build_scale_and_shift)
def check_defaults_annotations_docstring(obj, expected):
    assert obj(2) == 2 * 2 * 5 + 1.0
    assert obj(2, 0.5, factor=3) == 2 * 3 * 5 + 0.5
    assert obj.__defaults__ == (1.0,)
    assert obj.__kwdefaults__ == {"factor": 2}
    assert obj.__annotations__ == {"x": float, "shift": float, "factor": int, "return": float}
    assert obj.__doc__ == "Scale x by factor and SCALE, then add shift."
    assert (obj.__name__, obj.__qualname__, obj.__module__) == ("scale_and_shift", "scale_and_shift", "mymethods")


def build_remember(user):
    user.mymethods.remember("a")
    user.mymethods.remember("b")
    return user.mymethods.remember


@cases.case(build=build_remember)
def check_mutated_default_keeps_its_contents(obj, expected):
    assert obj("c") == ["a", "b", "c"]


@cases.case(build=lambda user: user.mymethods.PAIR)
def check_two_lambdas_on_one_line(obj, expected):
    increment, times_ten = obj
    assert (increment(1), times_ten(1)) == (2, 10)
    assert increment.__name__ == times_ten.__name__ == "<lambda>"


@cases.case(build=lambda user: user.mymethods.apply)
def check_lambda_as_default_argument(obj, expected):
    assert obj(10) == 3
    assert obj(-4, abs) == 4


@cases.case(build=lambda user: user.mymethods.make_scaler(4))
def check_closure_reading_a_captured_value(obj, expected):
    assert obj(3) == 12
    assert obj.__closure__[0].cell_contents == 4


def build_counter(user):
    counter = user.mymethods.make_counter(10)
    counter()
    counter()
    return counter


@cases.case(build=build_counter)
def check_nonlocal_counter_keeps_counting(obj, expected):
    assert obj() == 13
    assert obj(5) == 18
    assert obj() == 19


def build_account(user):
    deposit, read = user.mymethods.make_account()
    deposit(5)
    return deposit, read


@cases.case(build=build_account)
def check_two_closures_share_one_cell(obj, expected):
    deposit, read = obj
    assert read() == 5
    assert deposit(10) == 15
    assert read() == 15
    assert deposit.__closure__[0] is read.__closure__[0]


@cases.case(build=lambda user: user.mymethods.factorial)
def check_recursive_function(obj, expected):
    assert obj(10) == 3628800


@cases.case(build=lambda user: user.mymethods.is_even)
def check_mutually_recursive_functions(obj, expected):
    assert obj(10) is True
    assert obj(7) is False
    assert obj.__globals__["is_odd"](7) is True


@cases.case(build=lambda user: user.mymethods.make_fib())
def check_recursive_closure(obj, expected):
    assert obj(15) == 610


@cases.case(build=lambda user: user.mymethods.twice_plus_one)
def check_nested_functions(obj, expected):
    assert obj(5) == 11


@cases.case(build=lambda user: user.mymethods.countdown)
def check_generator_function(obj, expected):
    import inspect

    assert inspect.isgeneratorfunction(obj)
    assert list(obj(3)) == [3, 2, 1]


@cases.case(build=lambda user: user.mymethods.slow_double)
def check_async_function(obj, expected):
    import asyncio
    import inspect

    assert inspect.iscoroutinefunction(obj)
    assert asyncio.run(obj(4)) == 8


def build_wrapped_add(user):
    user.mymethods.add(1, 1)
    return user.mymethods.add


@cases.case(build=build_wrapped_add)
def check_functools_wraps_decorator(obj, expected):
    assert obj(2, 3) == 5
    assert obj.calls == 2  # the wrapper's own attribute, one call before dumping
    assert (obj.__name__, obj.__doc__) == ("add", "Add two numbers.")
    assert obj.__wrapped__(4, 5) == 9
    assert obj.calls == 2


@cases.case(build=lambda user: user.mymethods.shout)
def check_user_decorator_with_arguments(obj, expected):
    assert obj("hi") == ["HI", "HI", "HI"]


@cases.case(build=lambda user: user.mymethods.cube)
def check_functools_partial(obj, expected):
    import functools

    assert isinstance(obj, functools.partial)
    assert obj.keywords == {"exponent": 3}
    assert obj(2) == 8


@cases.case(build=lambda user: user.mymethods.cached_square)
def check_functools_lru_cache(obj, expected):
    assert obj(4) == 16
    assert obj(4) == 16
    assert obj.cache_info().hits == 1
    assert obj.cache_info().maxsize is None
    assert obj.__wrapped__(3) == 9


@cases.case(build=lambda user: user.mymethods.uses_local_imports)
def check_imports_inside_function_body(obj, expected):
    assert obj([1, 2, 2, 3]) == (2, 2, 2)


@cases.case(build=lambda user: user.mymethods.hypot)
def check_server_module_global(obj, expected):
    import math

    assert obj(3, 4) == 5.0
    assert obj.__globals__["math"] is math


@cases.case(build=lambda user: user.mymethods.tagged)
def check_attributes_set_on_a_function(obj, expected):
    assert obj.unit == "meters"
    assert obj(7) == 7


@cases.case(build=lambda user: user.shadowing.total)
def check_module_name_shadowing_a_builtin(obj, expected):
    assert obj([1, 2]) == 300


@cases.case(build=lambda user: (user.shadowing.doubled, user.shadowing.squares))
def check_comprehension_variables_shadowing_globals(obj, expected):
    doubled, squares = obj
    assert doubled([1, 2]) == [2, 4]
    assert squares([3]) == {3: 9}


@cases.case(build=lambda user: user.shadowing.bump_all)
def check_lambda_parameter_shadowing_a_global(obj, expected):
    assert obj([1, 2]) == [2, 3]


@cases.case(build=lambda user: user.shadowing.first_truthy)
def check_generator_expression_variable_shadowing_a_global(obj, expected):
    assert obj([0, "", 5, 6]) == 5


@cases.case(build=lambda user: (user.future_annotations.norm, user.future_annotations.describe))
def check_postponed_annotations_naming_type_checking_imports(obj, expected):
    norm, describe_thing = obj
    assert norm([3.0, 4.0]) == 5.0
    assert norm.__annotations__ == {"values": "list[float]", "return": "Tensorish"}
    assert describe_thing(1) == "<1>"


@cases.case(build=lambda user: user.guarded_imports.batch_size)
def check_type_checking_guarded_import(obj, expected):
    assert obj([1, 2]) == 2
    assert obj.__annotations__ == {"batch": "Batch", "return": "int"}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    with UserCode(tmp_path_factory.mktemp("user"), USER_MODULES) as user:
        return ship_and_load(cases, user, tmp_path_factory.mktemp("load"))


@pytest.mark.parametrize("name", cases.names)
def test_function_travels(loaded, name):
    loaded.result(name)


def test_loading_plain_functions_does_not_import_torch(loaded):
    assert "capture" in loaded.modules_in_child, "the loading process did not finish"
    assert "torch" not in loaded.modules_in_child


def test_a_captured_function_does_not_keep_its_code_alive(tmp_path):
    # The sending side caches the bytecode analysis per code object; a long-lived client
    # must not keep the code of every function it ever sent (an lru_cache kept 8,192).
    import gc
    import importlib.util
    import weakref

    import capture
    from capture.source import global_names

    (tmp_path / "shortlived.py").write_text("import math\n\ndef area(r):\n    return math.pi * r * r\n")
    spec = importlib.util.spec_from_file_location("shortlived", tmp_path / "shortlived.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert capture.loads(capture.dumps(module.area))(1.0) == module.area(1.0)
    code = weakref.ref(module.area.__code__)
    assert global_names(code()) is global_names(code()), "the analysis is cached while the code lives"
    del module, spec
    gc.collect()
    assert code() is None, "the code object outlived its function: a cache still holds it"
