"""capture.DATA_ONLY against bundles made to run code on the reader.

Every node kind that would import, compile or call something is refused by the path of
the value that holds it; every value type the encoder sends through references,
instances and reduce nodes comes back. Attacks are judged by effect (a file written or
deleted, a module imported), each with a control that decodes the same bytes the old
way (``policy=None``) and shows the effect.
"""
import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import importlib
import os
import pathlib
import sys
import textwrap
import types
import uuid

import msgpack
import numpy as np
import pytest
import torch

import capture
import runner
from capture import format as fmt
from capture.dataonly import DATA_TAGS

REPO = pathlib.Path(__file__).resolve().parents[1]


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Config:
    layer: int
    names: list


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __eq__(self, other):
        return (self.a, self.b) == (other.a, other.b)


class Restored:
    def __init__(self, value):
        self.value = value

    def __getstate__(self):
        return {"packed": self.value}

    def __setstate__(self, state):
        self.value = state["packed"]

    def __eq__(self, other):
        return self.value == other.value


Point = collections.namedtuple("Point", "x y")

VALUES = {
    "slice": slice(1, 5, 2), "range": range(3), "complex": 1 + 2j, "bigint": 2 ** 80,
    "bytearray": bytearray(b"ab"), "set": {1, 2}, "frozenset": frozenset({3}), "bytes": b"x" * 70_000,
    "surrogate": "a\udcff", "ordered_dict": collections.OrderedDict(a=1),
    "defaultdict": collections.defaultdict(list, a=[1]), "counter": collections.Counter("aab"),
    "deque": collections.deque([1, 2], maxlen=5), "datetime": datetime.datetime(2024, 1, 2, 3, 4, 5),
    "date": datetime.date(2024, 1, 1), "time": datetime.time(1, 2), "timedelta": datetime.timedelta(3),
    "timezone": datetime.timezone(datetime.timedelta(hours=2)), "decimal": decimal.Decimal("1.5"),
    "fraction": fractions.Fraction(1, 3), "uuid": uuid.UUID(int=5), "path": pathlib.PurePosixPath("/a/b"),
    "posix_path": pathlib.Path("/tmp"), "namespace": types.SimpleNamespace(a=1),
    "enum_member": Color.RED, "dataclass": Config(2, ["x"]), "slots": Slotted(1, [2]),
    "setstate": Restored({"k": 1}), "namedtuple_instance": Point(1, 2), "ellipsis": ..., "class": Config,
    "none_type": type(None),
    "torch_size": torch.Size([2, 3]), "torch_dtype": torch.bfloat16, "torch_device": torch.device("cpu"),
    "numpy_dtype": np.dtype("f4"), "numpy_scalar": np.float32(1.5), "numpy_int": np.int64(7),
}


@pytest.mark.parametrize("name", VALUES)
def test_value_types_round_trip_as_data(name):
    value = VALUES[name]
    back = capture.loads(capture.dumps(value, policy=capture.DATA_ONLY), policy=capture.DATA_ONLY)
    assert type(back) is type(value) and back == value


def test_tensors_arrays_and_torch_named_tuples_round_trip():
    value = {"t": torch.arange(6.0).view(2, 3)[:, 1:], "a": np.arange(4), "max": torch.max(torch.eye(3), 0)}
    back = capture.loads(capture.dumps(value), policy=capture.DATA_ONLY)
    assert torch.equal(back["t"], value["t"]) and np.array_equal(back["a"], value["a"])
    assert type(back["max"]) is type(value["max"]) and torch.equal(back["max"].indices, value["max"].indices)


def test_model_outputs_come_back_as_their_fields_without_running_init():
    from transformers.modeling_outputs import BaseModelOutput

    output = BaseModelOutput(last_hidden_state=torch.ones(1, 2), hidden_states=(torch.zeros(1),))
    back = capture.loads(capture.dumps(output), policy=capture.DATA_ONLY)
    assert type(back) is BaseModelOutput and list(back.keys()) == ["last_hidden_state", "hidden_states"]
    assert torch.equal(back.last_hidden_state, output.last_hidden_state) and back[1][0].shape == (1,)


def test_shared_references_and_cycles_survive():
    inner = [1]
    value = {"a": inner, "b": inner}
    value["self"] = value
    back = capture.loads(capture.dumps(value), policy=capture.DATA_ONLY)
    assert back["a"] is back["b"] and back["self"] is back


def test_every_node_kind_is_either_data_or_refused_by_name():
    # The dispatch is one explicit table: a tag added to the format later is refused
    # until someone decides it is data.
    from capture.dataonly import _REFUSED_KINDS

    assert DATA_TAGS | set(_REFUSED_KINDS) == fmt.TAGS and not DATA_TAGS & set(_REFUSED_KINDS)


# -- code shipped in a bundle is refused where it sits ---------------------------------------

@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A user module the bundles ship as source; loading it runs its class body, which
    writes a marker (so running shipped code is visible by effect)."""
    directory = tmp_path_factory.mktemp("shipped")
    marker = directory / "class-body-ran"
    (directory / "sbx_shipped.py").write_text(textwrap.dedent(f'''\
        import functools

        MARKER = {str(marker)!r}


        class Loud:
            open(MARKER, "w").close()  # runs whenever the class statement runs

            def method(self):
                return 1

            @property
            def prop(self):
                return 2


        def plain(x):
            return x


        def make_closure(n):
            def inner():
                return n
            return inner


        @functools.lru_cache(maxsize=4)
        def cached(x):
            return x
        '''))
    sys.path.insert(0, str(directory))
    module = importlib.import_module("sbx_shipped")
    marker.unlink()  # the import itself ran the class body once
    yield module
    sys.path.remove(str(directory))
    sys.modules.pop("sbx_shipped", None)


def _kinds(shipped):
    return {
        "function": (shipped.plain, "a function shipped as source"),
        "closure": (shipped.make_closure(3), "a function shipped as source"),
        "lambda": (lambda x: x, "a function shipped as source"),
        "class": (shipped.Loud, "a class shipped as source"),
        "instance_of_shipped_class": (shipped.Loud(), "a class shipped as source"),
        "module": (shipped, "a module shipped as source"),
        "bound_method": (shipped.Loud().method, "a bound method"),
        "method": (shipped.Loud.method, "an attribute of shipped code"),
        "property": (vars(shipped.Loud)["prop"], "a property"),
        "lru_cache": (shipped.cached, "an lru_cache-wrapped function"),
        "namedtuple_class": (collections.namedtuple("Pair", "a b"), "a namedtuple class"),
    }


@pytest.mark.parametrize("kind", ["function", "closure", "lambda", "class", "instance_of_shipped_class", "module",
                                  "bound_method", "method", "property", "lru_cache", "namedtuple_class"])
def test_shipped_code_is_refused_by_path(shipped, kind):
    value, what = _kinds(shipped)[kind]
    marker = pathlib.Path(shipped.MARKER)
    # The encoder ships it as code (sbx_shipped is not a module the default destination has).
    data = capture.dumps([0, {"probe": types.SimpleNamespace(fn=value)}])
    with pytest.raises(capture.BundleError) as refused:
        capture.loads(data, policy=capture.DATA_ONLY, label="result")
    message = str(refused.value)
    assert message.startswith("refused result[1]['probe'].fn") and what in message, message
    assert "data only" in message and "send values instead" in message
    assert not marker.exists()
    # CONTROL: the same bytes read the old way rebuild the code (and run the class body).
    rebuilt = capture.loads(data)[1]["probe"].fn
    assert rebuilt is not value
    if kind in ("class", "instance_of_shipped_class", "module", "bound_method", "method"):
        assert marker.exists()
        marker.unlink()


def _header(root, nodes, modules=(), sources=()):
    return fmt.pack_header({"format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION, "python": "3", "policy": "x",
                            "root": root, "nodes": list(nodes), "sources": list(sources),
                            "modules": list(modules), "frames": []})


def _in_probe(node, extra=()):
    """A crafted bundle whose root is ``[0, {"probe": node}]``; ``node`` is index 2."""
    R = fmt.Ref
    nodes = [[fmt.LIST, [0, R(1)]], [fmt.DICT, [["probe", R(2)]]], node, *extra]
    return _header(R(0), nodes)


def test_a_reduce_that_calls_a_shipped_callable_does_not_run(tmp_path):
    marker = tmp_path / "written-by-open"
    R = fmt.Ref
    data = _in_probe([fmt.REDUCE, R(3), R(4), None, None, None],
                     [[fmt.REFERENCE, "io", "open"], [fmt.TUPLE, [str(marker), "w"]]])
    with pytest.raises(capture.BundleError, match=r"refused obj\[1\]\['probe'\]: .*io\.open with 2 argument"):
        capture.loads(data, policy=capture.DATA_ONLY)
    assert not marker.exists()
    capture.loads(data)  # CONTROL: the old way calls open(marker, "w")
    assert marker.exists()


@pytest.mark.parametrize("module, qualname, what", [
    ("os", "system", "a callable"),
    ("builtins", "eval", "a callable"),
    ("os", "", "the module os"),
    ("os", "environ", "a _Environ object"),
    ("this", "s", "not loaded here"),
    ("sbx_never_imported", "X", "not loaded here"),
])
def test_references_resolve_only_to_loaded_classes_and_values(module, qualname, what):
    sys.modules.pop("this", None)
    data = _in_probe([fmt.REFERENCE, module, qualname])
    with pytest.raises(capture.BundleError, match=r"refused obj\[1\]\['probe'\]: it is a reference to") as refused:
        capture.loads(data, policy=capture.DATA_ONLY)
    assert what in str(refused.value)
    assert "this" not in sys.modules  # nothing was imported to look


def test_a_reference_never_runs_a_module_getattr_hook(tmp_path):
    marker = tmp_path / "lazy-hook-ran"
    lazy = types.ModuleType("sbx_lazy")
    lazy.__getattr__ = lambda name: open(marker, "w").close()  # what lazy-importing packages do
    sys.modules["sbx_lazy"] = lazy
    try:
        with pytest.raises(capture.BundleError, match="does not exist here"):
            capture.loads(_in_probe([fmt.REFERENCE, "sbx_lazy", "Anything"]), policy=capture.DATA_ONLY)
        assert not marker.exists()
        capture.loads(_in_probe([fmt.REFERENCE, "sbx_lazy", "Anything"]))  # CONTROL: getattr runs the hook
        assert marker.exists()
    finally:
        del sys.modules["sbx_lazy"]


def test_a_loaded_class_with_a_finalizer_is_not_restored(tmp_path):
    """tempfile's closer deletes ``name`` when collected: restored from state the sender
    chose, it deletes any file of the reader's."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the researcher's data")
    R = fmt.Ref
    closer = [fmt.REFERENCE, "tempfile", "_TemporaryFileCloser"]
    data = _in_probe([fmt.OBJECT, R(3), None, None, R(4), None, None], [
        closer,
        [fmt.DICT, [["file", R(5)], ["name", str(victim)], ["delete", True], ["close_called", False]]],
        [fmt.OBJECT, R(3), None, None, R(6), None, None],
        [fmt.DICT, [["file", None], ["name", ""], ["delete", False], ["close_called", True]]],
    ])
    with pytest.raises(capture.BundleError,
                       match=r"refused obj\[1\]\['probe'\]\.__class__: .*tempfile\._TemporaryFileCloser .*installed library"):
        capture.loads(data, policy=capture.DATA_ONLY)
    assert victim.exists()
    capture.loads(data)  # CONTROL: restored the old way, its finalizer deletes the file
    import gc

    gc.collect()
    assert not victim.exists()


def test_new_arguments_only_for_immutable_value_subclasses():
    R = fmt.Ref
    data = _in_probe([fmt.OBJECT, R(3), R(4), None, None, None, None],
                     [[fmt.REFERENCE, "types", "CodeType"], [fmt.TUPLE, [0, 0, 0, 0, 0, 0, b"\x97\x00", "co"]]])
    with pytest.raises(capture.BundleError, match=r"refused obj\[1\]\['probe'\]\.__class__: .*types\.CodeType .*installed library"):
        capture.loads(data, policy=capture.DATA_ONLY)


def test_an_enum_lookup_may_not_create_a_new_enum():
    R = fmt.Ref
    data = _in_probe([fmt.REDUCE, R(3), R(4), None, None, None],
                     [[fmt.REFERENCE, __name__, "Color"], [fmt.TUPLE, ["Evil", "A B"]]])
    with pytest.raises(capture.BundleError, match=r"a call to .*Color with 2 argument"):
        capture.loads(data, policy=capture.DATA_ONLY)


def test_paths_read_like_attribute_access_through_instance_state():
    holder = types.SimpleNamespace(items=[0, 1, {"deep": types.SimpleNamespace(fn=print)}])
    with pytest.raises(capture.BundleError, match=r"refused result\.items\[2\]\['deep'\]\.fn: .*builtins.print"):
        capture.loads(capture.dumps(holder), policy=capture.DATA_ONLY, label="result")


def test_forged_outcome_bytes_run_nothing_in_decode_result(shipped):
    """What a fake server on the socket path could answer: a class shipped as source."""
    marker = pathlib.Path(shipped.MARKER)
    outcome = msgpack.packb({"result": capture.dumps({"probe": shipped.Loud()})}, use_bin_type=True)
    with pytest.raises(capture.BundleError, match=r"refused result\['probe'\].__class__: .*a class shipped as source"):
        runner.decode_result(outcome)
    assert not marker.exists()
    capture.loads(msgpack.unpackb(outcome)["result"])  # CONTROL: the old decode runs the class body
    assert marker.exists()
    marker.unlink()


def test_errors_keep_only_types_the_client_has_loaded():
    sys.modules.pop("this", None)
    forged = {"category": "user", "module": "this", "qualname": "Evil", "message": "boom", "args": ["boom"],
              "attributes": {}, "traceback": [["/srv/user.py", 3, "f", "raise Evil()"]], "text": "Evil: boom"}
    error = runner.errors.rebuild(forged)
    assert type(error) is runner.RemoteError and error.type_name == "this.Evil"
    assert "this" not in sys.modules
    assert "/srv/user.py" in str(error.__cause__)
    import json

    loaded = runner.errors.rebuild(dict(forged, module="json.decoder", qualname="JSONDecodeError"))
    assert type(loaded) is json.JSONDecodeError and loaded.args == ("boom",)
    for module, qualname in (("collections", "OrderedDict"), ("os", "system"), ("os", "")):
        assert type(runner.errors.rebuild(dict(forged, module=module, qualname=qualname))) is runner.RemoteError


class Finalized:
    """A class of the user's own with a finalizer: trusted, yet not restored from state."""

    def __del__(self):
        pass


def test_even_a_trusted_class_with_a_finalizer_is_not_restored():
    R = fmt.Ref
    data = _in_probe([fmt.OBJECT, R(3), None, None, None, None, None],
                     [[fmt.REFERENCE, __name__, "Finalized"]])
    with pytest.raises(capture.BundleError, match=r"refused obj\[1\]\['probe'\]: .*Finalized\.__del__"):
        capture.loads(data, policy=capture.DATA_ONLY)


def test_a_library_class_whose_extend_calls_its_state_cannot_run_a_command(tmp_path):
    """Found in review: a loaded library class (torch's AppendingByteSerializer) whose
    extend() calls a callable held in its state, given subprocess.Popen (a class) and an
    argv, ran a shell on the reader when any loaded class could be named and filled."""
    import subprocess  # noqa: F401 (loaded, as torch loads it on any client)
    import torch.utils._appending_byte_serializer  # noqa: F401

    marker = tmp_path / "written-by-a-shell"
    R = fmt.Ref
    data = _in_probe([fmt.OBJECT, R(3), None, None, R(6), R(7), None], [
        [fmt.REFERENCE, "torch.utils._appending_byte_serializer", "AppendingByteSerializer"],
        [fmt.REFERENCE, "subprocess", "Popen"],
        [fmt.LIST, ["sh", "-c", f"echo ran > {marker}"]],
        [fmt.DICT, [["_serialize_fn", R(4)], ["_writer", R(5)]]],
        [fmt.LIST, [-1]],
    ])
    with pytest.raises(capture.BundleError, match=r"refused obj\[1\]\['probe'\]\.__class__: .*installed library"):
        capture.loads(data, policy=capture.DATA_ONLY)
    assert not marker.exists()
    capture.loads(data)  # CONTROL: without the policy the shell runs
    for _ in range(100):
        if marker.exists():
            break
        import time

        time.sleep(0.05)
    assert marker.read_text().strip() == "ran"


def test_a_class_registered_with_allow_is_restored_with_its_own_methods():
    import tempfile

    registered = tempfile.SpooledTemporaryFile  # a library class, trusted only once allowed
    data = capture.dumps(types.SimpleNamespace(kind=registered))
    with pytest.raises(capture.BundleError, match="installed library"):
        capture.loads(data, policy=capture.DATA_ONLY)
    capture.DATA_ONLY.allow(registered)
    try:
        assert capture.loads(data, policy=capture.DATA_ONLY).kind is registered
    finally:
        capture.DATA_ONLY._allowed.pop(registered, None)


def test_a_tensor_dtype_cannot_make_the_reader_import_torch_submodules(tmp_path):
    """Found in review: the dtype was read with getattr(torch, name), whose lazy hook
    imported torch._dynamo (93 modules) for the name "_dynamo"."""
    script = tmp_path / "dtype.py"
    script.write_text(textwrap.dedent('''
        import sys
        import torch
        import capture
        from capture import format as fmt

        bundle = capture.encode(torch.zeros(2))
        header, _ = fmt.unpack_header(bundle.header)
        for node in header["nodes"]:
            if node[0] == fmt.TENSOR:
                node[1][1] = "_dynamo"
        data = fmt.join(fmt.pack_header(header), bundle.frames)
        before = "torch._dynamo" in sys.modules
        try:
            capture.loads(data, policy=capture.DATA_ONLY)
        except capture.BundleError as error:
            print("refused:", error)
        print("imported:", not before and "torch._dynamo" in sys.modules)
    '''))
    import subprocess

    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "refused:" in run.stdout and "unknown tensor dtype '_dynamo'" in run.stdout, run.stdout + run.stderr
    assert "imported: False" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("info", [
    {"category": "user", "module": "builtins", "qualname": "ValueError", "traceback": [[1, 2]]},
    {"category": "user", "module": "builtins", "qualname": "ValueError", "args": [[1]], "attributes": {"x": []}},
    "not a map", {"category": "user", "traceback": "abc"}, {},
])
def test_a_malformed_error_reply_becomes_an_error_never_a_crash(info):
    """Found in review: a traceback entry of the wrong shape made rebuild() raise, which
    killed the client's reply reader and left every later call waiting forever."""
    from runner.errors import RemoteError, rebuild

    error = rebuild(info)
    assert isinstance(error, BaseException)
    if not isinstance(info, dict) or "qualname" not in info:
        assert isinstance(error, RemoteError)
