"""Bundle header nodes and frames -> live objects (the receiving side).

Every shipped module gets a fresh namespace per bundle, whose ``__builtins__`` come from
the destination policy: the imports that shipped code makes meet the policy there.
Objects are built on demand from the root; mutable containers are registered before
their contents are built, so shared references and cycles come back as they were.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Callable, MutableMapping, Sequence

from . import arrays, format as fmt, origins
from .destination import DEFAULT
from .errors import BundleError, MissingSources
from .source import CLOSURE_WRAPPER, Segment, class_closure_code, code_of, compile_segment, register_lines

_MISSING = object()
#: Shipped code is registered in linecache at its real lines: bound what a bundle may claim.
_MAX_LINE = 1_000_000


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


class Decoder:
    def __init__(self, header: dict, frames: Sequence[memoryview], destination: Any = None,
                 persistent_load: Callable[[str], Any] | None = None, device: str | None = None,
                 source_store: MutableMapping[str, str] | None = None, tenant: str = ""):
        self.header = header
        self.tenant = tenant
        self.frames = frames
        self.dest = destination if destination is not None else DEFAULT
        self.persistent_load = persistent_load
        self.device = device
        self.nodes: list = header["nodes"]
        self.segments = read_segments(header["sources"], source_store)
        self.registered_lines: set[int] = set()
        self.built: list[Any] = [_MISSING] * len(self.nodes)
        self.state: list[int] = [0] * len(self.nodes)  # 0 new, 1 building, 2 built
        self.modules: dict[int, types.ModuleType] = {}
        self.storages: dict[int, Any] = {}
        self.ready: set[int] = set()
        self._builtins: dict | None = None
        self.registered: list[str] = []
        self.class_attributes: list[tuple[type, dict]] = []
        self.pending: dict[int, list[Callable[[Any], None]]] = {}
        self.importable: dict[str, types.ModuleType] = {}

    # --- entry ---

    def root(self) -> Any:
        try:
            value = self.value(self.header["root"])
            completed: set[int] = set()
            while len(completed) < len(self.modules):  # completing one can reach new modules
                for number in [n for n in self.modules if n not in completed]:
                    self._complete_namespace(number)
                    completed.add(number)
            # Last, so that what class statements did on load (a registry that
            # __init_subclass__ appends to) ends as it was captured, not doubled.
            for cls, attrs in self.class_attributes:
                for name, encoded in attrs.items():
                    self._set_class_attribute(cls, _expect(name, str, "class attribute name"), self.value(encoded))
            return value
        finally:
            for name in self.registered:
                sys.modules.pop(name, None)

    @staticmethod
    def _set_class_attribute(cls: type, name: str, value: Any) -> None:
        if name.startswith("__") and name.endswith("__"):  # the class machinery's, never shipped (encoder)
            raise BundleError(f"malformed bundle: class {cls.__qualname__} lists {fmt.describe(name)} among its "
                              "attributes; special names come from the class statement")
        try:
            setattr(cls, name, value)
        except Exception as exc:  # a read-only slot, or a metaclass that refuses the value
            raise BundleError(f"cannot set {cls.__qualname__}.{name}: {type(exc).__name__}: {exc}") from None

    def value(self, encoded: Any) -> Any:
        kind = type(encoded)
        if kind is fmt.Ref:
            index = encoded.index
            built = self.built[index] if 0 <= index < len(self.built) else _MISSING
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
        try:
            obj = getattr(self, "_" + node[0])(index, node[1:])
        except (BundleError, ImportError, RecursionError):
            raise
        except Exception as exc:  # malformed fields, or shipped code that raised while rebuilding
            raise BundleError(f"cannot rebuild node {index} ({node[0]}): {type(exc).__name__}: {exc}") from exc
        self.built[index] = obj
        self.state[index] = 2
        for fill in self.pending.pop(index, ()):
            fill(obj)
        return obj

    def _register(self, index: int, obj: Any) -> Any:
        """Make a container visible to references inside itself before it is filled."""
        self.built[index] = obj
        return obj

    # --- containers and scalars ---

    def _list(self, index: int, fields: list) -> list:
        result = self._register(index, [])
        for position, item in enumerate(_expect(fields[0], list, "list items")):
            result.append(self._value_or_later(item, lambda obj, p=position: result.__setitem__(p, obj)))
        return result

    def _value_or_later(self, encoded: Any, fill: Callable[[Any], None]) -> Any:
        """The value, or None for now when it is a tuple still being built around this
        container (a cycle through a tuple); ``fill`` puts it in place once it exists."""
        if self._unfinished(encoded):
            self.pending.setdefault(encoded.index, []).append(fill)
            return None
        return self.value(encoded)

    def _tuple(self, index: int, fields: list) -> tuple:
        return tuple([self.value(v) for v in _expect(fields[0], list, "tuple items")])

    def _odict(self, index: int, fields: list) -> dict:
        return self._dict(index, fields, self.dest.resolve("collections", "OrderedDict")())

    def _dict(self, index: int, fields: list, result: dict | None = None) -> dict:
        result = self._register(index, {} if result is None else result)
        for pair in _expect(fields[0], list, "dict items"):
            _expect(pair, list, "dict item")
            if len(pair) != 2:
                raise BundleError("malformed bundle: a dict item is not a key/value pair")
            key = self.value(pair[0])
            result[key] = self._value_or_later(pair[1], lambda obj, k=key: result.__setitem__(k, obj))
        return result

    def _set(self, index: int, fields: list) -> set:
        result = self._register(index, set())
        result.update(self.value(v) for v in _expect(fields[0], list, "set items"))
        return result

    def _frozenset(self, index: int, fields: list) -> frozenset:
        return frozenset([self.value(v) for v in _expect(fields[0], list, "frozenset items")])

    def _bytearray(self, index: int, fields: list) -> bytearray:
        return bytearray(_expect(fields[0], bytes, "bytearray data"))

    def _str(self, index: int, fields: list) -> str:
        return _expect(fields[0], str, "string")

    def _surrogates(self, index: int, fields: list) -> str:
        return _expect(fields[0], bytes, "surrogate string").decode("utf-8", "surrogatepass")

    def _bigint(self, index: int, fields: list) -> int:
        text = _expect(fields[0], str, "big integer")
        if len(text) > 100_000:
            raise BundleError("malformed bundle: an integer of more than 100000 digits")
        return int(text)

    def _complex(self, index: int, fields: list) -> complex:
        return complex(_expect(fields[0], float, "complex real part"), _expect(fields[1], float, "complex imaginary part"))

    def _bytesframe(self, index: int, fields: list) -> bytes:
        return bytes(self._frame(fields[0]))

    def _frame(self, number: Any) -> memoryview:
        _expect(number, int, "frame number")
        if not 0 <= number < len(self.frames):
            raise BundleError(f"malformed bundle: frame {number} of {len(self.frames)}")
        return self.frames[number]

    def _persistent(self, index: int, fields: list) -> Any:
        token = _expect(fields[0], str, "persistent token")
        if self.persistent_load is None:
            raise BundleError(f"the bundle refers to {token!r}, an object the receiver must supply, "
                              "but no persistent_load was given")
        return self.persistent_load(token)

    def _unavailable(self, index: int, fields: list) -> Unavailable:
        return Unavailable(_expect(fields[0], str, "description"))

    # --- references and modules ---

    def _ref(self, index: int, fields: list) -> Any:
        module, qualname = _expect(fields[0], str, "module name"), _expect(fields[1], str, "qualified name")
        try:
            return self.dest.resolve(module, qualname)
        except ImportError:
            raise
        except AttributeError as exc:
            raise ImportError(f"{module}.{qualname} does not exist on this side ({exc}); "
                              "the two sides have different versions of the module") from None

    def _module(self, index: int, fields: list) -> types.ModuleType:
        self.namespace(fields[0])
        return self.modules[fields[0]]

    def namespace(self, number: Any) -> dict:
        """The fresh namespace of shipped module ``number``: a real module's ``__dict__``,
        so a module object and the functions defined in it share it."""
        _expect(number, int, "module number")
        records = self.header["modules"]
        if not 0 <= number < len(records):
            raise BundleError(f"malformed bundle: module {number} of {len(records)}")
        module = self.modules.get(number)
        if module is None:
            record = _expect(records[number], dict, "module record")
            if self._builtins is None:
                self._builtins = self.dest.builtins()
                if any(node[0] == fmt.FUNCTION and isinstance(node[1], dict) and node[1].get("imports")
                       for node in self.nodes if isinstance(node, list) and len(node) > 1):
                    self._builtins = _with_shipped_imports(self._builtins, self.importable)
            module = types.ModuleType(_expect(record.get("name"), str, "module name"))
            module.__file__ = record.get("file")
            module.__package__ = record.get("package")
            module.__builtins__ = self._builtins
            self.modules[number] = module
            if module.__name__ not in sys.modules:
                # Only while loading: class machinery (dataclasses, typing) looks the
                # defining module up by name. A real module of that name is never shadowed.
                sys.modules[module.__name__] = module
                self.registered.append(module.__name__)
        return module.__dict__

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
        namespace[name] = self.value(entry)

    def _complete_namespace(self, number: int) -> None:
        entries = _expect(self.header["modules"][number].get("globals"), dict, "module globals")
        for name in entries:
            self.ensure_global(number, _expect(name, str, "global name"))

    def _prepare_ref(self, encoded: Any) -> None:
        if isinstance(encoded, fmt.Ref):
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
            register_lines(segment)
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
        cells = tuple(self._cell_for(closure[name]) for name in code.co_freevars)
        namespace = self.namespace(spec["module"])
        fn = types.FunctionType(code, namespace, _expect(spec["name"], str, "function name"), None, cells or None)
        self._register(index, fn)
        fn.__qualname__ = _expect(spec["qualname"], str, "qualified name")
        fn.__doc__ = self.value(spec.get("doc"))
        if "module_name" in spec:
            fn.__module__ = spec["module_name"]
        origins.remember(fn, fn.__module__, fn.__qualname__)
        fn.__defaults__ = self.value(spec.get("defaults"))
        fn.__kwdefaults__ = self.value(spec.get("kwdefaults"))
        annotations = self.value(spec.get("annotations"))
        if annotations:
            fn.__annotations__ = annotations
        for name, module in _expect(spec.get("imports", {}), dict, "imports").items():
            self.importable[_expect(name, str, "module name")] = self.value(module)
        attributes = self.value(spec.get("dict"))
        if attributes:
            fn.__dict__.update(attributes)
        return fn

    def _cell_for(self, encoded: Any) -> types.CellType:
        if encoded is None:
            return types.CellType()
        cell = self.value(encoded)
        if not isinstance(cell, types.CellType):
            raise BundleError("malformed bundle: a closure entry is not a cell")
        return cell

    def _cell(self, index: int, fields: list) -> types.CellType:
        cell = self._register(index, types.CellType())
        if fields:  # a function whose closure holds itself is filled in once it exists
            cell.cell_contents = self._value_or_later(fields[0], lambda obj: setattr(cell, "cell_contents", obj))
        return cell

    def _unfinished(self, encoded: Any) -> bool:
        return (isinstance(encoded, fmt.Ref) and 0 <= encoded.index < len(self.nodes)
                and self.state[encoded.index] == 1 and self.built[encoded.index] is _MISSING)

    def _class(self, index: int, fields: list) -> type:
        spec = _expect(fields[0], dict, "class")
        segment = self.segment(spec["source"])
        if segment.kind != "class":
            raise BundleError("malformed bundle: a class node points at a function")
        self.prepare(index)
        closure = _expect(spec.get("closure", {}), dict, "class closure")
        freevars = tuple(sorted(closure))
        code = compile_segment(segment, freevars, self.tenant)
        namespace = self.namespace(spec["module"])
        if freevars:
            runner_code = class_closure_code(code)
            # A variable only the class body read has no cell of its own: it reads None.
            cells = tuple(self._cell_for(closure[name]) if closure.get(name) is not None else types.CellType(None)
                          for name in runner_code.co_freevars)
            cls = types.FunctionType(runner_code, namespace, CLOSURE_WRAPPER, None, cells)()
        else:
            scope: dict[str, Any] = {}
            exec(code, namespace, scope)
            cls = scope[_expect(spec["name"], str, "class name")]
        self._register(index, cls)
        cls.__qualname__ = _expect(spec["qualname"], str, "qualified name")
        _remember_definitions(cls, namespace["__name__"], cls.__qualname__)
        self.class_attributes.append((cls, _expect(spec.get("attrs", {}), dict, "class attributes")))
        return cls

    def _namedtuple(self, index: int, fields: list) -> type:
        typename, names, defaults, module, qualname = fields
        namedtuple = self.dest.resolve("collections", "namedtuple")
        cls = namedtuple(_expect(typename, str, "namedtuple name"), _expect(names, list, "namedtuple fields"),
                         defaults=self.value(defaults) or None, module=_expect(module, str, "namedtuple module"))
        cls.__qualname__ = _expect(qualname, str, "qualified name")
        origins.remember(cls, module, cls.__qualname__)
        return cls

    def _getattr(self, index: int, fields: list) -> Any:
        owner = self.value(fields[0])
        name = _expect(fields[1], str, "attribute name")
        value = getattr(owner, name)
        origin = origins.of(owner)
        if origin is not None and getattr(value, "__qualname__", None) == f"{owner.__qualname__}.{name}" \
                and getattr(value, "__module__", None) == owner.__module__:
            # A nested class or method made by the shipped class statement (not one the
            # class inherits from a library, which keeps its own name).
            origins.remember(value, origin[0], f"{origin[1]}.{name}")
        return value

    def _method(self, index: int, fields: list) -> types.MethodType:
        return types.MethodType(self.value(fields[0]), self.value(fields[1]))

    def _wrap(self, index: int, fields: list) -> Any:
        kind = {"staticmethod": staticmethod, "classmethod": classmethod}.get(fields[0])
        if kind is None:
            raise BundleError(f"malformed bundle: unknown wrapper {fmt.describe(fields[0])}")
        return kind(self.value(fields[1]))

    def _property(self, index: int, fields: list) -> property:
        return property(*(self.value(f) for f in fields[:4]))

    def _lru_cache(self, index: int, fields: list) -> Any:
        lru_cache = self.dest.resolve("functools", "lru_cache")
        maxsize = fields[1] if fields[1] is None else _expect(fields[1], int, "lru_cache maxsize")
        return lru_cache(maxsize=maxsize, typed=bool(fields[2]))(self.value(fields[0]))

    # --- objects ---

    def _object(self, index: int, fields: list) -> Any:
        cls = self.value(fields[0])
        self._prepare_ref(fields[0])  # __new__ and __setstate__ may be shipped code
        if not isinstance(cls, type):
            raise BundleError(f"malformed bundle: an object's class is a {type(cls).__name__}")
        args = self.value(fields[1]) or ()
        kwargs = self.value(fields[2]) or {}
        obj = self._register(index, cls.__new__(cls, *args, **kwargs))
        return self._fill(obj, fields[3:])

    def _reduce(self, index: int, fields: list) -> Any:
        func = self.value(fields[0])
        self._prepare_ref(fields[0])
        if not callable(func):
            raise BundleError("malformed bundle: a reduce node's constructor is not callable")
        obj = self._register(index, func(*(self.value(fields[1]) or ())))
        return self._fill(obj, fields[2:])

    def _fill_values(self, fields: list) -> tuple[Any, Any, Any]:
        """An object's state, list items and dict items, the items checked to be lists."""
        state, listitems, dictitems = (self.value(f) for f in fields)
        for items, what in ((listitems, "list items"), (dictitems, "dict items")):
            if items is not None and type(items) is not list:  # the encoder sends lists: a range would never end
                raise BundleError(f"malformed bundle: an object's {what} are a {type(items).__name__}, not a list")
        return state, listitems, dictitems

    def _fill(self, obj: Any, fields: list) -> Any:
        state, listitems, dictitems = self._fill_values(fields)
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

    # --- tensors and arrays ---

    def _tensor(self, index: int, fields: list) -> Any:
        values = _expect(fields[0], list, "tensor")
        if len(values) != len(fmt.TENSOR_FIELDS):
            raise BundleError(f"malformed bundle: a tensor node has {len(values)} fields, not {len(fmt.TENSOR_FIELDS)}")
        meta = dict(zip(fmt.TENSOR_FIELDS, values))
        number = _expect(meta["storage"], int, "tensor storage")
        storage = self.storages.get(number)
        if storage is None:
            storage = self.storages[number] = arrays.storage_from_frame(self._frame(number))
        for key, kind in (("dtype", str), ("shape", list), ("stride", list), ("offset", int), ("device", str)):
            _expect(meta.get(key), kind, f"tensor {key}")
        return arrays.tensor_from_storage(storage, meta, self.device)

    def _ndarray(self, index: int, fields: list) -> Any:
        return arrays.ndarray_from_frame(self._frame(fields[0]), _expect(fields[1], str, "array dtype"),
                                         _expect(fields[2], list, "array shape"))


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


def read_segments(sources: list, store: MutableMapping[str, str] | None) -> list[Segment]:
    """The source table as segments. Entries without text are looked up in ``store``
    (a worker's memory of what it was sent before); every missing one is reported at once."""
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
        segments.append(segment)
    if missing:
        raise MissingSources(missing)
    return segments
