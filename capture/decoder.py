"""Bundle header nodes and frames -> live objects (the receiving side).

Every shipped module gets a fresh namespace per bundle, whose ``__builtins__`` come from
the destination policy: the imports that shipped code makes meet the policy there.
Objects are built on demand from the root; mutable containers are registered before
their contents are built, so shared references and cycles come back as they were.

Each builder checks its node once, then does its work as *steps*: small functions of the
slot list (one slot per node, then one per shipped module) and the load's own state
(frames, destination, ``persistent_load``). The steps of a successful decode, in the
order they ran, are a :class:`Plan`: a repeat load of the same bundle under the same
policy and tenant (``cached_plan``) replays them on fresh slots, so it makes fresh
objects and namespaces without parsing, checking or compiling again. Immutable values
made only of constants (tuples of numbers, strings) are made once and shared.
"""
from __future__ import annotations

import collections
import hashlib
import sys
import threading
import types
from functools import partial
from typing import Any, Callable, MutableMapping, Sequence

from . import arrays, format as fmt, origins
from .destination import DEFAULT
from .errors import BundleError, MissingSources
from .source import CLOSURE_WRAPPER, Segment, class_closure_code, code_of, compile_segment, register_lines

_MISSING = object()
#: Shipped code is registered in linecache at its real lines: bound what a bundle may claim.
_MAX_LINE = 1_000_000
_Ref = fmt.Ref


class Unavailable:
    """Stands for a module-level name that could not travel; any use says why."""

    def __init__(self, description: str):
        self._description = description

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"this value was not shipped: {self._description}")

    __call__ = __iter__ = __len__ = __bool__ = _fail

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        self._fail()

    def __repr__(self) -> str:
        return f"<unavailable: {self._description}>"


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(f"malformed bundle: {what} should be {kind.__name__}, not {type(value).__name__}")
    return value


#: Held by a decode from the first shipped module it puts in ``sys.modules`` until it
#: takes them out again: two threads loading modules of the same name would otherwise
#: see (and remove) each other's.
_MODULES_LOCK = threading.RLock()


class _Load:
    """What one load owns: its frames and destination, and what its steps make as they go."""

    __slots__ = ("frames", "dest", "persistent_load", "device", "shipped_imports", "storages", "importable",
                 "builtins", "registered", "locked")

    def __init__(self, frames: Sequence[memoryview], dest: Any, persistent_load: Any, device: str | None,
                 shipped_imports: bool):
        self.frames = frames
        self.dest = dest
        self.persistent_load = persistent_load
        self.device = device
        self.shipped_imports = shipped_imports
        self.storages: dict[int, Any] = {}
        self.importable: dict[str, types.ModuleType] = {}
        self.builtins: dict | None = None
        self.registered: list[types.ModuleType] = []
        self.locked = False

    def namespace_builtins(self) -> dict:
        if self.builtins is None:
            self.builtins = self.dest.builtins()
            if self.shipped_imports:
                self.builtins = _with_shipped_imports(self.builtins, self.importable)
        return self.builtins

    def register(self, module: types.ModuleType) -> None:
        """Only while loading: class machinery (dataclasses, typing) looks the defining
        module up by name. A real module of that name is never shadowed."""
        if not self.locked:
            _MODULES_LOCK.acquire()
            self.locked = True
        if module.__name__ not in sys.modules:
            sys.modules[module.__name__] = module
            self.registered.append(module)

    def unregister(self) -> None:
        try:
            for module in self.registered:
                if sys.modules.get(module.__name__) is module:  # ours, not one code put there meanwhile
                    del sys.modules[module.__name__]
        finally:
            self.registered.clear()
            if self.locked:
                self.locked = False
                _MODULES_LOCK.release()


def _get(slots: list, encoded: Any) -> Any:
    """An encoded value at replay: a node's object from its slot, else the scalar itself."""
    return slots[encoded.index] if type(encoded) is _Ref else encoded


class Decoder:
    """Rebuilds one bundle: single-use (one ``root()`` per instance) and not thread-safe;
    separate instances may decode in separate threads. ``record=True`` keeps the steps,
    so that ``plan()`` can hand them out for repeat loads."""

    def __init__(self, header: dict, frames: Sequence[memoryview], destination: Any = None,
                 persistent_load: Callable[[str], Any] | None = None, device: str | None = None,
                 source_store: MutableMapping[str, str] | None = None, tenant: str = "", record: bool = False):
        self.header = header
        self.tenant = tenant
        self.frames = frames
        self.dest = destination if destination is not None else DEFAULT
        self.nodes: list = header["nodes"]
        self.sources: list[tuple[str, str | None]] = []
        self.segments = read_segments(header["sources"], source_store, self.sources)
        self.registered_lines: set[int] = set()
        modules = header["modules"]
        # One slot per node, then one per shipped module.
        self.built: list[Any] = [_MISSING] * (len(self.nodes) + len(modules))
        self.state: list[int] = [0] * len(self.nodes)  # 0 new, 1 building, 2 built
        self.constants: set[int] = set()
        self.ready: set[int] = set()
        self.class_attributes: list[tuple[int, dict]] = []
        self.pending: dict[int, list[Callable]] = {}
        self.load = _Load(frames, self.dest, persistent_load, device, False)
        self.steps: list | None = [] if record else None
        self.current = -1  # the node whose builder runs now (named when a step fails)

    # --- entry ---

    def root(self) -> Any:
        try:
            value = self.value(self.header["root"])
            completed: set[int] = set()
            while len(completed) < len(self._modules()):  # completing one can reach new modules
                for number in [n for n in self._modules() if n not in completed]:
                    self._complete_namespace(number)
                    completed.add(number)
            # Last, so that what class statements did on load (a registry that
            # __init_subclass__ appends to) ends as it was captured, not doubled.
            for cls_index, attrs in self.class_attributes:
                self.current = cls_index
                for name, encoded in attrs.items():
                    name = _class_attribute_name(self.built[cls_index], _expect(name, str, "class attribute name"))
                    self.value(encoded)
                    self.run(None, partial(_set_class_attribute, cls_index, name, encoded))
            return value
        finally:
            self.load.unregister()

    def plan(self) -> "Plan":
        """The recorded steps of this (finished, successful) decode, for repeat loads."""
        template = [None] * len(self.built)
        for index in self.constants:
            template[index] = self.built[index]
        tags = [node[0] for node in self.nodes]
        return Plan(self.dest, self.tenant, template, self.steps, self.header["root"], tags, self.sources,
                    len(self.header["frames"]), self.load.shipped_imports)

    def run(self, index: int | None, step: Callable[[list, _Load], Any]) -> Any:
        """Do ``step`` now (and record it); its result fills slot ``index``, if given."""
        result = step(self.built, self.load)
        if index is not None:
            self.built[index] = result
        if self.steps is not None:
            self.steps.append((index, step, self.current))
        return result

    def constant(self, index: int, value: Any) -> Any:
        """An immutable value made only of constants: made once, shared by repeat loads."""
        self.constants.add(index)
        return value

    def _is_constant(self, encoded: Any) -> bool:
        return type(encoded) is not _Ref or encoded.index in self.constants

    def _modules(self) -> list[int]:
        base = len(self.nodes)
        return [number for number in range(len(self.header["modules"])) if self.built[base + number] is not _MISSING]

    def value(self, encoded: Any) -> Any:
        kind = type(encoded)
        if kind is _Ref:
            index = encoded.index
            built = self.built[index] if 0 <= index < len(self.nodes) else _MISSING
            return built if built is not _MISSING else self.build(index)
        if kind is list or kind is dict:
            raise BundleError("malformed bundle: a container appears inline instead of as a node")
        return encoded

    def build(self, index: int) -> Any:
        if not 0 <= index < len(self.nodes):
            raise BundleError(f"malformed bundle: reference to node {index} of {len(self.nodes)}")
        if self.built[index] is not _MISSING:
            return self.built[index]  # built, or a container still being filled (a cycle)
        if self.state[index] == 1:
            raise BundleError(f"malformed bundle: node {index} refers to itself before it can exist "
                              "(a cycle through a tuple, frozenset or class statement)")
        node = self.nodes[index]
        if not isinstance(node, list) or not node or not isinstance(node[0], str) or node[0] not in fmt.TAGS:
            raise BundleError(f"malformed bundle: node {index} is not a known node")
        self.state[index] = 1
        outer, self.current = self.current, index
        try:
            obj = self.BUILDERS[node[0]](self, index, node[1:])
            self.built[index] = obj
            self.state[index] = 2
            for fill in self.pending.pop(index, ()):
                self.run(None, fill)
        except (BundleError, ImportError, RecursionError):
            raise
        except Exception as exc:  # malformed fields, or shipped code that raised while rebuilding
            raise BundleError(f"cannot rebuild node {index} ({node[0]}): {type(exc).__name__}: {exc}") from exc
        finally:
            self.current = outer
        return obj

    def _register(self, index: int, obj: Any) -> Any:
        """Make a container visible to references inside itself before it is filled
        (for builders that do not record steps: the data-only decoder's)."""
        self.built[index] = obj
        return obj

    def _now_or_later(self, encoded: Any, fill: Callable[[Any], Callable]) -> Any:
        """``encoded`` built, or None for now when it is a tuple still being built around
        this container (a cycle through a tuple): ``fill(index)`` is the step that puts it
        in place once it exists. Returns the encoded value the container's step uses."""
        if self._unfinished(encoded):
            self.pending.setdefault(encoded.index, []).append(fill(encoded.index))
            return None
        self.value(encoded)
        return encoded

    def _unfinished(self, encoded: Any) -> bool:
        return (isinstance(encoded, _Ref) and 0 <= encoded.index < len(self.nodes)
                and self.state[encoded.index] == 1 and self.built[encoded.index] is _MISSING)

    # --- containers and scalars ---

    def _list(self, index: int, fields: list) -> list:
        result = self.run(index, _new_list)
        items = [self._now_or_later(item, partial(_later_item, index, position))
                 for position, item in enumerate(_expect(fields[0], list, "list items"))]
        self.run(None, partial(_extend_list, index, items))
        return result

    def _tuple(self, index: int, fields: list) -> tuple:
        return self._immutable(index, fields, tuple)

    def _frozenset(self, index: int, fields: list) -> frozenset:
        return self._immutable(index, fields, frozenset)

    def _immutable(self, index: int, fields: list, kind: type) -> Any:
        """A tuple or frozenset: a plan constant when every item is one, else made on replay."""
        items = _expect(fields[0], list, f"{kind.__name__} items")
        values = kind([self.value(v) for v in items])
        if all(self._is_constant(v) for v in items):
            return self.constant(index, values)
        return self.run(index, partial(_make, kind, items))

    def _odict(self, index: int, fields: list) -> dict:
        return self._dict(index, fields, _new_ordered_dict)

    def _dict(self, index: int, fields: list, new: Callable | None = None) -> dict:
        result = self.run(index, new or _new_dict)
        pairs = []
        for pair in _expect(fields[0], list, "dict items"):
            _expect(pair, list, "dict item")
            if len(pair) != 2:
                raise BundleError("malformed bundle: a dict item is not a key/value pair")
            self.value(pair[0])
            pairs.append((pair[0], self._now_or_later(pair[1], partial(_later_item, index, pair[0]))))
        self.run(None, partial(_fill_dict, index, pairs))
        return result

    def _set(self, index: int, fields: list) -> set:
        result = self.run(index, _new_set)
        items = _expect(fields[0], list, "set items")
        for item in items:
            self.value(item)
        self.run(None, partial(_fill_set, index, items))
        return result

    def _bytearray(self, index: int, fields: list) -> bytearray:
        return self.run(index, partial(_call, bytearray, _expect(fields[0], bytes, "bytearray data")))

    def _str(self, index: int, fields: list) -> str:
        return self.constant(index, _expect(fields[0], str, "string"))

    def _surrogates(self, index: int, fields: list) -> str:
        return self.constant(index, _expect(fields[0], bytes, "surrogate string").decode("utf-8", "surrogatepass"))

    def _bigint(self, index: int, fields: list) -> int:
        text = _expect(fields[0], str, "big integer")
        if len(text) > 100_000:
            raise BundleError("malformed bundle: an integer of more than 100000 digits")
        return self.constant(index, int(text))

    def _complex(self, index: int, fields: list) -> complex:
        return self.constant(index, complex(_expect(fields[0], float, "complex real part"),
                                            _expect(fields[1], float, "complex imaginary part")))

    def _bytesframe(self, index: int, fields: list) -> bytes:
        return self.run(index, partial(_bytes_of_frame, self._frame(fields[0])))

    def _frame(self, number: Any) -> int:
        _expect(number, int, "frame number")
        if not 0 <= number < len(self.frames):
            raise BundleError(f"malformed bundle: frame {number} of {len(self.frames)}")
        return number

    def _persistent(self, index: int, fields: list) -> Any:
        return self.run(index, partial(_persistent, _expect(fields[0], str, "persistent token")))

    def _unavailable(self, index: int, fields: list) -> Unavailable:
        return self.run(index, partial(_call, Unavailable, _expect(fields[0], str, "description")))

    # --- references and modules ---

    def _ref(self, index: int, fields: list) -> Any:
        return self.run(index, partial(_resolve, _expect(fields[0], str, "module name"),
                                       _expect(fields[1], str, "qualified name")))

    def _module(self, index: int, fields: list) -> types.ModuleType:
        return self.run(index, partial(_slot, self.module_slot(fields[0])))

    def module_slot(self, number: Any) -> int:
        """The slot of shipped module ``number``, made (a fresh module) on first use."""
        _expect(number, int, "module number")
        records = self.header["modules"]
        if not 0 <= number < len(records):
            raise BundleError(f"malformed bundle: module {number} of {len(records)}")
        slot = len(self.nodes) + number
        if self.built[slot] is _MISSING:
            record = _expect(records[number], dict, "module record")
            if self.load.builtins is None:  # the first module: do relative imports need the bundle's modules?
                self.load.shipped_imports = any(
                    node[0] == fmt.FUNCTION and isinstance(node[1], dict) and node[1].get("imports")
                    for node in self.nodes if isinstance(node, list) and len(node) > 1)
            self.run(slot, partial(_new_module, _expect(record.get("name"), str, "module name"),
                                   record.get("file"), record.get("package")))
        return slot

    def namespace(self, number: Any) -> dict:
        """The fresh namespace of shipped module ``number``: a real module's ``__dict__``,
        so a module object and the functions defined in it share it."""
        return self.built[self.module_slot(number)].__dict__

    def ensure_global(self, number: int, name: str) -> None:
        namespace = self.namespace(number)
        if name in namespace:
            return
        entries = _expect(self.header["modules"][number].get("globals"), dict, "module globals")
        if name not in entries:
            return
        entry = entries[name]
        if self._unfinished(entry):
            return  # a class whose statement is running now names itself; bound once it exists
        self.value(entry)
        self.run(None, partial(_set_global, len(self.nodes) + number, name, entry))

    def _complete_namespace(self, number: int) -> None:
        entries = _expect(self.header["modules"][number].get("globals"), dict, "module globals")
        for name in entries:
            self.ensure_global(number, _expect(name, str, "global name"))

    def _prepare_ref(self, encoded: Any) -> None:
        if isinstance(encoded, _Ref):
            self.prepare(encoded.index)

    def prepare(self, index: int) -> None:
        """Make the globals a function or class needs present before code runs at load
        time (a class body, a decorator), following what those globals need in turn."""
        if index in self.ready:
            return
        self.ready.add(index)
        node = self.nodes[index]
        if node[0] not in (fmt.FUNCTION, fmt.CLASS):
            return
        fields = _expect(node[1], dict, "definition")
        for name in _expect(fields.get("deps", []), list, "dependencies"):
            self.ensure_global(fields["module"], name)
            self._prepare_ref(self.header["modules"][fields["module"]]["globals"].get(name))

    # --- code ---

    def segment(self, number: Any) -> Segment:
        _expect(number, int, "source number")
        if not 0 <= number < len(self.segments):
            raise BundleError(f"malformed bundle: source {number} of {len(self.segments)}")
        segment = self.segments[number]
        if number not in self.registered_lines:
            self.run(None, partial(_register_lines, segment))
            self.registered_lines.add(number)
        return segment

    def _function(self, index: int, fields: list) -> types.FunctionType:
        spec = _expect(fields[0], dict, "function")
        segment = self.segment(spec["source"])
        if segment.kind == "class":
            raise BundleError("malformed bundle: a function node points at a class statement")
        closure = _expect(spec.get("closure", {}), dict, "closure")
        freevars = tuple(sorted(closure))
        code = code_of(compile_segment(segment, freevars, self.tenant), segment, freevars)
        if set(code.co_freevars) != set(freevars):
            raise BundleError(f"malformed bundle: {spec.get('qualname')} closes over {sorted(closure)} "
                              f"but its source uses {sorted(code.co_freevars)}")
        cells = tuple(self._cell_slot(closure[name]) for name in code.co_freevars)
        slot = self.module_slot(spec["module"])
        fn = self.run(index, partial(_new_function, code, slot, _expect(spec["name"], str, "function name"), cells))
        qualname = _expect(spec["qualname"], str, "qualified name")
        module_name = spec.get("module_name")
        if module_name is not None:
            _expect(module_name, str, "function module name")
        encoded = [spec.get(key) for key in ("doc", "defaults", "kwdefaults", "annotations", "dict")]
        for value in encoded:
            self.value(value)
        imports = []
        for name, module in _expect(spec.get("imports", {}), dict, "imports").items():
            self.value(module)
            imports.append((_expect(name, str, "module name"), module))
        self.run(None, partial(_finish_function, index, qualname, module_name, *encoded, imports))
        return fn

    def _cell_slot(self, encoded: Any) -> int | None:
        """The slot of a closure's cell, or None for an empty one made fresh per load."""
        if encoded is None:
            return None
        if not isinstance(self.value(encoded), types.CellType):
            raise BundleError("malformed bundle: a closure entry is not a cell")
        return encoded.index

    def _cell(self, index: int, fields: list) -> types.CellType:
        cell = self.run(index, _new_cell)
        if fields:  # a function whose closure holds itself is filled in once it exists
            content = self._now_or_later(fields[0], partial(_later_cell, index))
            self.run(None, partial(_fill_cell, index, content))
        return cell

    def _class(self, index: int, fields: list) -> type:
        spec = _expect(fields[0], dict, "class")
        segment = self.segment(spec["source"])
        if segment.kind != "class":
            raise BundleError("malformed bundle: a class node points at a function")
        self.prepare(index)
        closure = _expect(spec.get("closure", {}), dict, "class closure")
        freevars = tuple(sorted(closure))
        code = compile_segment(segment, freevars, self.tenant)
        slot = self.module_slot(spec["module"])
        name = _expect(spec["name"], str, "class name")
        if freevars:
            runner_code = class_closure_code(code)
            # A variable only the class body read has no cell of its own: it reads None.
            cells = tuple(self._cell_slot(closure[var]) if closure.get(var) is not None else None
                          for var in runner_code.co_freevars)
            cls = self.run(index, partial(_run_class_in_closure, runner_code, slot, cells))
        else:
            cls = self.run(index, partial(_run_class, code, slot, name))
        self.run(None, partial(_finish_class, index, slot, _expect(spec["qualname"], str, "qualified name")))
        self.class_attributes.append((index, _expect(spec.get("attrs", {}), dict, "class attributes")))
        return cls

    def _namedtuple(self, index: int, fields: list) -> type:
        typename, names, defaults, module, qualname = fields
        self.value(defaults)
        return self.run(index, partial(_new_namedtuple, _expect(typename, str, "namedtuple name"),
                                       _expect(names, list, "namedtuple fields"), defaults,
                                       _expect(module, str, "namedtuple module"),
                                       _expect(qualname, str, "qualified name")))

    def _getattr(self, index: int, fields: list) -> Any:
        self.value(fields[0])
        return self.run(index, partial(_attribute, fields[0], _expect(fields[1], str, "attribute name")))

    def _method(self, index: int, fields: list) -> types.MethodType:
        return self._call_with(index, types.MethodType, fields[:2])

    def _wrap(self, index: int, fields: list) -> Any:
        kind = {"staticmethod": staticmethod, "classmethod": classmethod}.get(fields[0])
        if kind is None:
            raise BundleError(f"malformed bundle: unknown wrapper {fmt.describe(fields[0])}")
        return self._call_with(index, kind, fields[1:2])

    def _property(self, index: int, fields: list) -> property:
        return self._call_with(index, property, fields[:4])

    def _call_with(self, index: int, make: Callable, encoded: list) -> Any:
        for value in encoded:
            self.value(value)
        return self.run(index, partial(_make_from, make, tuple(encoded)))

    def _lru_cache(self, index: int, fields: list) -> Any:
        maxsize = fields[1] if fields[1] is None else _expect(fields[1], int, "lru_cache maxsize")
        self.value(fields[0])
        return self.run(index, partial(_new_lru_cache, fields[0], maxsize, bool(fields[2])))

    # --- objects ---

    def _object(self, index: int, fields: list) -> Any:
        cls = self.value(fields[0])
        self._prepare_ref(fields[0])  # __new__ and __setstate__ may be shipped code
        if not isinstance(cls, type):
            raise BundleError(f"malformed bundle: an object's class is a {type(cls).__name__}")
        self.value(fields[1])
        self.value(fields[2])
        obj = self.run(index, partial(_new_object, fields[0], fields[1], fields[2]))
        self._fill_step(index, fields[3:6])
        return obj

    def _reduce(self, index: int, fields: list) -> Any:
        func = self.value(fields[0])
        self._prepare_ref(fields[0])
        if not callable(func):
            raise BundleError("malformed bundle: a reduce node's constructor is not callable")
        self.value(fields[1])
        obj = self.run(index, partial(_reduce, fields[0], fields[1]))
        self._fill_step(index, fields[2:5])
        return obj

    def _fill_step(self, index: int, fields: list) -> None:
        for value in fields:
            self.value(value)
        self.run(None, partial(_fill_object, index, *fields))

    def _fill_values(self, fields: list) -> tuple[Any, Any, Any]:
        """An object's state, list items and dict items, the items checked to be lists."""
        return _checked_fill_values(*(self.value(f) for f in fields))

    def _fill(self, obj: Any, fields: list) -> Any:
        return _fill(obj, *self._fill_values(fields))

    # --- tensors and arrays ---

    def _tensor(self, index: int, fields: list) -> Any:
        values = _expect(fields[0], list, "tensor")
        if len(values) != len(fmt.TENSOR_FIELDS):
            raise BundleError(f"malformed bundle: a tensor node has {len(values)} fields, not {len(fmt.TENSOR_FIELDS)}")
        meta = dict(zip(fmt.TENSOR_FIELDS, values))
        self._frame(_expect(meta["storage"], int, "tensor storage"))
        for key, kind in (("dtype", str), ("shape", list), ("stride", list), ("offset", int), ("device", str)):
            _expect(meta.get(key), kind, f"tensor {key}")
        return self.run(index, partial(_tensor, meta))

    def _ndarray(self, index: int, fields: list) -> Any:
        return self.run(index, partial(_ndarray, self._frame(fields[0]), _expect(fields[1], str, "array dtype"),
                                       _expect(fields[2], list, "array shape")))

    #: Node tag -> builder; checked against ``format.TAGS`` below, so a renamed or
    #: added tag fails at import. A subclass that replaces builders gives its own table.
    BUILDERS: dict[str, Callable[["Decoder", int, list], Any]] = {}

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        check_builders(cls.BUILDERS, cls)


Decoder.BUILDERS = {
    fmt.LIST: Decoder._list, fmt.TUPLE: Decoder._tuple, fmt.DICT: Decoder._dict, fmt.SET: Decoder._set,
    fmt.FROZENSET: Decoder._frozenset, fmt.BYTEARRAY: Decoder._bytearray, fmt.BIGINT: Decoder._bigint,
    fmt.COMPLEX: Decoder._complex, fmt.REFERENCE: Decoder._ref, fmt.MODULE: Decoder._module,
    fmt.FUNCTION: Decoder._function, fmt.CELL: Decoder._cell, fmt.CLASS: Decoder._class,
    fmt.ATTRIBUTE: Decoder._getattr, fmt.BOUND_METHOD: Decoder._method, fmt.WRAPPER: Decoder._wrap,
    fmt.PROPERTY: Decoder._property, fmt.LRU_CACHE: Decoder._lru_cache, fmt.OBJECT: Decoder._object,
    fmt.REDUCE: Decoder._reduce, fmt.TENSOR: Decoder._tensor, fmt.NDARRAY: Decoder._ndarray,
    fmt.BYTES_FRAME: Decoder._bytesframe, fmt.UNAVAILABLE: Decoder._unavailable, fmt.PERSISTENT: Decoder._persistent,
    fmt.NAMEDTUPLE: Decoder._namedtuple, fmt.SURROGATE_STR: Decoder._surrogates, fmt.ORDERED_DICT: Decoder._odict,
    fmt.STRING: Decoder._str,
}


def check_builders(table: dict, cls: type) -> None:
    """Every node tag of ``format.TAGS`` has a builder and nothing else does, and each is
    ``cls``'s own method of that name (a subclass that overrides a builder but keeps its
    parent's table would otherwise go on calling the parent's)."""
    if set(table) != fmt.TAGS:
        raise RuntimeError(f"{cls.__name__}.BUILDERS and format.TAGS differ: no builder for "
                           f"{sorted(fmt.TAGS - set(table))}, builders for unknown tags {sorted(set(table) - fmt.TAGS)}")
    stale = sorted(tag for tag, builder in table.items() if getattr(cls, builder.__name__) is not builder)
    if stale:
        raise RuntimeError(f"{cls.__name__} overrides the builders of {stale} but its BUILDERS table does not "
                           "name them")


check_builders(Decoder.BUILDERS, Decoder)


# --- steps: what a load does, as functions of (the slots, the load) ---

def _new_list(slots: list, load: _Load) -> list:
    return []


def _new_dict(slots: list, load: _Load) -> dict:
    return {}


def _new_set(slots: list, load: _Load) -> set:
    return set()


def _new_cell(slots: list, load: _Load) -> types.CellType:
    return types.CellType()


def _new_ordered_dict(slots: list, load: _Load) -> dict:
    return load.dest.resolve("collections", "OrderedDict")()


def _slot(index: int, slots: list, load: _Load) -> Any:
    return slots[index]


def _call(make: Callable, argument: Any, slots: list, load: _Load) -> Any:
    return make(argument)


def _make(make: Callable, items: list, slots: list, load: _Load) -> Any:
    return make([_get(slots, item) for item in items])


def _make_from(make: Callable, encoded: tuple, slots: list, load: _Load) -> Any:
    return make(*[_get(slots, value) for value in encoded])


def _later_item(container: int, key: Any, target: int) -> Callable:
    return partial(_fill_item, container, key, target)


def _fill_item(container: int, key: Any, target: int, slots: list, load: _Load) -> None:
    slots[container][_get(slots, key)] = slots[target]


def _extend_list(index: int, items: list, slots: list, load: _Load) -> None:
    slots[index].extend([_get(slots, item) for item in items])


def _fill_dict(index: int, pairs: list, slots: list, load: _Load) -> None:
    result = slots[index]
    for key, value in pairs:
        result[_get(slots, key)] = _get(slots, value)


def _fill_set(index: int, items: list, slots: list, load: _Load) -> None:
    slots[index].update([_get(slots, item) for item in items])


def _later_cell(cell: int, target: int) -> Callable:
    return partial(_fill_cell, cell, _Ref(target))


def _fill_cell(index: int, content: Any, slots: list, load: _Load) -> None:
    slots[index].cell_contents = _get(slots, content)


def _bytes_of_frame(number: int, slots: list, load: _Load) -> bytes:
    return bytes(load.frames[number])


def _persistent(token: str, slots: list, load: _Load) -> Any:
    if load.persistent_load is None:
        raise BundleError(f"the bundle refers to {token!r}, an object the receiver must supply, "
                          "but no persistent_load was given")
    return load.persistent_load(token)


def _resolve(module: str, qualname: str, slots: list, load: _Load) -> Any:
    try:
        return load.dest.resolve(module, qualname)
    except ImportError:
        raise
    except AttributeError as exc:
        raise ImportError(f"{module}.{qualname} does not exist on this side ({exc}); "
                          "the two sides have different versions of the module") from None


def _new_module(name: str, file: Any, package: Any, slots: list, load: _Load) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = file
    module.__package__ = package
    module.__builtins__ = load.namespace_builtins()
    load.register(module)
    return module


def _set_global(slot: int, name: str, entry: Any, slots: list, load: _Load) -> None:
    slots[slot].__dict__[name] = _get(slots, entry)


def _register_lines(segment: Segment, slots: list, load: _Load) -> None:
    register_lines(segment)


def _new_function(code: types.CodeType, slot: int, name: str, cells: tuple, slots: list,
                  load: _Load) -> types.FunctionType:
    closure = tuple([types.CellType() if cell is None else slots[cell] for cell in cells]) or None
    return types.FunctionType(code, slots[slot].__dict__, name, None, closure)


def _finish_function(index: int, qualname: str, module_name: str | None, doc: Any, defaults: Any, kwdefaults: Any,
                     annotations: Any, attributes: Any, imports: list, slots: list, load: _Load) -> None:
    fn = slots[index]
    fn.__qualname__ = qualname
    fn.__doc__ = _get(slots, doc)
    if module_name is not None:
        fn.__module__ = module_name
    origins.remember(fn, fn.__module__, qualname)
    fn.__defaults__ = _get(slots, defaults)
    fn.__kwdefaults__ = _get(slots, kwdefaults)
    annotations = _get(slots, annotations)
    if annotations:
        fn.__annotations__ = annotations
    for name, module in imports:
        load.importable[name] = _get(slots, module)
    attributes = _get(slots, attributes)
    if attributes:
        fn.__dict__.update(attributes)


def _run_class(code: types.CodeType, slot: int, name: str, slots: list, load: _Load) -> type:
    scope: dict[str, Any] = {}
    exec(code, slots[slot].__dict__, scope)
    return scope[name]


def _run_class_in_closure(runner_code: types.CodeType, slot: int, cells: tuple, slots: list, load: _Load) -> type:
    closure = tuple([types.CellType(None) if cell is None else slots[cell] for cell in cells])
    return types.FunctionType(runner_code, slots[slot].__dict__, CLOSURE_WRAPPER, None, closure)()


def _finish_class(index: int, slot: int, qualname: str, slots: list, load: _Load) -> None:
    cls = slots[index]
    cls.__qualname__ = qualname
    _remember_definitions(cls, slots[slot].__name__, qualname)


def _class_attribute_name(cls: type, name: str) -> str:
    if name.startswith("__") and name.endswith("__"):  # the class machinery's, never shipped (encoder)
        raise BundleError(f"malformed bundle: class {cls.__qualname__} lists {fmt.describe(name)} among its "
                          "attributes; special names come from the class statement")
    return name


def _set_class_attribute(index: int, name: str, encoded: Any, slots: list, load: _Load) -> None:
    cls = slots[index]
    try:
        setattr(cls, name, _get(slots, encoded))
    except Exception as exc:  # a read-only slot, or a metaclass that refuses the value
        raise BundleError(f"cannot set {cls.__qualname__}.{name}: {type(exc).__name__}: {exc}") from None


def _new_namedtuple(typename: str, names: list, defaults: Any, module: str, qualname: str, slots: list,
                    load: _Load) -> type:
    namedtuple = load.dest.resolve("collections", "namedtuple")
    cls = namedtuple(typename, names, defaults=_get(slots, defaults) or None, module=module)
    cls.__qualname__ = qualname
    origins.remember(cls, module, qualname)
    return cls


def _attribute(owner: Any, name: str, slots: list, load: _Load) -> Any:
    owner = _get(slots, owner)
    value = getattr(owner, name)
    origin = origins.of(owner)
    if origin is not None and getattr(value, "__qualname__", None) == f"{owner.__qualname__}.{name}" \
            and getattr(value, "__module__", None) == owner.__module__:
        # A nested class or method made by the shipped class statement (not one the
        # class inherits from a library, which keeps its own name).
        origins.remember(value, origin[0], f"{origin[1]}.{name}")
    return value


def _new_lru_cache(func: Any, maxsize: int | None, typed: bool, slots: list, load: _Load) -> Any:
    return load.dest.resolve("functools", "lru_cache")(maxsize=maxsize, typed=typed)(_get(slots, func))


def _new_object(cls: Any, args: Any, kwargs: Any, slots: list, load: _Load) -> Any:
    cls = _get(slots, cls)
    return cls.__new__(cls, *(_get(slots, args) or ()), **(_get(slots, kwargs) or {}))


def _reduce(func: Any, args: Any, slots: list, load: _Load) -> Any:
    return _get(slots, func)(*(_get(slots, args) or ()))


def _fill_object(index: int, state: Any, listitems: Any, dictitems: Any, slots: list, load: _Load) -> None:
    _fill(slots[index], *_checked_fill_values(_get(slots, state), _get(slots, listitems), _get(slots, dictitems)))


def _checked_fill_values(state: Any, listitems: Any, dictitems: Any) -> tuple[Any, Any, Any]:
    for items, what in ((listitems, "list items"), (dictitems, "dict items")):
        if items is not None and type(items) is not list:  # the encoder sends lists: a range would never end
            raise BundleError(f"malformed bundle: an object's {what} are a {type(items).__name__}, not a list")
    return state, listitems, dictitems


def _fill(obj: Any, state: Any, listitems: Any, dictitems: Any) -> Any:
    """State and items as pickle sets them: ``__setstate__``, else ``__dict__`` and slots."""
    if state is not None:
        setstate = getattr(obj, "__setstate__", None)
        if setstate is not None:
            setstate(state)
        else:
            slots = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
            if state:
                obj.__dict__.update(state)
            for name, value in (slots or {}).items():
                object.__setattr__(obj, name, value)
    if listitems and hasattr(obj, "extend"):
        obj.extend(listitems)
    elif listitems:
        for item in listitems:
            obj.append(item)
    for key, value in dictitems or ():
        obj[key] = value
    return obj


def _tensor(meta: dict, slots: list, load: _Load) -> Any:
    number = meta["storage"]
    storage = load.storages.get(number)
    if storage is None:
        storage = load.storages[number] = arrays.storage_from_frame(load.frames[number])
    return arrays.tensor_from_storage(storage, meta, load.device)


def _ndarray(number: int, dtype: str, shape: list, slots: list, load: _Load) -> Any:
    return arrays.ndarray_from_frame(load.frames[number], dtype, shape)


# --- plans: repeat loads of the same bundle ---

class Plan:
    """The steps of one successful decode, to make fresh objects from again.

    Valid only for the same header bytes, destination object and tenant (the cache key).
    Holds no object of any load: only code objects, immutable constants and the steps.
    """

    __slots__ = ("dest", "tenant", "template", "steps", "root", "tags", "sources", "frame_count",
                 "shipped_imports", "header_end", "header_digest", "frame_table", "size")

    def __init__(self, dest: Any, tenant: str, template: list, steps: list, root: Any, tags: list,
                 sources: list, frame_count: int, shipped_imports: bool):
        self.dest, self.tenant, self.template, self.steps, self.root = dest, tenant, template, steps, root
        self.tags, self.sources, self.frame_count, self.shipped_imports = tags, sources, frame_count, shipped_imports
        self.header_end = 0  # loads(): where the frame area starts, and the header's digest
        self.header_digest = b""
        self.frame_table: list = []
        self.size = 0  # header bytes, for the cache's bound

    def instantiate(self, frames: Sequence[memoryview], persistent_load: Any, device: str | None,
                    source_store: MutableMapping[str, str] | None) -> Any:
        """Fresh objects: the recorded steps on fresh slots, with the checks that depend on
        this load (the frames it came with, the sources its store holds) made again."""
        if len(frames) != self.frame_count:
            raise BundleError(f"the bundle lists {self.frame_count} frames but {len(frames)} came with it")
        _check_sources(self.sources, source_store)
        load = _Load(frames, self.dest, persistent_load, device, self.shipped_imports)
        slots = self.template.copy()
        owner = -1
        try:
            for index, step, owner in self.steps:  # noqa: B007 (owner: read by the except below)
                result = step(slots, load)
                if index is not None:
                    slots[index] = result
            return _get(slots, self.root)
        except (BundleError, ImportError):
            raise
        except Exception as exc:  # shipped code that raised while rebuilding, as on the first load
            tag = self.tags[owner] if 0 <= owner < len(self.tags) else "module"
            raise BundleError(f"cannot rebuild node {owner} ({tag}): {type(exc).__name__}: {exc}") from exc
        finally:
            load.unregister()


def _check_sources(sources: list, store: MutableMapping[str, str] | None) -> None:
    """What ``read_segments`` did with the store: texts sent by digest must still be there
    (a store forgets), texts sent in full are taught to it."""
    missing = []
    for digest, text in sources:
        if text is None:
            if store is None or store.get(digest) is None:
                missing.append(digest)
        elif store is not None:
            store[digest] = text
    if missing:
        raise MissingSources(missing)


#: Plans kept, least recently used dropped first. A plan holds its header's values
#: (parsed), so plans are bounded by header bytes too: one for a larger header is not kept.
MAX_PLANS = 256
MAX_PLAN_BYTES = 1 << 20
MAX_PLANS_BYTES = 16 << 20
#: ``loads`` keys a plan by the digest of its first bytes (the header, when it is shorter).
PREFIX = 4096
_plans: "collections.OrderedDict[tuple, Plan]" = collections.OrderedDict()
_plans_lock = threading.Lock()


def plan_key(kind: str, data: memoryview, dest: Any, tenant: str) -> tuple:
    """The cache key of a bundle's header bytes (``decode``) or of bundle bytes (``loads``)
    under ``dest`` (by identity: a different policy object never shares a plan) and tenant."""
    digest = hashlib.sha256(data if kind == "decode" else data[:PREFIX]).digest()
    return (kind, digest, id(dest), tenant)


PlanCacheInfo = collections.namedtuple("PlanCacheInfo", "hits misses plans")
_counts = {"hits": 0, "misses": 0, "bytes": 0}


def cached_plan(key: tuple, dest: Any) -> Plan | None:
    with _plans_lock:
        plan = _plans.get(key)
        if plan is None or plan.dest is not dest:  # an id reused by a new object is not the same policy
            _counts["misses"] += 1
            return None
        _plans.move_to_end(key)
        _counts["hits"] += 1
    return plan


def plan_cache_info() -> PlanCacheInfo:
    """Loads that replayed a plan (hits), loads that decoded afresh (misses), plans kept."""
    with _plans_lock:
        return PlanCacheInfo(_counts["hits"], _counts["misses"], len(_plans))


def keep_plan(key: tuple, plan: Plan, size: int) -> None:
    """Keep ``plan`` (of a header of ``size`` bytes) for repeat loads, within the bounds."""
    if size > MAX_PLAN_BYTES:
        return
    plan.size = size
    with _plans_lock:
        previous = _plans.pop(key, None)
        _counts["bytes"] += size - (previous.size if previous is not None else 0)
        _plans[key] = plan
        while len(_plans) > MAX_PLANS or _counts["bytes"] > MAX_PLANS_BYTES:
            _counts["bytes"] -= _plans.popitem(last=False)[1].size


def clear_plans() -> None:
    """Forget every plan (their code objects with them): a receiver serving another
    tenant next drops what the previous one's bundles compiled to."""
    with _plans_lock:
        _plans.clear()
        _counts["bytes"] = 0


def _remember_definitions(cls: type, module: str, qualname: str) -> None:
    """Remember where a rebuilt class came from, and the classes and functions its
    statement defined (nested classes, methods), which travel with it."""
    origins.remember(cls, module, qualname)
    for name, value in list(vars(cls).items()):
        value = getattr(value, "__func__", value)  # staticmethod, classmethod
        if getattr(value, "__qualname__", None) != f"{cls.__qualname__}.{name}":
            continue
        if isinstance(value, type):
            _remember_definitions(value, module, f"{qualname}.{name}")
        elif isinstance(value, types.FunctionType):
            origins.remember(value, module, f"{qualname}.{name}")


def _with_shipped_imports(builtins: dict, shipped: dict[str, types.ModuleType]) -> dict:
    """The policy's builtins, with relative imports between shipped modules answered from
    the bundle (those modules exist nowhere else); every other import meets the policy."""
    policy_import = builtins["__import__"]

    def __import__(name, globals=None, locals=None, fromlist=(), level=0):
        if level > 0 and globals is not None:
            package = globals.get("__package__") or ""
            base = package.rsplit(".", level - 1)[0] if level > 1 else package
            module = shipped.get(f"{base}.{name}" if name else base)
            if module is not None:
                return module
        return policy_import(name, globals, locals, fromlist, level)

    return {**builtins, "__import__": __import__}


def read_segments(sources: list, store: MutableMapping[str, str] | None,
                  seen: list[tuple[str, str | None]] | None = None) -> list[Segment]:
    """The source table as segments. Entries without text are looked up in ``store``
    (a worker's memory of what it was sent before); every missing one is reported at once.
    ``seen`` gets (digest, text sent or None) per entry, for a plan to check again."""
    segments, missing = [], []
    last_lines: dict[str, int] = {}  # per file: compiling pads each segment to its line (a passing cost)
    for s in sources:
        _expect(s, dict, "source")
        kind = s.get("kind")
        if kind not in ("def", "class", "lambda"):
            raise BundleError(f"malformed bundle: source kind {fmt.describe(kind)}")
        line, col = _expect(s.get("line"), int, "source line"), _expect(s.get("col"), int, "source column")
        if not 1 <= line <= _MAX_LINE or not 0 <= col <= 100_000:
            raise BundleError(f"malformed bundle: source position {line}:{col}")
        file = _expect(s.get("file"), str, "source file")
        last_lines[file] = max(line, last_lines.get(file, 0))
        if sum(last_lines.values()) > _MAX_LINE:
            raise BundleError(f"malformed bundle: its sources claim more than {_MAX_LINE} lines of files")
        digest = _expect(s.get("digest"), str, "source digest")
        text = s.get("text")
        if text is None:
            text = store.get(digest) if store is not None else None
            if text is None:
                missing.append(digest)
                continue
        segment = Segment(file, line, col, kind, _expect(text, str, "source text"),
                          tuple(_expect(f, str, "future name") for f in _expect(s.get("futures"), list, "futures")),
                          _expect(s.get("end_col", 0), int, "source end column"))
        if store is not None and "text" in s:  # a store must not learn text under a false name
            if segment.digest != digest:
                raise BundleError(f"source at {segment.file}:{line} does not match its digest")
            store[digest] = segment.text
        if seen is not None:
            seen.append((digest, s.get("text")))
        segments.append(segment)
    if missing:
        raise MissingSources(missing)
    return segments
