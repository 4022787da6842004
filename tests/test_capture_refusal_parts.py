"""Every refusal a researcher can meet names four things: their own variable (the path),
the object's type, what the destination lacks, and a fix they can apply.

One case per message class of capture's encoder. Values are passed under names, as a
call's arguments or a trace's variables are, so the path starts at the user's name.
(The two refusals that only a worker's reply meets, a worker-made class or function and
a client lambda sent back, are checked the same way in tests/test_boundary_results.py.)
"""
import functools
import io
import re
import sys
import textwrap

import numpy as np
import pytest
import torch

import capture
import sandbox

# A fix is an instruction; these are the verbs such advice starts with.
ADVICE = re.compile(r"\b(instead|define|create|pass|send|use|make|wrap|convert|return|flatten|fix|read|"
                    r"query|materialise|give|ask)\b", re.I)


class NoTorch(capture.DefaultDestination):
    """A destination without torch and numpy (capture's destination protocol)."""

    name = "no-tensors"

    def provides(self, module):
        return module.partition(".")[0] not in ("torch", "numpy") and super().provides(module)


class PlainTensor(torch.Tensor):
    pass


class NoReduce:
    def __reduce_ex__(self, protocol):
        raise TypeError("not today")


class NamesItself:
    def __reduce__(self):
        return "SINGLETON"


class BadReduce:
    def __reduce__(self):
        return 5


class StateSetter:
    def __reduce__(self):
        return (StateSetter, (), {}, None, None, print)


class NotCallable:
    def __reduce__(self):
        return (5, ())


def _exec_class():
    namespace = {}
    exec("class Ghost:\n    pass\n", namespace)
    return namespace["Ghost"]()


def _exec_function():
    namespace = {}
    exec("def ghost():\n    return 1\n", namespace)
    return namespace["ghost"]


def _deep(levels):
    value = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's own modules, importable here only."""
    directory = tmp_path_factory.mktemp("refusals")
    (directory / "sbx_refusal_steer.py").write_text(textwrap.dedent('''\
        from dataclasses import dataclass


        @dataclass
        class SteerConfig:
            layer: int = 0
        '''))
    (directory / "sbx_refusal_io.py").write_text(textwrap.dedent('''\
        import socket

        CONNECTION = socket.socket(socket.AF_UNIX)


        def send(data):
            return CONNECTION.send(data)
        '''))
    sys.path.insert(0, str(directory))
    import sbx_refusal_io
    import sbx_refusal_steer

    yield {"steer": sbx_refusal_steer, "io": sbx_refusal_io}
    sbx_refusal_io.CONNECTION.close()
    sys.path.remove(str(directory))
    for name in ("sbx_refusal_io", "sbx_refusal_steer"):
        sys.modules.pop(name, None)


def ndif():
    return sandbox.Policy.load("ndif-allowlist")


# case -> (build(user) -> value, policy, path, type named, what the destination lacks)
CASES = {
    "process_handle": (lambda user: io.StringIO(), None, "var", "StringIO",
                       "handle into this process, which the destination (default-server-set) cannot have"),
    "nesting_depth": (lambda user: _deep(300), None, "var" + "[0]" * 200, "list",
                      "more than the destination (default-server-set) rebuilds"),
    "module_without_source": (lambda user: pytest.importorskip("msgpack._cmsgpack"), None, "var",
                              "module msgpack._cmsgpack", "does not have 'msgpack._cmsgpack'"),
    "builtin_without_source": (lambda user: pytest.importorskip("psutil._psutil_linux").disk_partitions, None, "var",
                               "builtin_function_or_method", "is not on the destination (default-server-set)"),
    "class_from_a_c_extension": (lambda user: pytest.importorskip("msgpack._cmsgpack").Packer, None, "var",
                                 "class Packer", "which the destination (default-server-set) does not have"),
    "class_without_source": (lambda user: _exec_class(), None, "var", "class Ghost",
                             "the destination (default-server-set) has no class 'Ghost'"),
    "function_without_source": (lambda user: _exec_function(), None, "var", "function ghost",
                                "the destination (default-server-set) does not have 'ghost'"),
    "unreachable_by_name": (lambda user: functools.lru_cache(maxsize=None), None, "var",
                            "function lru_cache.<locals>.decorating_function",
                            "which the destination (default-server-set) has, but is not reachable there by name"),
    "dataclass_without_dataclasses": (lambda user: user["steer"].SteerConfig(), ndif, "var", "SteerConfig dataclass",
                                      "the destination (ndif-allowlist) does not have the module 'dataclasses'"),
    "definition_using_what_cannot_travel": (lambda user: user["io"].send, None, "var", "function send",
                                            "which the destination (default-server-set) cannot have"),
    "no_torch_on_the_destination": (lambda user: torch.ones(2), NoTorch, "var", "Tensor",
                                    "the destination (no-tensors) has no torch"),
    "tensor_subclass": (lambda user: torch.ones(2).as_subclass(PlainTensor), None, "var", "PlainTensor",
                        "the destination (default-server-set) rebuilds plain tensors only"),
    "sparse_tensor": (lambda user: torch.ones(2).to_sparse(), None, "var", "Tensor",
                      "the destination (default-server-set) rebuilds dense tensors with data only"),
    "object_array": (lambda user: np.array([object()], dtype=object), None, "var", "ndarray[object]",
                     "the destination (default-server-set) rebuilds arrays of raw numbers only"),
    "no_reduce": (lambda user: NoReduce(), None, "var", "NoReduce",
                  "the destination (default-server-set) would have no way to"),
    "names_itself_elsewhere": (lambda user: NamesItself(), None, "var", "NamesItself",
                               "which the destination (default-server-set) does not have"),
    "unusable_reduce": (lambda user: BadReduce(), None, "var", "BadReduce",
                        "the destination (default-server-set) would have no way to rebuild it"),
    "state_setter": (lambda user: StateSetter(), None, "var", "StateSetter",
                     "do not carry to the destination (default-server-set)"),
    "reduce_without_a_callable": (lambda user: NotCallable(), None, "var", "NotCallable",
                                  "the destination (default-server-set) would have no way to rebuild it"),
}


@pytest.mark.parametrize("case", CASES)
def test_refusal_names_variable_type_what_is_lacking_and_a_fix(case, user):
    build, policy, path, type_name, lacking = CASES[case]
    value = build(user)
    with pytest.raises(capture.CaptureError) as refused:
        capture.encode_variables({"var": value}, policy=policy() if policy else None)
    error, message = refused.value, str(refused.value)
    assert error.path == path, message                             # the user's own variable
    assert type_name in error.type_name and type_name in message   # the object's type
    assert lacking in error.reason, message                        # what the destination lacks
    assert ADVICE.search(error.workaround), message                # a fix to apply
    assert message.endswith(error.workaround)


def test_a_dataclass_refusal_does_not_blame_the_standard_library(user):
    with pytest.raises(capture.CaptureError) as refused:
        capture.encode_variables({"cfg": user["steer"].SteerConfig()}, policy=ndif())
    message = str(refused.value)
    assert message.startswith("cannot capture cfg (SteerConfig dataclass)") and "dataclasses.sys" not in message
    assert "plain class" in message and "a policy whose destination has dataclasses" in message
