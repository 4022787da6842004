"""The data-only policy: rebuild values, never code.

``capture.loads(data, policy=capture.DATA_ONLY)`` is how to read a bundle from a party
that must not run code here (the runner's client reads every result and error reply
this way). Under it, decoding

- rebuilds only the node kinds in ``DATA_TAGS``: containers, scalars, strings, bytes,
  tensors and arrays, references, instances, and ``reduce`` nodes whose constructor is
  one of a fixed list of value types;
- imports nothing the bundle names: a reference resolves only in a module already in
  ``sys.modules``, by looking in namespaces (no ``getattr`` hooks, no lazy imports), and
  only to a class, an enum member or one of a few singleton values;
- compiles and runs no shipped source (no function, class, module or cell nodes);
- calls nothing the bundle supplies: an instance of an already-loaded class is made by
  that class's own ``__new__`` (arguments only for subclasses of immutable builtins such
  as tuple and int) and gets its state through its own ``__setstate__`` or ``__dict__``;
  a loaded dataclass whose ``__reduce__`` names its constructor gets its fields set the
  same way, without ``__init__``.

Anything else raises ``BundleError`` naming where in the value it sits
(``result[2].probe.fn``) and what it was.
"""
from __future__ import annotations

import dataclasses
import enum
import sys
import types
from typing import Any

from . import format as fmt
from .decoder import Decoder
from .errors import BundleError

#: The node kinds a data-only decode rebuilds; every other tag is refused by path.
DATA_TAGS = frozenset({
    fmt.LIST, fmt.TUPLE, fmt.DICT, fmt.SET, fmt.FROZENSET, fmt.BYTEARRAY, fmt.BIGINT, fmt.COMPLEX,
    fmt.STRING, fmt.SURROGATE_STR, fmt.ORDERED_DICT, fmt.BYTES_FRAME, fmt.TENSOR, fmt.NDARRAY,
    fmt.PERSISTENT, fmt.REFERENCE, fmt.OBJECT, fmt.REDUCE,
})

#: What each refused node kind is, in the words of a refusal (a tag added to the format
#: later is refused too, until it is judged to be data and listed above).
_REFUSED_KINDS = {
    fmt.MODULE: "a module shipped as source",
    fmt.FUNCTION: "a function shipped as source",
    fmt.CELL: "a closure cell",
    fmt.CLASS: "a class shipped as source (its class statement would run here)",
    fmt.ATTRIBUTE: "an attribute of shipped code (a method or nested class)",
    fmt.BOUND_METHOD: "a bound method",
    fmt.WRAPPER: "a staticmethod or classmethod",
    fmt.PROPERTY: "a property",
    fmt.LRU_CACHE: "an lru_cache-wrapped function",
    fmt.NAMEDTUPLE: "a namedtuple class made here by calling collections.namedtuple",
    fmt.UNAVAILABLE: "a placeholder for a module global",
}

#: Constructors a ``reduce`` node may name: the value types the encoder sends that way.
#: (module, qualname); resolved in modules already loaded, never imported.
REDUCE_CONSTRUCTORS = frozenset({
    ("builtins", "slice"), ("builtins", "range"),
    ("collections", "defaultdict"), ("collections", "Counter"), ("collections", "deque"),
    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "time"), ("datetime", "timedelta"),
    ("datetime", "timezone"), ("decimal", "Decimal"), ("fractions", "Fraction"),
    ("pathlib", "PurePath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("types", "SimpleNamespace"),
    ("torch", "Size"), ("torch", "device"),
    ("numpy", "dtype"), ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
})
_NUMPY_SCALAR = "scalar"
#: Module of torch's named-tuple results (``torch.max(x, 0)``): structseq value types.
_TORCH_RETURN_TYPES = "torch.return_types"

#: Only instances of subclasses of these get ``__new__`` arguments (their value is there).
_VALUE_BASES = (tuple, int, float, str, bytes, frozenset, complex)

#: Singletons a reference may name besides classes and enum members: (module, type name).
_VALUE_TYPES = frozenset({("torch", "dtype"), ("torch", "layout"), ("torch", "memory_format")})


class DataOnly:
    """The data-only policy (``capture.DATA_ONLY``): as a decode policy it rebuilds
    values only; as an encode policy it says the receiver has what is loaded here."""

    name = "data-only"

    def provides(self, module: str) -> bool:
        return module in sys.modules

    def resolve(self, module: str, qualname: str) -> Any:
        """The class, enum member or singleton value at ``module.qualname``, looked up
        in already-loaded modules without importing or running attribute hooks;
        ``ImportError`` saying why otherwise."""
        home = sys.modules.get(module)
        if home is None:
            raise ImportError(f"module {module!r} is not loaded here, and a data-only decode imports nothing")
        obj = home
        for part in qualname.split(".") if qualname else ():
            obj = _static_attribute(obj, part)
            if obj is _ABSENT:
                raise ImportError(f"{module}.{qualname} does not exist here")
        what = _value_kind(obj)
        if what is not None:
            raise ImportError(f"{module}.{qualname} is {what}, not data")
        return obj

    def builtins(self) -> dict:
        raise ImportError("the data-only policy runs no shipped code, so it has no builtins to give it")


DATA_ONLY = DataOnly()

_ABSENT = object()


# The slots themselves, so that no module or metaclass __getattribute__ runs to read them.
_MODULE_DICT = vars(types.ModuleType)["__dict__"].__get__
_CLASS_DICT = vars(type)["__dict__"].__get__
_CLASS_MRO = vars(type)["__mro__"].__get__


def _static_attribute(obj: Any, name: str) -> Any:
    """``obj.name`` read from namespaces only: no module ``__getattr__`` (lazy imports),
    no metaclass or descriptor code."""
    if isinstance(obj, type):
        if issubclass(obj, enum.Enum):
            members = _CLASS_DICT(obj).get("_member_map_", {})
            if name in members:
                return members[name]
        for klass in _CLASS_MRO(obj):
            namespace = _CLASS_DICT(klass)
            if name in namespace:
                return namespace[name]
        return _ABSENT
    if isinstance(obj, types.ModuleType):
        return _MODULE_DICT(obj).get(name, _ABSENT)
    return _ABSENT


def _value_kind(obj: Any) -> str | None:
    """``None`` when a reference may name ``obj``; else what it is, for the refusal."""
    if isinstance(obj, type) or isinstance(obj, enum.Enum) or obj is Ellipsis or obj is NotImplemented:
        return None
    kind = type(obj)
    home = sys.modules.get(kind.__module__)
    if (kind.__module__, kind.__qualname__) in _VALUE_TYPES and isinstance(home, types.ModuleType) \
            and _MODULE_DICT(home).get(kind.__qualname__) is kind:
        return None
    if isinstance(obj, types.ModuleType):
        return f"the module {obj.__name__}"
    if callable(obj):
        return f"a callable ({kind.__qualname__})"
    return f"a {kind.__qualname__} object"


class DataDecoder(Decoder):
    """A ``Decoder`` restricted to ``DATA_TAGS``, with references, instances and
    ``reduce`` nodes checked as the module docstring says."""

    def __init__(self, *args: Any, label: str = "obj", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.label = label

    def build(self, index: int) -> Any:
        node = self.nodes[index] if type(index) is int and 0 <= index < len(self.nodes) else None
        if isinstance(node, list) and node and isinstance(node[0], str) and node[0] in fmt.TAGS \
                and node[0] not in DATA_TAGS:
            raise self.refuse(index, _REFUSED_KINDS.get(node[0], f"a {node[0]} node"))
        return super().build(index)

    def refuse(self, index: int, what: str) -> BundleError:
        return BundleError(f"refused {self.path_to(index)}: it is {what}, and this bundle is read as data only "
                           f"(policy {DATA_ONLY.name}): nothing in it may import, define or call code here. "
                           "The sender must send values instead: containers, numbers, strings, tensors, "
                           "arrays, and instances of classes this side has loaded")

    def _ref(self, index: int, fields: list) -> Any:
        module, qualname = fields[0], fields[1]
        if not isinstance(module, str) or not isinstance(qualname, str):
            raise BundleError("malformed bundle: a reference names no module and qualified name")
        try:
            return DATA_ONLY.resolve(module, qualname)
        except ImportError as exc:
            raise self.refuse(index, f"a reference to {module}.{qualname or '<module>'} ({exc})") from None

    def _object(self, index: int, fields: list) -> Any:
        cls = self.value(fields[0])
        if not isinstance(cls, type):
            raise self.refuse(index, f"an instance whose class is a {type(cls).__name__}")
        args = self.value(fields[1]) or ()
        kwargs = self.value(fields[2]) or {}
        if (args or kwargs) and not issubclass(cls, _VALUE_BASES):
            raise self.refuse(index, f"an instance of {_name(cls)} made by calling __new__ with arguments "
                                     "(only subclasses of tuple, int, float, str, bytes, frozenset and complex take them)")
        problem = _new_arguments_problem(cls, args, kwargs)
        if problem is not None:
            raise self.refuse(index, f"an instance of {_name(cls)} made from {problem}")
        if _is_array(cls):
            raise self.refuse(index, f"an instance of {_name(cls)} made without its data (tensors and arrays "
                                     "travel as tensor and ndarray nodes, over frames of their real size)")
        if _finalizer(cls) is not None:
            raise self.refuse(index, f"an instance of {_name(cls)}, whose {_finalizer(cls)}.__del__ would run "
                                     "here on state the sender chose")
        obj = self._register(index, cls.__new__(cls, *args, **kwargs))
        return self._fill(obj, fields[3:])

    def _reduce(self, index: int, fields: list) -> Any:
        func = self._constructor(fields[0])
        args = self.value(fields[1]) or ()
        if isinstance(func, type) and dataclasses.is_dataclass(func):
            return self._fill(self._register(index, self._dataclass(index, func, args)), fields[2:])
        problem = _arguments_problem(func, args)
        if problem is not None:
            raise self.refuse(index, f"a call to {_name(func)} with {problem}")
        if not _allowed_constructor(func, args):
            raise self.refuse(index, f"a call to {_name(func)} with {len(args)} argument(s), which is not one of "
                                     "the value constructors a data-only decode may call (capture.dataonly."
                                     "REDUCE_CONSTRUCTORS, enum member lookups, torch.return_types)")
        obj = self._register(index, func(*args))
        return self._fill(obj, fields[2:])

    def _dataclass(self, index: int, cls: type, args: tuple) -> Any:
        """A loaded dataclass whose ``__reduce__`` passes its fields as constructor
        arguments (transformers' ``ModelOutput``): the fields are set as state, without
        running ``__init__`` or ``__post_init__``."""
        names = [field.name for field in dataclasses.fields(cls) if field.init]
        if len(args) > len(names):
            raise self.refuse(index, f"a call to the dataclass {_name(cls)} with {len(args)} arguments for "
                                     f"{len(names)} fields")
        if _finalizer(cls) is not None:
            raise self.refuse(index, f"an instance of {_name(cls)}, whose {_finalizer(cls)}.__del__ would run "
                                     "here on state the sender chose")
        obj = cls.__new__(cls)
        for name, value in zip(names, args):
            object.__setattr__(obj, name, value)
        return obj

    def _constructor(self, encoded: Any) -> Any:
        """A reduce node's callable: a listed constructor is looked up as such (numpy's
        ``scalar`` is a function, which a plain reference may not name)."""
        node = self.nodes[encoded.index] if isinstance(encoded, fmt.Ref) and 0 <= encoded.index < len(self.nodes) else None
        if isinstance(node, list) and len(node) == 3 and node[0] == fmt.REFERENCE \
                and all(isinstance(part, str) for part in node[1:]) and tuple(node[1:]) in REDUCE_CONSTRUCTORS:
            home = sys.modules.get(node[1])
            found = _MODULE_DICT(home).get(node[2], _ABSENT) if isinstance(home, types.ModuleType) else _ABSENT
            if found is not _ABSENT:
                return found
        return self.value(encoded)

    # -- where a refused node sits ----------------------------------------------------

    def path_to(self, target: int) -> str:
        """The shortest path from the root to node ``target``, written like Python
        (``result[2].probe.fn``); the node index when the graph does not lead there."""
        root = self.header["root"]
        if isinstance(root, fmt.Ref) and root.index == target:
            return self.label
        seen, frontier = {target}, [(root, self.label)]
        found: dict[int, str] = {}
        while frontier:
            following = []
            for encoded, path in frontier:
                if not isinstance(encoded, fmt.Ref) or not 0 <= encoded.index < len(self.nodes):
                    continue
                for child, label in self._children(self.nodes[encoded.index]):
                    if not isinstance(child, fmt.Ref):
                        continue
                    if child.index == target:
                        return path + label
                    if child.index not in found and child.index not in seen:
                        found[child.index] = path + label
                        following.append((child, path + label))
            frontier = following
        return f"{self.label}.<node {target}>"

    def _children(self, node: Any) -> list[tuple[Any, str]]:
        if not isinstance(node, list) or not node or not isinstance(node[0], str):
            return []
        tag, fields = node[0], node[1:]
        items = fields[0] if fields and isinstance(fields[0], list) else []
        if tag in (fmt.LIST, fmt.TUPLE):
            return [(item, f"[{i}]") for i, item in enumerate(items)]
        if tag in (fmt.SET, fmt.FROZENSET):
            return [(item, ".<item>") for item in items]
        if tag in (fmt.DICT, fmt.ORDERED_DICT):
            return self._pairs(items, attribute=False)
        if tag == fmt.OBJECT and len(fields) == 6:
            return [(fields[0], ".__class__"), (fields[1], ".<new args>"), (fields[2], ".<new kwargs>"),
                    *self._state(fields[3]), (fields[4], ".<items>"), (fields[5], ".<items>")]
        if tag == fmt.REDUCE and len(fields) == 5:
            return [(fields[0], ".<reduce>"), (fields[1], ".<reduce args>"), *self._state(fields[2]),
                    (fields[3], ".<items>"), (fields[4], ".<items>")]
        return []

    def _pairs(self, items: list, attribute: bool) -> list[tuple[Any, str]]:
        children = []
        for pair in items:
            if isinstance(pair, list) and len(pair) == 2:
                key = self._text(pair[0])
                label = (f".{key}" if attribute and isinstance(key, str) else f"[{key!r}]") \
                    if isinstance(key, (str, int, float, bool, type(None))) else ".<key>"
                children += [(pair[0], ".<key>"), (pair[1], label)]
        return children

    def _state(self, encoded: Any) -> list[tuple[Any, str]]:
        """Instance state reads as attributes: ``probe.fn``, not ``probe.<state>['fn']``."""
        node = self.nodes[encoded.index] if isinstance(encoded, fmt.Ref) and 0 <= encoded.index < len(self.nodes) else None
        if isinstance(node, list) and len(node) == 2 and node[0] == fmt.DICT and isinstance(node[1], list):
            return self._pairs(node[1], attribute=True)
        if isinstance(node, list) and len(node) == 2 and node[0] == fmt.TUPLE and isinstance(node[1], list):
            return [child for part in node[1] for child in self._state(part)]
        return [(encoded, ".<state>")]

    def _text(self, encoded: Any) -> Any:
        """A key as written: shared strings are nodes."""
        if isinstance(encoded, fmt.Ref) and 0 <= encoded.index < len(self.nodes):
            node = self.nodes[encoded.index]
            if isinstance(node, list) and len(node) == 2 and node[0] == fmt.STRING:
                return node[1]
            return _ABSENT
        return encoded


def _name(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{qualname}" if module else qualname


def _finalizer(cls: type) -> str | None:
    """The class (by name) whose ``__del__`` instances of ``cls`` would run, if any."""
    for klass in _CLASS_MRO(cls)[:-1]:
        if "__del__" in _CLASS_DICT(klass):
            return _name(klass)
    return None


#: What an argument of a constructor may be without the constructor doing work or
#: allocating by a size the sender declares: values whose size is their encoded size.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, bytearray, tuple, list, dict, set, frozenset)
#: Per builtin whose own ``__new__`` would run: the argument types that are its value as
#: is (``bytes.__new__(cls, 2**33)`` would allocate 8 GiB; ``tuple.__new__(cls, range(...))``
#: would iterate without end).
_NEW_VALUES = {tuple: (tuple, list), frozenset: (frozenset, set, list, tuple), bytes: (bytes,), str: (str,),
               int: (int,), float: (float, int), complex: (complex, float, int)}


def _arguments_problem(func: Any, args: Any) -> str | None:
    """Why ``func(*args)`` could cost more than the bundle's own size, or ``None``. An
    argument is a plain value (iterated over at most its encoded length), a class, or
    another value object that is not iterable (a timezone, a dtype)."""
    if not isinstance(args, tuple):
        return f"arguments that are a {type(args).__name__}, not a tuple"
    for position, arg in enumerate(args):
        kind = type(arg)
        if kind in _PLAIN or isinstance(arg, (type, enum.Enum)):
            continue
        if any("__iter__" in _CLASS_DICT(klass) for klass in _CLASS_MRO(kind)[:-1]):
            return (f"argument {position} being a {kind.__qualname__}, which the constructor would iterate over "
                    "(only lists, tuples, dicts, sets, strings and bytes are passed on)")
    if func is _loaded("fractions", "Fraction") and not all(type(a) is int for a in args):
        return "arguments that are not integers (a string like '1e999999999' is a power of ten to compute)"
    return None


def _new_arguments_problem(cls: type, args: tuple, kwargs: dict) -> str | None:
    """Why a builtin's ``__new__`` on these arguments would do more than take the value."""
    owner = next(klass for klass in _CLASS_MRO(cls) if "__new__" in _CLASS_DICT(klass))
    accepted = _NEW_VALUES.get(owner)
    if accepted is None or not (args or kwargs):
        return None  # the class's own __new__ (a namedtuple's), or object's
    if kwargs or len(args) > (2 if owner is complex else 1):
        return f"{len(args)} arguments and {len(kwargs)} keywords (its value is one {owner.__name__})"
    if not all(type(arg) in accepted for arg in args):
        return f"a {type(args[0]).__name__}, not a {' or '.join(t.__name__ for t in accepted)}"
    return None


def _loaded(module: str, name: str) -> Any:
    home = sys.modules.get(module)
    return _MODULE_DICT(home).get(name, _ABSENT) if isinstance(home, types.ModuleType) else _ABSENT


def _is_array(cls: type) -> bool:
    return any((klass.__module__, klass.__qualname__) in (("torch", "Tensor"), ("torch._C", "TensorBase"),
                                                          ("numpy", "ndarray"))
               for klass in _CLASS_MRO(cls))


def _allowed_constructor(func: Any, args: tuple) -> bool:
    if isinstance(func, type) and issubclass(func, enum.Enum):
        return len(args) == 1  # a member lookup; more arguments would create a new enum
    if isinstance(func, type) and func.__module__ == _TORCH_RETURN_TYPES and issubclass(func, tuple):
        return True
    name = (getattr(func, "__module__", None), getattr(func, "__qualname__", None))
    home = sys.modules.get(name[0]) if name in REDUCE_CONSTRUCTORS else None
    if not isinstance(home, types.ModuleType) or _MODULE_DICT(home).get(name[1]) is not func:
        return False
    if name[1] == _NUMPY_SCALAR:  # scalar(dtype, raw bytes): an object dtype would hold anything
        return len(args) == 2 and not getattr(args[0], "hasobject", True)
    return True
