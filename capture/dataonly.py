"""The data-only policy: rebuild values, never code.

``capture.loads(data, policy=capture.DATA_ONLY)`` is how to read a bundle from a party
that must not run code here (the runner's client reads every result and error reply
this way). Under it, decoding

- rebuilds only the node kinds in ``DATA_TAGS``: containers, scalars, strings, bytes,
  tensors and arrays, references, instances, and ``reduce`` nodes whose constructor is
  one of a fixed list of value types;
- imports nothing the bundle names: a reference resolves only in a module already in
  ``sys.modules``, by looking in namespaces (no ``getattr`` hooks, no lazy imports), and
  only to a *trusted* class, an enum member or one of a few singleton values;
- compiles and runs no shipped source (no function, class, module or cell nodes);
- calls nothing the bundle supplies, and no library code on state the bundle chose. A
  class is trusted when it is the user's own (defined in a module outside the Python
  installation and its site-packages, or in ``__main__``) or registered with
  ``DATA_ONLY.allow(cls)``: its instances are made by its own ``__new__`` (arguments only
  for subclasses of immutable builtins such as tuple and int) and get their state
  through its own ``__setstate__``, ``extend`` and ``__setitem__``, as pickle would.
  Any loaded class is fair game for an attacker otherwise: a library class whose
  ``extend`` calls a callable held in its state runs a shell (``subprocess.Popen`` is a
  class, so a reference can name it). A loaded dataclass whose ``__reduce__`` names its
  constructor (transformers' ``ModelOutput``) gets its fields set directly, and items of
  library containers go in through the builtin container's own method, never an
  override.

Anything else raises ``BundleError`` naming where in the value it sits
(``result[2].probe.fn``) and what it was.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import os
import sys
import sysconfig
import types
from typing import Any

from . import format as fmt
from .decoder import Decoder
from .errors import BundleError
from .source import in_site_packages

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
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "Counter"), ("collections", "deque"),
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

#: Builtin classes a reference may name as values (``type(None)`` in a result).
_BUILTIN_VALUE_CLASSES = frozenset({
    type(None), type(Ellipsis), type(NotImplemented), bool, int, float, complex, str, bytes, bytearray,
    list, tuple, dict, set, frozenset, slice, range, object,
})

#: Only instances of subclasses of these get ``__new__`` arguments (their value is there).
_VALUE_BASES = (tuple, int, float, str, bytes, frozenset, complex)

#: Singletons a reference may name besides classes and enum members: (module, type name).
_VALUE_TYPES = frozenset({("torch", "dtype"), ("torch", "layout"), ("torch", "memory_format")})


class DataOnly:
    """The data-only policy (``capture.DATA_ONLY``): as a decode policy it rebuilds
    values only; as an encode policy it says the receiver has what is loaded here."""

    name = "data-only"

    def __init__(self) -> None:
        # class -> whether its own methods (__setstate__, extend, __setitem__) may run
        self._allowed: dict[type, bool] = {}

    def provides(self, module: str) -> bool:
        return module in sys.modules

    def allow(self, *classes: type, own_methods: bool = True) -> None:
        """Let instances of ``classes`` come back. With ``own_methods`` (a probe class
        installed from your lab's package) they are treated as your own: their
        ``__setstate__``, ``extend`` and ``__setitem__`` run on the sender's state. Without
        (a library's plain record type) their state is written straight into their
        ``__dict__`` and slots, and none of their code runs."""
        for cls in classes:
            if not isinstance(cls, type):
                raise TypeError(f"DATA_ONLY.allow takes classes, not {type(cls).__name__}")
            self._allowed[cls] = own_methods

    def trusts(self, cls: type) -> bool:
        """Whether instances of ``cls`` may be rebuilt with the class's own methods: the
        user's own classes, those allowed with their methods, and the fixed value types."""
        return self._allowed.get(cls, False) or _users_own(cls) or _value_class(cls)

    def names(self, cls: type) -> bool:
        """Whether a reference may name ``cls`` (and an instance of it be rebuilt)."""
        return cls in self._allowed or self.trusts(cls) or cls in _BUILTIN_VALUE_CLASSES

    def loaded(self, module: str, qualname: str) -> Any:
        """The object at ``module.qualname`` in an already-loaded module, read from
        namespaces without importing or running attribute hooks; ``ImportError`` if absent."""
        home = sys.modules.get(module)
        if home is None:
            raise ImportError(f"module {module!r} is not loaded here, and a data-only decode imports nothing")
        obj = home
        for part in qualname.split(".") if qualname else ():
            obj = _static_attribute(obj, part)
            if obj is _ABSENT:
                raise ImportError(f"{module}.{qualname} does not exist here")
        return obj

    def resolve(self, module: str, qualname: str) -> Any:
        """The trusted class, enum member or singleton value at ``module.qualname``
        (see :meth:`loaded`); ``ImportError`` saying why otherwise."""
        obj = self.loaded(module, qualname)
        what = _value_kind(obj)
        if what is not None:
            raise ImportError(f"{module}.{qualname} is {what}, not data")
        if isinstance(obj, type) and not issubclass(obj, enum.Enum) and not self.names(obj):
            raise ImportError(f"{module}.{qualname} is a class of an installed library, not one of your own; a "
                              "data-only decode neither names nor fills library classes (their methods would run "
                              "on state the sender chose). If it is yours, trust it with capture.DATA_ONLY.allow")
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
    ``reduce`` nodes checked as the module docstring says. Single-use and not thread-safe,
    like ``Decoder``; it records no plan (every data-only load is checked afresh)."""

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

    def _fill(self, obj: Any, fields: list) -> Any:
        """State and items: through a trusted class's own methods (pickle's way); for any
        other object, raw attributes and the builtin container's own methods only."""
        if DATA_ONLY.trusts(type(obj)):
            return super()._fill(obj, fields)
        state, listitems, dictitems = self._fill_values(fields)
        if state is not None:
            _write_state(obj, state)
        if listitems:
            extend = _container_method(obj, _LIST_BASES, "extend")
            if extend is None:
                raise BundleError(f"malformed bundle: items for a {_name(type(obj))}, which is not a list")
            extend(obj, listitems)
        if dictitems:
            setitem = _container_method(obj, _DICT_BASES, "__setitem__")
            if setitem is None:
                raise BundleError(f"malformed bundle: entries for a {_name(type(obj))}, which is not a dict")
            for key, value in dictitems:
                setitem(obj, key, value)
        return obj

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
        try:
            value = func(*args)
        except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
            raise BundleError(f"malformed bundle: {_name(func)} refused its arguments ({exc})") from None
        return self._fill(self._register(index, value), fields[2:])

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
        """A reduce node's callable, looked up without the class filter of plain
        references: ``_reduce`` itself decides what may be called (a listed constructor,
        numpy's ``scalar`` function, an enum, a torch named tuple) or filled field by
        field (a loaded dataclass)."""
        node = self.nodes[encoded.index] if isinstance(encoded, fmt.Ref) and 0 <= encoded.index < len(self.nodes) else None
        if isinstance(node, list) and len(node) == 3 and node[0] == fmt.REFERENCE \
                and isinstance(node[1], str) and isinstance(node[2], str):
            try:
                return DATA_ONLY.loaded(node[1], node[2])
            except ImportError as exc:
                raise self.refuse(encoded.index, f"a reference to {node[1]}.{node[2]} ({exc})") from None
        return self.value(encoded)

    BUILDERS = {**Decoder.BUILDERS, fmt.REFERENCE: _ref, fmt.OBJECT: _object, fmt.REDUCE: _reduce}

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


def _write_state(obj: Any, state: Any) -> None:
    """Instance state written straight into ``__dict__`` and slot members: no
    ``__setattr__``, no property setter, nothing of the class's runs."""
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    if not isinstance(state, (dict, type(None))) or not isinstance(slots, (dict, type(None))):
        raise BundleError(f"malformed bundle: the state of a {_name(type(obj))} is not attribute maps")
    if state:
        try:
            namespace = object.__getattribute__(obj, "__dict__")
        except AttributeError:
            raise BundleError(f"malformed bundle: a {_name(type(obj))} has no __dict__ for its state") from None
        for name, value in state.items():
            if not isinstance(name, str):
                raise BundleError(f"malformed bundle: an attribute name of a {_name(type(obj))} is not a string")
            namespace[name] = value
    for name, value in (slots or {}).items():
        member = next((_CLASS_DICT(k)[name] for k in _CLASS_MRO(type(obj))
                       if isinstance(name, str) and name in _CLASS_DICT(k)), None)
        if not isinstance(member, types.MemberDescriptorType):
            raise BundleError(f"malformed bundle: {name!r} is not a slot of {_name(type(obj))}")
        member.__set__(obj, value)


#: Builtin containers whose own methods take items, most derived first.
_LIST_BASES = (collections.deque, list)
_DICT_BASES = (collections.OrderedDict, collections.Counter, collections.defaultdict, dict)


def _container_method(obj: Any, bases: tuple, name: str) -> Any:
    for base in bases:
        if isinstance(obj, base):
            return getattr(base, name)  # the builtin's own, whatever the instance's class overrides
    return None


#: Classes sent as instances (object nodes) that are plain values, besides the constructors.
_VALUE_OBJECT_CLASSES = frozenset({("uuid", "UUID")})


def _value_class(cls: type) -> bool:
    """One of the fixed value types (a listed constructor, ``uuid.UUID``, a
    ``torch.return_types`` tuple), by identity with the loaded class of that name."""
    name = (cls.__module__, cls.__qualname__)
    if cls.__module__ == _TORCH_RETURN_TYPES:
        return issubclass(cls, tuple)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(_MODULE_DICT(numpy).get("dtype"), type) \
            and issubclass(cls, _MODULE_DICT(numpy)["dtype"]):
        return True  # numpy's per-type dtype classes (numpy.dtypes.Float32DType)
    if name not in REDUCE_CONSTRUCTORS and name not in _VALUE_OBJECT_CLASSES:
        return False
    home = sys.modules.get(name[0])
    return isinstance(home, types.ModuleType) and _MODULE_DICT(home).get(name[1]) is cls


def _install_roots() -> tuple[str, ...]:
    """Where the interpreter, its stdlib and installed packages live."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots.update(path for path in sysconfig.get_paths().values() if path)
    return tuple(os.path.join(os.path.realpath(root), "") for root in roots)


_INSTALL_ROOTS = _install_roots()


def _users_own(cls: type) -> bool:
    """A class of the user's own code: defined in ``__main__`` or in a module whose file
    lies outside the Python installation and every site-packages directory."""
    module = sys.modules.get(cls.__module__)
    if module is None:
        return False
    if cls.__module__ == "__main__":
        return True
    file = getattr(module, "__file__", None)
    if not isinstance(file, str):
        return False  # built-in or namespace-less: the interpreter's own
    path = os.path.realpath(file)
    return not in_site_packages(path) and not path.startswith(_INSTALL_ROOTS)


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
