"""The destination protocol: ``provides`` decides what travels by reference and what as
source, ``resolve`` rebuilds references, ``builtins`` is where shipped code's imports meet
the policy. A recording test destination shows what capture asked of it."""
import json
import math
import os

import numpy as np
import pytest

import capture
from capture_support.harness import UserCode, header_strings
from capture_support.policies import StdlibDestination


@pytest.fixture
def user(tmp_path):
    with UserCode(tmp_path, ["mymethods", "needs_os"]) as user:
        yield user


def test_a_module_the_destination_provides_travels_by_reference(user):
    destination = StdlibDestination(extra={"mymethods"})
    bundle = capture.encode(user.mymethods.factorial, policy=destination)
    assert "mymethods" in destination.provides_asked
    assert not any("def factorial" in text for text in header_strings(bundle.header))
    assert capture.loads(bundle.to_bytes(), policy=destination) is user.mymethods.factorial
    assert ("mymethods", "factorial") in destination.resolved


def test_a_module_the_destination_lacks_travels_as_source(user):
    destination = StdlibDestination()
    bundle = capture.encode(user.mymethods.factorial, policy=destination)
    assert any("def factorial" in text for text in header_strings(bundle.header))
    loaded = capture.loads(bundle.to_bytes(), policy=destination)
    assert loaded is not user.mymethods.factorial
    assert loaded(5) == 120


def test_the_policy_name_is_recorded_in_the_header(user):
    destination = StdlibDestination(name="policy-under-test")
    bundle = capture.encode(user.mymethods.factorial, policy=destination)
    assert "policy-under-test" in header_strings(bundle.header)


def test_server_objects_are_rebuilt_through_resolve():
    destination = StdlibDestination()
    data = capture.dumps([math.sqrt, os.path.join], policy=destination)
    sqrt, join = capture.loads(data, policy=destination)
    assert sqrt is math.sqrt and join is os.path.join
    assert ("math", "sqrt") in destination.resolved


def test_imports_made_by_shipped_code_go_through_the_policy_builtins(user):
    without_os = StdlibDestination(missing={"os"})
    working_directory, square_root = capture.loads(
        capture.dumps([user.needs_os.working_directory, user.needs_os.square_root]), policy=without_os,
    )
    assert square_root(9) == 3.0
    with pytest.raises(ImportError, match="does not provide module 'os'"):
        working_directory()


def test_a_reference_to_a_module_the_destination_lacks_fails_at_load():
    data = capture.dumps(json.dumps)  # json.dumps names itself json.dumps (os.getcwd would say posix)
    with pytest.raises((capture.BundleError, ImportError), match="json"):
        capture.loads(data, policy=StdlibDestination(missing={"json"}))


@pytest.mark.parametrize("value", [np.float32, np.arange(3)], ids=["numpy_type", "ndarray"])
def test_numpy_objects_are_refused_for_a_destination_without_numpy(value):
    with pytest.raises(capture.CaptureError, match="numpy"):
        capture.dumps(value, policy=StdlibDestination())
