"""Plain data, stdlib values, numpy arrays and server objects by reference: dumped here,
loaded in a fresh interpreter that never imports torch, and compared by description
(types, contents, and which objects are shared) with the originals."""
import collections
import datetime
import decimal
import fractions
import math
import pathlib
import re
import uuid

import numpy as np
import pytest

import capture
from capture_support.child_main import describe
from capture_support.harness import CaseList, header_problems, ship_and_load

cases = CaseList()


def check_same_description(obj, expected):
    return describe(obj)


def shared_list():
    shared = [1]
    return [shared, shared, {"again": shared}]


def self_containing_list():
    loop = [0]
    loop.append(loop)
    return loop


def self_containing_dict():
    loop = {"name": "root"}
    loop["self"] = loop
    return loop


def cycle_through_a_tuple():
    inner = []
    outer = (inner, "tail")
    inner.append(outer)
    return outer


def mutual_dicts():
    left, right = {"name": "left"}, {"name": "right"}
    left["other"], right["other"] = right, left
    return [left, right]


def nested_lists(depth):
    value = ["bottom"]
    for _ in range(depth):
        value = [value]
    return value


DESCRIBED = {
    "none_and_bools": lambda: (None, True, False),
    "ints_including_big_ints": lambda: [0, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 2**100, -(2**200), 10**400],
    "floats": lambda: [0.0, -0.0, 1.5, 1e308, 5e-324, math.inf, -math.inf, math.nan],
    "complex_numbers": lambda: [complex(1, -2), 1j, complex(math.inf, -0.0)],
    "strings": lambda: ["", "ascii", "ünïcödé", "emoji 🎉", "nul\x00byte", "a" * 100_000],
    "string_with_lone_surrogate": lambda: "broken \ud800 utf-16",
    "bytes_and_bytearray": lambda: [b"", b"\x00\xff", bytes(range(256)), bytearray(b"mutable")],
    "large_bytes": lambda: bytes(range(256)) * 4096,
    "tuples_and_lists": lambda: ((1, (2, (3,))), [1, [2, [3]]], [(), []]),
    "dict_with_non_string_keys_keeps_order": lambda: {"b": 1, "a": 2, 1: "int", (1, 2): "tuple", None: "none", 2.5: "float", frozenset({1}): "frozenset"},
    "empty_containers": lambda: [(), [], {}, set(), frozenset(), b"", ""],
    "sets_and_frozensets": lambda: [{"alpha", "beta", 3, (1, 2)}, frozenset({"x", frozenset({"y"})})],
    "nested_fifty_levels": lambda: nested_lists(50),
    "shared_references": shared_list,
    "list_containing_itself": self_containing_list,
    "dict_containing_itself": self_containing_dict,
    "cycle_through_a_tuple": cycle_through_a_tuple,
    "two_dicts_referring_to_each_other": mutual_dicts,
    "numpy_arrays": lambda: [
        np.arange(12, dtype=np.float64).reshape(3, 4), np.array([1, -2, 3], dtype=np.int32),
        np.array([True, False]), np.array([1.5, -2.25], dtype=np.float16), np.array(7.0),
        np.zeros((0, 3), dtype=np.int64), np.array([1 + 2j], dtype=np.complex128),
        np.arange(256, dtype=np.uint8),
    ],
    "non_contiguous_numpy_arrays": lambda: [np.arange(20).reshape(4, 5)[:, ::2], np.asfortranarray(np.arange(6.0).reshape(2, 3)),
                                            np.arange(12).reshape(3, 4).T],
    "numpy_scalars": lambda: [np.float32(1.5), np.float64(-2.5), np.int64(7), np.bool_(True)],
    "shared_numpy_array": lambda: (lambda array: [array, array])(np.arange(4)),
}
for case_name, make in DESCRIBED.items():
    cases.case(build=lambda user, make=make: make(), expect=describe, name=case_name)(check_same_description)


def stdlib_values():
    return [
        collections.OrderedDict([("b", 1), ("a", 2)]), collections.defaultdict(list, {"a": [1]}),
        collections.Counter("hello"), collections.deque([1, 2], maxlen=3),
        datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc), datetime.date(2024, 2, 29),
        datetime.timedelta(days=1, microseconds=5), decimal.Decimal("1.10"), fractions.Fraction(1, 3),
        uuid.UUID(int=12345), pathlib.PurePosixPath("/a/b"), range(1, 10, 2), slice(1, None, 2), Ellipsis, NotImplemented,
    ]


def typed_reprs(values):
    return [f"{type(value).__module__}.{type(value).__qualname__}: {value!r}" for value in values]


@cases.case(build=lambda user: stdlib_values(), expect=typed_reprs)
def check_stdlib_values(obj, expected):
    defaults = obj[1]
    defaults["new"].append(2)  # the default factory travelled
    assert defaults["new"] == [2]
    del defaults["new"]
    return [f"{type(value).__module__}.{type(value).__qualname__}: {value!r}" for value in obj]


SERVER_OBJECTS = [math.sqrt, len, int, collections.OrderedDict, type(None), np.float32, np.linalg.norm, math]


@cases.case(build=lambda user: (SERVER_OBJECTS, math.pi))
def check_server_objects_travel_by_reference(obj, expected):
    import collections
    import math

    import numpy

    references, pi = obj
    assert pi == math.pi
    originals = [math.sqrt, len, int, collections.OrderedDict, type(None), numpy.float32, numpy.linalg.norm, math]
    assert len(references) == len(originals)
    for loaded, original in zip(references, originals):
        assert loaded is original, f"{loaded!r} is a copy of {original!r}, not the destination's own object"


@cases.case(build=lambda user: [bytearray(b"ab"), np.arange(3)])
def check_loaded_buffers_are_writable(obj, expected):
    data, array = obj
    data[0] = ord("z")
    array[0] = 9
    assert (bytes(data), array.tolist()) == (b"zb", [9, 1, 2])


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return ship_and_load(cases, None, tmp_path_factory.mktemp("load"))


@pytest.mark.parametrize("name", cases.names)
def test_value_travels(loaded, name):
    value = loaded.result(name)
    if loaded.expected(name) is not None:
        assert value == loaded.expected(name)


def test_loading_values_and_arrays_does_not_import_torch(loaded):
    assert "capture" in loaded.modules_in_child, "the loading process did not finish"
    assert "torch" not in loaded.modules_in_child


@pytest.mark.parametrize("payload", [bytes(range(256)) * 4096, np.zeros(1 << 18, dtype=np.float32)],
                         ids=["bytes", "ndarray"])
def test_large_buffers_travel_as_frames_not_in_the_header(payload):
    bundle = capture.encode(payload)
    assert len(bundle.header) < 4096
    assert sum(len(frame) for frame in bundle.frames) >= 1 << 20
    assert not header_problems(bundle.header)


@pytest.mark.parametrize("policy", [None, capture.DATA_ONLY], ids=["default", "data-only"])
def test_a_large_bytes_value_shared_twice_travels_once_and_stays_one_object(policy):
    # Regression: bytes over the frame threshold skipped the memo, so each reference
    # shipped its own copy and the receiver got two distinct objects.
    shared = b"a" * 100_000
    data = capture.dumps([shared, shared, {"again": shared}])
    assert len(data) < 2 * len(shared), f"the bundle holds more than one copy ({len(data)} bytes)"
    first, second, third = capture.loads(data, policy=policy)
    assert first == shared and first is second and second is third["again"]


def test_deep_nesting_round_trips_or_is_refused_clearly():
    depth = 5000  # deeper than the default recursion limit
    try:
        data = capture.dumps(nested_lists(depth))
    except capture.CaptureError as refusal:
        assert re.search("deep|nest|depth|recurs", str(refusal)), str(refusal)
        return
    loaded = capture.loads(data)
    for _ in range(depth):
        assert type(loaded) is list and len(loaded) == 1
        loaded = loaded[0]
    assert loaded == ["bottom"]
