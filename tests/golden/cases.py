"""The golden bundles: what each holds, and what it must load as.

``scripts/make_goldens.py`` encodes each case's ``build()`` into
``tests/golden/v<FORMAT_VERSION>/<name>.bundle``; tests/test_golden_bundles.py loads every
golden and runs its ``check``. Together the cases use every node tag in capture/format.py.
"""
import collections
import linecache
import math
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The file name the user code is compiled under: the same in every checkout, so the
#: goldens do not depend on where the repository lies.
USER_FILE = "goldenlib.py"


def goldenlib() -> types.ModuleType:
    """tests/golden/goldenlib.py as the module ``goldenlib``, its code named ``goldenlib.py``."""
    text = (HERE / USER_FILE).read_text(encoding="utf-8")
    # Where capture finds the source (again each time: a test may have cleared linecache).
    linecache.cache[USER_FILE] = (len(text), None, text.splitlines(True), USER_FILE)
    module = sys.modules.get("goldenlib")
    if module is None:
        module = types.ModuleType("goldenlib")
        module.__file__ = USER_FILE
        sys.modules["goldenlib"] = module
        exec(compile(text, USER_FILE, "exec"), vars(module))
    return module


class Model:
    """Stands for an object the receiver supplies (the runner's model)."""


MODEL = Model()


def persistent_id(obj):
    return "model" if obj is MODEL else None


def persistent_load(token):
    assert token == "model", token
    return "the receiver's model"


def build_function():
    return goldenlib().scale


def check_function(f):
    assert f(2) == 7.0 and f(2, offset=0.5) == 6.5
    assert (f.__name__, f.__doc__, f.__defaults__) == ("scale", "Scale x by SCALE, then add offset.", (1.0,))


def build_closure():
    step = goldenlib().make_counter(10)
    step()
    return step


def check_closure(step):
    assert (step(), step()) == (12, 13)
    assert step.__code__.co_freevars == ("count",)


def build_class_instance():
    point_class = goldenlib().Point
    point = point_class(3, 4)
    return {"point": point, "norm2": point.norm2, "origin": vars(point_class)["origin"],
            "length": vars(point_class)["length"]}


def check_class_instance(value):
    point = value["point"]
    assert type(point).__name__ == "Point" and vars(point) == {"x": 3, "y": 4} and point.dims == 2
    assert point.norm2() == 25 and point.length == 5.0
    assert value["norm2"].__self__ is point and value["norm2"]() == 25
    assert isinstance(value["origin"], staticmethod) and vars(value["origin"].__func__()) == {"x": 0, "y": 0}
    assert isinstance(value["length"], property) and value["length"].fget(point) == 5.0


def build_module():
    return goldenlib()


def check_module(module):
    import capture

    assert module.__name__ == "goldenlib" and module.SCALE == 3
    assert module.scale(2) == 7.0 and module.square(4) == 16 and module.square.cache_info().maxsize == 16
    assert module.Pair(1) == (1, 0) and module.Pair._fields == ("left", "right")
    assert module.make_counter(0)() == 1
    assert isinstance(module.LOCK, capture.Unavailable)


def build_tensor_array():
    import numpy as np
    import torch

    table = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return {"table": table, "row": table[1], "half": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
            "weight": torch.nn.Parameter(torch.ones(2)), "array": np.arange(4, dtype=np.int32)}


def check_tensor_array(value):
    import numpy as np
    import torch

    table, row = value["table"], value["row"]
    assert table.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] and row.tolist() == [3.0, 4.0, 5.0]
    assert row.untyped_storage().data_ptr() == table.untyped_storage().data_ptr(), "the view lost its storage"
    assert value["half"].dtype == torch.bfloat16 and value["half"].tolist() == [1.5, -2.0]
    assert isinstance(value["weight"], torch.nn.Parameter) and value["weight"].requires_grad
    assert value["array"].dtype == np.int32 and value["array"].tolist() == [0, 1, 2, 3]


def build_error():
    return [ValueError("bad value", 3), goldenlib().GoldenError("custom", 7)]


def check_error(errors):
    builtin, custom = errors
    assert type(builtin) is ValueError and builtin.args == ("bad value", 3)
    assert type(custom).__name__ == "GoldenError" and isinstance(custom, ValueError)
    assert custom.args == ("custom", 7) and custom.code == 7


def build_values():
    shared = [1, 2]
    loop = ["loop"]
    loop.append(loop)
    return {
        "shared": [shared, shared], "loop": loop, "set": {3, 1, 2}, "frozen": frozenset({"a", "b"}),
        "big": 2 ** 100, "complex": 1 + 2j, "tuple": (1, "two", None), "float": 1.5, "flag": True,
        "small bytes": b"\x00\xff", "large bytes": bytes(range(256)) * 260, "bytearray": bytearray(b"ab"),
        "odict": collections.OrderedDict([("b", 1), ("a", 2)]), "surrogate": "bad \udcff",
        "repeated": ["repeated text", "repeated text"], "builtin": math.sqrt, "model": MODEL,
    }


def check_values(value):
    assert value["shared"] == [[1, 2], [1, 2]] and value["shared"][0] is value["shared"][1]
    assert value["loop"][0] == "loop" and value["loop"][1] is value["loop"]
    assert value["set"] == {1, 2, 3} and value["frozen"] == frozenset({"a", "b"})
    assert value["big"] == 2 ** 100 and value["complex"] == 1 + 2j and value["tuple"] == (1, "two", None)
    assert value["float"] == 1.5 and value["flag"] is True
    assert value["small bytes"] == b"\x00\xff" and value["large bytes"] == bytes(range(256)) * 260
    assert value["bytearray"] == bytearray(b"ab")
    assert type(value["odict"]) is collections.OrderedDict and list(value["odict"].items()) == [("b", 1), ("a", 2)]
    assert value["surrogate"] == "bad \udcff" and value["repeated"] == ["repeated text"] * 2
    assert value["builtin"] is math.sqrt and value["model"] == "the receiver's model"


#: name -> (build, check)
CASES = {
    "function": (build_function, check_function),
    "closure": (build_closure, check_closure),
    "class_instance": (build_class_instance, check_class_instance),
    "module": (build_module, check_module),
    "tensor_array": (build_tensor_array, check_tensor_array),
    "error": (build_error, check_error),
    "values": (build_values, check_values),
}
