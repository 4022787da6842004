"""Live objects -> bundle header nodes and frames (the sending side).

One pass over the object graph. Every non-scalar value becomes a node once (a memo by
identity keeps sharing and cycles); user code becomes source segments bound to
per-module namespace records, and only the globals that code actually names travel.
"""
from __future__ import annotations

import builtins
import collections
import copyreg
import functools
import importlib.util
import platform
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Container

from . import arrays, format as fmt, origins
from .destination import DEFAULT, walk_qualname
from .errors import CaptureError
from .source import (
    Segment, SourceUnavailable, class_segment, class_statement_code, defined_by_class_statement,
    function_segment, global_names, in_site_packages, relative_imports,
)

#: bytes values longer than this travel as frames, outside the msgpack body.
BYTES_FRAME_THRESHOLD = 64 * 1024
_INT_RANGE = (-(2 ** 63), 2 ** 64 - 1)
_MAX_DEPTH = 200
_SCALARS = (type(None), bool, float, str)
_SHARED_STRING_MIN = 6
#: Set on every shipped namespace when it is created on the receiving side.
_NAMESPACE_DUNDERS = frozenset({"__name__", "__file__", "__package__", "__builtins__", "__spec__",
                                "__loader__", "__cached__", "__doc__"})


@dataclass
class Bundle:
    """An encoded bundle: the msgpack header and the raw frames it indexes.

    ``frames`` are views of the original tensors' memory where possible (no copy);
    ``keepalive`` holds what they view. ``to_bytes()`` gives the single-buffer form.
    """

    header: bytes
    frames: list[memoryview]
    keepalive: list = field(default_factory=list, repr=False)
    #: Content digests of the source segments, for receivers that keep a source store.
    source_digests: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return fmt.join(self.header, self.frames)

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(f.nbytes for f in self.frames)


@dataclass
class _ModuleRecord:
    index: int
    name: str
    file: str | None
    package: str | None
    entries: dict[str, Any]  # a _Tables.dict(): rolled back with the rest


_ABSENT = object()
_set = dict.__setitem__


class _LoggedDict(dict):
    """A dict whose item assignments can be undone: each logs the key's previous value.
    The other mutators are refused, so no write escapes the log."""

    __slots__ = ("_log", "_number")

    def __init__(self, log: list, number: int):
        super().__init__()
        self._log, self._number = log, number

    def __setitem__(self, key: Any, value: Any) -> None:
        # The table by number: a log entry of atoms is one the garbage collector untracks.
        self._log.append((self._number, key, self.get(key, _ABSENT)))
        _set(self, key, value)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("an encoder table changes only by item assignment (table[key] = value), "
                        "which rollback can undo")

    __delitem__ = pop = popitem = setdefault = update = clear = _refuse


class _Tables:
    """Everything one encode accumulates, able to go back to an earlier state.

    Every attribute is a table of one of two kinds, and :meth:`checkpoint` refuses any
    other, so a table added here cannot be left out of :meth:`rollback`:

    - a ``list`` that only grows while encoding (rollback truncates it);
    - a :meth:`dict` whose writes are logged (rollback restores each key's old value).
    """

    def __init__(self) -> None:
        self._log: list[tuple] = []  # (dict number, key, previous value or _ABSENT)
        self._dicts: list[_LoggedDict] = []
        self.nodes: list[Any] = []
        self.keepalive: list[Any] = []  # what memo ids and frames point at, alive until sent
        self.frames: list[memoryview] = []
        self.sources: list[dict] = []
        self.modules: list[_ModuleRecord] = []
        self.tensors: list[tuple[dict, Any]] = []  # (metadata, tensor), finalised in bundle()
        self.memo: dict[int, fmt.Ref] = self.dict()  # id(obj) -> its node
        self.source_index: dict[Segment, int] = self.dict()
        self.module_index: dict[int, _ModuleRecord] = self.dict()  # id(namespace) -> record
        self.shipped_whole: dict[int, bool] = self.dict()  # module record index -> True
        self.storages: dict[tuple, int] = self.dict()  # (data_ptr, device, nbytes) -> frame
        self.strings: dict[str, Any] = self.dict()  # text -> False (seen once) or its shared node

    def dict(self) -> dict:
        """A new table whose writes rollback undoes (module records' entries are such too)."""
        table = _LoggedDict(self._log, len(self._dicts))
        self._dicts.append(table)
        return table

    def checkpoint(self) -> tuple:
        lengths = {}
        for name, table in vars(self).items():
            if name == "_log" or isinstance(table, _LoggedDict):
                continue
            if type(table) is not list:
                raise TypeError(f"encoder table {name!r} is a {type(table).__name__}: make it a list that only "
                                "grows or a _Tables.dict(), so that rollback can undo it")
            lengths[name] = len(table)
        return len(self._log), lengths

    def rollback(self, mark: tuple) -> None:
        """Forget everything encoded since ``mark`` (a value that turned out not to travel)."""
        logged, lengths = mark
        for number, key, previous in reversed(self._log[logged:]):
            if previous is _ABSENT:
                dict.__delitem__(self._dicts[number], key)
            else:
                _set(self._dicts[number], key, previous)
        del self._log[logged:]
        for name, length in lengths.items():
            del getattr(self, name)[length:]


def _refusal(obj: Any) -> tuple[str, str] | None:
    """Why ``obj`` cannot travel honestly, and what to do instead, for known kinds."""
    import io

    modules = sys.modules
    if isinstance(obj, io.IOBase):
        return ("an open file is a handle into this process",
                "Read what you need into bytes, str or a tensor first, or open the file inside the "
                "function so it runs on the worker (subject to the policy).")
    if isinstance(obj, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        return ("a generator or coroutine in flight holds a running frame",
                "Send the generator function itself, or materialise its values with list(...).")
    if isinstance(obj, (types.FrameType, types.TracebackType)):
        return ("frames and tracebacks are interpreter state",
                "Send the data you need from it (for an error: str(exc) or traceback.format_exc()).")
    if isinstance(obj, types.CodeType):
        return ("code objects are bytecode, which is specific to one Python version",
                "Send the function; it travels as source.")
    threading = modules.get("threading")
    if threading is not None:
        lock_types = (type(threading.Lock()), type(threading.RLock()), threading.Condition,
                      threading.Semaphore, threading.Event, threading.Barrier)
        if isinstance(obj, lock_types):
            return ("locks and other synchronisation primitives belong to one process",
                    "Create a new one inside the function that runs on the worker.")
        if isinstance(obj, threading.Thread):
            return ("a thread is a running OS thread of this process",
                    "Send the function the thread runs and start work on the worker instead.")
    socket = modules.get("socket")
    if socket is not None and isinstance(obj, socket.socket):
        return ("a socket is a connection owned by this process",
                "Send the data instead; the worker's policy decides whether it may open connections.")
    sqlite3 = modules.get("sqlite3")
    if sqlite3 is not None and isinstance(obj, (sqlite3.Connection, sqlite3.Cursor)):
        return ("a database connection is a handle into this process",
                "Query the rows you need first and send them (a list, a dict, an array).")
    if isinstance(obj, memoryview):
        return ("a memoryview points into another object's memory",
                "Send bytes(view) or the object it views.")
    if isinstance(obj, (types.MappingProxyType,)):
        return ("a mappingproxy is a read-only view of a class namespace", "Send dict(proxy).")
    asyncio = modules.get("asyncio")
    if asyncio is not None and isinstance(obj, asyncio.AbstractEventLoop):
        return ("an event loop runs in this process, with its handles and callbacks",
                "Send the coroutine function and run it with asyncio.run(...) inside the function on the worker.")
    os = modules["os"]
    if isinstance(obj, type(os.environ)):
        return ("os.environ is this process's environment",
                "Send dict(os.environ) or just the variables you need; the worker has its own environment.")
    return None


class Encoder:
    """Encodes one object graph into one :class:`Bundle`.

    Single-use: make one per bundle (``capture.encode`` does); its tables keep growing
    until :meth:`bundle`, which hands them over. Not thread-safe: the tables are plain
    mutable state, so one encoder belongs to one thread (separate encoders in separate
    threads are fine).
    """

    def __init__(self, destination: Any = None, persistent_id: Callable[[Any], str | None] | None = None,
                 known_sources: Container[str] = ()):
        self.dest = destination if destination is not None else DEFAULT
        self.known_sources = known_sources
        self.persistent_id = persistent_id
        self.tables = _Tables()
        self.depth = 0

    # --- entry points ---

    def bundle(self, root: Any) -> Bundle:
        self._compact_lone_views()
        for meta, _ in self.tables.tensors:
            meta["node"][1] = [meta[name] for name in fmt.TENSOR_FIELDS]
        header = {
            "format": fmt.FORMAT_NAME,
            "version": fmt.FORMAT_VERSION,
            "python": platform.python_version(),
            "policy": getattr(self.dest, "name", type(self.dest).__name__),
            "root": root,
            "nodes": self.tables.nodes,
            "sources": self.tables.sources,
            "modules": [
                {"name": m.name, "file": m.file, "package": m.package, "globals": dict(m.entries)}
                for m in self.tables.modules
            ],
            "frames": fmt.frame_table(self.tables.frames),
        }
        return Bundle(fmt.pack_header(header), self.tables.frames, self.tables.keepalive,
                      [entry["digest"] for entry in self.tables.sources])

    def variables(self, mapping: dict[str, Any]) -> fmt.Ref:
        """A dict of named values whose error paths start at the names themselves."""
        ref = self._new_node(mapping, [fmt.DICT, None])
        self.tables.nodes[ref.index][1] = [[name, self.value(value, name)] for name, value in mapping.items()]
        return ref

    # --- the dispatcher ---

    def value(self, obj: Any, path: str) -> Any:
        kind = type(obj)
        if kind is str and not obj.isascii() and _has_lone_surrogate(obj):
            return self._new_node(obj, [fmt.SURROGATE_STR, obj.encode("utf-8", "surrogatepass")])
        if kind is str and len(obj) >= _SHARED_STRING_MIN:
            return self._string(obj)
        if kind in _SCALARS:
            return obj
        if kind is int:
            return obj if _INT_RANGE[0] <= obj <= _INT_RANGE[1] else self._new_node(obj, [fmt.BIGINT, str(obj)])
        if kind is bytes and len(obj) <= BYTES_FRAME_THRESHOLD:
            return obj
        ref = self.tables.memo.get(id(obj))
        if ref is not None:
            return ref
        if kind is bytes:  # a large one leaves the msgpack body, once however often it recurs
            return self._new_node(obj, [fmt.BYTES_FRAME, self._frame(memoryview(obj), obj)])
        if self.persistent_id is not None:
            token = self.persistent_id(obj)
            if token is not None:
                return self._new_node(obj, [fmt.PERSISTENT, token])
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise CaptureError(path, kind.__name__, f"the object graph nests deeper than {_MAX_DEPTH} levels, more "
                               f"than the destination ({self._dest_name()}) rebuilds",
                               "Flatten the structure (for example a linked list into a list).")
        try:
            return self._dispatch(obj, kind, path)
        finally:
            self.depth -= 1

    def _dispatch(self, obj: Any, kind: type, path: str) -> Any:
        if kind is list:
            ref = self._new_node(obj, [fmt.LIST, None])
            self.tables.nodes[ref.index][1] = [self.value(v, f"{path}[{i}]") for i, v in enumerate(obj)]
            return ref
        if kind is tuple:
            items = [self.value(v, f"{path}[{i}]") for i, v in enumerate(obj)]
            # A tuple reached again through a list inside it was encoded by that inner visit.
            return self.tables.memo.get(id(obj)) or self._new_node(obj, [fmt.TUPLE, items])
        if kind is dict or kind is collections.OrderedDict:
            ref = self._new_node(obj, [fmt.DICT if kind is dict else fmt.ORDERED_DICT, None])
            self.tables.nodes[ref.index][1] = [
                [self.value(k, f"{path}.<key>"), self.value(v, f"{path}[{k!r}]")] for k, v in obj.items()
            ]
            return ref
        if kind in (set, frozenset):
            tag = fmt.SET if kind is set else fmt.FROZENSET
            ref = self._new_node(obj, [tag, None])
            self.tables.nodes[ref.index][1] = [self.value(v, f"{path}.<item>") for v in _stable_order(obj)]
            return ref
        if kind is bytearray:
            return self._new_node(obj, [fmt.BYTEARRAY, bytes(obj)])
        if kind is complex:
            return self._new_node(obj, [fmt.COMPLEX, obj.real, obj.imag])
        if arrays.is_tensor(obj):
            return self._tensor(obj, path)
        if arrays.is_ndarray(obj):
            return self._ndarray(obj, path)
        refusal = _refusal(obj)
        if refusal is not None:
            reason, advice = refusal
            raise CaptureError(path, _type_name(obj), f"{reason}, which the destination ({self._dest_name()}) "
                               "cannot have", advice)
        if isinstance(obj, types.ModuleType):
            return self._module(obj, path, full=True)
        if kind is types.FunctionType:
            return self._function(obj, path)
        if isinstance(obj, type):
            return self._class(obj, path)
        if kind is types.MethodType:
            ref = self._new_node(obj, [fmt.BOUND_METHOD, None, None])
            self.tables.nodes[ref.index][1:] = [self.value(obj.__func__, f"{path}.__func__"),
                                         self.value(obj.__self__, f"{path}.__self__")]
            return ref
        if kind in (types.BuiltinFunctionType, types.MethodWrapperType, types.MethodDescriptorType,
                    types.WrapperDescriptorType, types.ClassMethodDescriptorType):
            return self._builtin(obj, path)
        if kind is functools._lru_cache_wrapper:
            params = obj.cache_parameters()
            ref = self._new_node(obj, [fmt.LRU_CACHE, None, params["maxsize"], params["typed"]])
            self.tables.nodes[ref.index][1] = self.value(obj.__wrapped__, f"{path}.__wrapped__")
            return ref
        if kind in (staticmethod, classmethod):
            ref = self._new_node(obj, [fmt.WRAPPER, kind.__name__, None])
            self.tables.nodes[ref.index][2] = self.value(obj.__func__, f"{path}.__func__")
            return ref
        if kind is property:
            ref = self._new_node(obj, [fmt.PROPERTY, None, None, None, None])
            self.tables.nodes[ref.index][1:] = [self.value(obj.fget, f"{path}.fget"), self.value(obj.fset, f"{path}.fset"),
                                         self.value(obj.fdel, f"{path}.fdel"), self.value(obj.__doc__, f"{path}.__doc__")]
            return ref
        return self._reduce(obj, path)

    def _string(self, text: str) -> Any:
        """A string inline the first time; from its second use on, one node shared by
        reference (nn.Module state repeats the same dozen attribute names per module)."""
        seen = self.tables.strings.get(text)
        if seen is None:
            self.tables.strings[text] = False
            return text
        if seen is False:
            seen = fmt.Ref(len(self.tables.nodes))
            self.tables.nodes.append([fmt.STRING, text])
            self.tables.strings[text] = seen
        return seen

    # --- bookkeeping ---

    def _new_node(self, obj: Any, node: list) -> fmt.Ref:
        tables = self.tables
        ref = fmt.Ref(len(tables.nodes))
        tables.nodes.append(node)
        tables.memo[id(obj)] = ref
        tables.keepalive.append(obj)
        return ref

    def _frame(self, view: memoryview, owner: Any) -> int:
        self.tables.frames.append(view)
        self.tables.keepalive.append(owner)
        return len(self.tables.frames) - 1

    def _source(self, segment: Segment) -> int:
        index = self.tables.source_index.get(segment)
        if index is None:
            index = len(self.tables.sources)
            entry = {"file": segment.file, "line": segment.line, "col": segment.col, "kind": segment.kind,
                     "futures": list(segment.futures), "digest": segment.digest}
            if segment.kind == "lambda":
                entry["end_col"] = segment.end_col
            if segment.digest not in self.known_sources:
                entry["text"] = segment.text
            self.tables.sources.append(entry)
            self.tables.source_index[segment] = index
        return index

    # --- modules and their namespaces ---

    def _record(self, namespace: dict, path: str) -> _ModuleRecord:
        record = self.tables.module_index.get(id(namespace))
        if record is None:
            record = _ModuleRecord(len(self.tables.modules), str(namespace.get("__name__", "__main__")),
                                   namespace.get("__file__"), namespace.get("__package__"), self.tables.dict())
            self.tables.modules.append(record)
            self.tables.module_index[id(namespace)] = record
            self.tables.keepalive.append(namespace)
        return record

    def _need_globals(self, namespace: dict, names: dict[str, frozenset[tuple[str, ...]]], path: str) -> list[str]:
        """Make sure each global name the code uses travels in its module's record."""
        record = self._record(namespace, path)
        needed = []
        for name in names:
            if name not in namespace or name in _NAMESPACE_DUNDERS:
                continue  # a builtin, never defined (e.g. only under TYPE_CHECKING), or set on arrival
            needed.append(name)
            value = namespace[name]
            where = f"{record.name}.{name}"
            if name not in record.entries:
                record.entries[name] = None  # claimed: recursion back to this name stops here
                if isinstance(value, types.ModuleType) and not self._is_server_module(value):
                    record.entries[name] = self._module(value, where, full=False)
                else:
                    record.entries[name] = self.value(value, where)
            if isinstance(value, types.ModuleType) and not self._is_server_module(value):
                for chain in sorted(names[name]):
                    self._need_module_chain(value, chain, where)
        return needed

    def _need_module_chain(self, module: types.ModuleType, chain: tuple[str, ...], path: str) -> None:
        if not chain or chain[0] not in vars(module):
            return
        self._need_globals(vars(module), {chain[0]: frozenset({chain[1:]} if chain[1:] else ())}, path)

    def _is_server_module(self, module: types.ModuleType) -> bool:
        return self.dest.provides(module.__name__)

    def _module(self, module: types.ModuleType, path: str, full: bool) -> Any:
        name = module.__name__
        if self.dest.provides(name):
            return self._new_node(module, [fmt.REFERENCE, name, ""])
        if not _has_source(module):
            raise CaptureError(
                path, f"module {name}",
                f"the destination ({self._dest_name()}) does not have {name!r}, and it has no Python "
                "source to ship (a C extension or built-in module)",
                f"Use only modules the destination provides, or ask the server to install {name!r} "
                "(and add it to your policy).")
        record = self._record(vars(module), path)
        ref = self.tables.memo.get(id(module)) or self._new_node(module, [fmt.MODULE, record.index])
        if full and record.index not in self.tables.shipped_whole:
            self.tables.shipped_whole[record.index] = True
            try:
                self._ship_whole_module(module, record, path)
            except CaptureError as exc:
                package = _installed_package(name)
                if package is None:
                    raise
                raise CaptureError(
                    path, f"module {name}",
                    f"it is the installed package '{package}', which the destination ({self._dest_name()}) does "
                    f"not have; your own code travels as source, installed libraries do not (sending it failed "
                    f"at {exc.path}: {exc.reason})",
                    f"Use a policy whose destination has '{package}' (python -m sandbox diff shows what each "
                    "has), or do not use it in the code sent to the worker.") from None
        return ref

    def _ship_whole_module(self, module: types.ModuleType, record: _ModuleRecord, path: str) -> None:
        """Everything a module defines travels; names that cannot travel become
        placeholders that raise a clear error if the shipped code ever touches them."""
        namespace = vars(module)
        own = [n for n, v in namespace.items() if getattr(v, "__module__", None) == module.__name__
               and isinstance(v, (types.FunctionType, type))]
        rest = [n for n in namespace if n not in own and not (n.startswith("__") and n.endswith("__"))]
        self._need_globals(namespace, {n: frozenset() for n in own}, path)
        for name in rest:
            value = namespace[name]
            if isinstance(value, types.ModuleType) and not self._is_server_module(value):
                if value.__name__.startswith(module.__name__ + "."):  # a package ships its submodules whole
                    ref = self._module(value, f"{path}.{name}", full=True)
                    if name not in record.entries:
                        record.entries[name] = ref
                elif name not in record.entries:
                    self._placeholder(record, name, f"module {value.__name__!r}, which {module.__name__} imports, "
                                      f"is not on the destination ({self._dest_name()}) and was not shipped")
                continue
            if name in record.entries:
                continue
            mark = self.tables.checkpoint()
            try:
                self._need_globals(namespace, {name: frozenset()}, path)
            except CaptureError as exc:
                self.tables.rollback(mark)
                self._placeholder(record, name, str(exc))

    def _placeholder(self, record: _ModuleRecord, name: str, why: str) -> None:
        ref = fmt.Ref(len(self.tables.nodes))
        self.tables.nodes.append([fmt.UNAVAILABLE, f"{record.name}.{name}: {why}"])
        record.entries[name] = ref

    def _dest_name(self) -> str:
        return getattr(self.dest, "name", "destination")

    # --- references to what the destination has ---

    def _reference(self, obj: Any, module: str | None, qualname: str, path: str) -> fmt.Ref | None:
        """A by-name reference when ``module.qualname`` is on the destination and is ``obj``."""
        if not module or not self.dest.provides(module) or "<locals>" in qualname:
            return None
        try:
            found = walk_qualname(sys.modules.get(module) or __import__(module, fromlist=["_"]), qualname)
        except Exception:
            return None
        if found is not obj:
            return None
        return self._new_node(obj, [fmt.REFERENCE, module, qualname])

    def _sent_back(self, obj: Any, path: str, what: str) -> fmt.Ref | None:
        """A class or function rebuilt here from what the destination sent, as a
        reference to the destination's own (see ``capture.origins``)."""
        origin = origins.of(obj)
        if origin is None or not self.dest.provides(origin[0]):
            return None
        module, qualname = origin
        if not origins.nameable(qualname):
            raise CaptureError(path, f"{what} {module}.{qualname}",
                               f"the {self._dest_name()} sent this {what}, but it is a lambda or is defined inside "
                               f"a function, so the {self._dest_name()} has nothing to find it by name",
                               f"Define it at module level in {module}, or return data instead of the {what}.")
        return self._new_node(obj, [fmt.REFERENCE, module, qualname])

    def _made_here(self, obj: Any, path: str, what: str) -> CaptureError:
        """A class or function that shipped code created on this side (the worker) at
        run time: the destination (the client) has no counterpart to name."""
        return CaptureError(
            path, f"{what} {obj.__qualname__}",
            f"the worker created this {what} while your code ran there ({obj.__qualname__!r} in "
            f"{obj.__module__!r} was not sent by the {self._dest_name()}), so the {self._dest_name()} has "
            f"no {what} of that name",
            f"Return data instead: a dict, list or tuple, or an instance of a class defined at module level in "
            f"your own module (those come back as the {self._dest_name()}'s own class).")

    def _builtin(self, obj: Any, path: str) -> fmt.Ref:
        owner = getattr(obj, "__self__", None)
        if owner is None or isinstance(owner, types.ModuleType):
            module = getattr(obj, "__module__", None) or getattr(owner, "__name__", None)
            # torch.zeros calls itself _VariableFunctionsClass.zeros: its module exports it by name.
            ref = self._reference(obj, module, obj.__qualname__, path) or self._reference(obj, module, obj.__name__, path)
            if ref is not None:
                return ref
            raise CaptureError(path, _type_name(obj),
                               f"built-in {obj.__qualname__!r} of module {module!r} is not on the destination "
                               f"({self._dest_name()}) and has no source", "Use a function the destination provides.")
        return self._new_node(obj, [fmt.ATTRIBUTE, self.value(owner, f"{path}.__self__"), obj.__name__])

    # --- functions ---

    def _function(self, fn: types.FunctionType, path: str) -> fmt.Ref:
        module = fn.__module__
        ref = self._sent_back(fn, path, "function") or self._reference(fn, module, fn.__qualname__, path)
        if ref is not None:
            return ref
        if module and self.dest.provides(module):
            home = sys.modules.get(module)
            if home is None or vars(home) is not fn.__globals__:
                raise self._made_here(fn, path, "function")
            raise CaptureError(path, f"function {fn.__qualname__}",
                               f"{fn.__qualname__!r} belongs to {module!r}, which the destination "
                               f"({self._dest_name()}) has, but is not reachable there by name (a lambda or "
                               "closure inside it)",
                               "Wrap the call in a function of your own module.")
        owner = self._owning_class(fn)
        if owner is not None:
            name = fn.__qualname__.rpartition(".")[2]  # the attribute, whatever __name__ became
            return self._new_node(fn, [fmt.ATTRIBUTE, self.value(owner, f"{path}.<class>"), name])
        try:
            segment = function_segment(fn.__code__, fn.__globals__)
        except SourceUnavailable as exc:
            raise CaptureError(path, f"function {fn.__qualname__}",
                               f"the destination ({self._dest_name()}) does not have {fn.__qualname__!r}, so it "
                               f"must travel as source, and its source cannot be found: {exc}",
                               "Define it with `def` in a .py file, a notebook cell or a __main__ script.") from None
        node: dict[str, Any] = {}
        ref = self._new_node(fn, [fmt.FUNCTION, node])
        record = self._record(fn.__globals__, path)
        node["source"] = self._source(segment)
        node["module"] = record.index
        node["name"] = fn.__name__
        node["qualname"] = fn.__qualname__
        node["doc"] = self.value(fn.__doc__, f"{path}.__doc__")
        try:
            node["deps"] = self._need_globals(fn.__globals__, global_names(fn.__code__), path)
        except CaptureError as exc:
            raise _needed_by(path, f"function {fn.__qualname__}", exc, self._dest_name()) from None
        imports = self._relative_imports(fn, path)
        if imports:
            node["imports"] = imports
        node["closure"] = {
            name: self._cell(cell, f"{path}.<closure {name}>")
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ())
        }
        node["defaults"] = self.value(fn.__defaults__, f"{path}.__defaults__")
        node["kwdefaults"] = self.value(fn.__kwdefaults__, f"{path}.__kwdefaults__")
        node["annotations"] = self._annotations(fn.__annotations__, path)
        node["dict"] = self.value(fn.__dict__, path) if fn.__dict__ else None
        if fn.__module__ != record.name:
            node["module_name"] = fn.__module__
        return ref

    def _relative_imports(self, fn: types.FunctionType, path: str) -> dict[str, fmt.Ref]:
        """Sibling modules that ``from .x import y`` inside ``fn`` reaches when called: they
        travel with it (what they export by those names), since a package travels whole or
        not at all as far as the destination can tell."""
        package = fn.__globals__.get("__package__") or ""
        modules = {}
        for level, name, names in relative_imports(fn.__code__):
            try:
                target = importlib.util.resolve_name("." * level + name, package)
            except (ImportError, ValueError):
                continue
            module = sys.modules.get(target)
            if module is None or self._is_server_module(module):
                continue
            record = self._record(vars(module), path)
            for attr in names:
                value = vars(module).get(attr)
                if isinstance(value, types.ModuleType) and not self._is_server_module(value):
                    ref = self._module(value, f"{path}.<import {target}.{attr}>", full=True)
                    if attr not in record.entries:
                        record.entries[attr] = ref
                elif attr != "*":
                    self._need_globals(vars(module), {attr: frozenset()}, f"{path}.<import {target}>")
            modules[target] = self._module(module, f"{path}.<import {target}>", full="*" in names)
        return modules

    def _owning_class(self, fn: types.FunctionType) -> type | None:
        """The class ``fn`` is a method of, when the class statement recreates it."""
        owner_name, _, name = fn.__qualname__.rpartition(".")
        if not owner_name or owner_name.endswith("<locals>"):
            return None
        try:
            owner = walk_qualname(sys.modules[fn.__module__], owner_name)
        except (KeyError, AttributeError):
            return None
        if isinstance(owner, type) and getattr(owner, name, None) is fn:
            return owner
        return None

    def _cell(self, cell: types.CellType, path: str) -> fmt.Ref:
        ref = self.tables.memo.get(id(cell))
        if ref is not None:
            return ref
        ref = self._new_node(cell, [fmt.CELL])
        try:
            contents = cell.cell_contents
        except ValueError:
            return ref  # an empty cell: the variable was not bound yet
        self.tables.nodes[ref.index].append(self.value(contents, path))
        return ref

    def _annotations(self, annotations: dict, path: str) -> Any:
        """Annotations travel as values; one that cannot travel goes as its text (PEP 563 style)."""
        if not annotations:
            return None
        result = {}
        for name, value in annotations.items():
            mark = self.tables.checkpoint()
            try:
                result[name] = self.value(value, f"{path}.__annotations__[{name!r}]")
            except CaptureError:
                self.tables.rollback(mark)
                result[name] = value if isinstance(value, str) else repr(value)
        return self._new_node(annotations, [fmt.DICT, [[k, v] for k, v in result.items()]])

    # --- classes ---

    def _class(self, cls: type, path: str) -> fmt.Ref:
        module = cls.__module__
        ref = self._sent_back(cls, path, "class") or self._reference(cls, module, cls.__qualname__, path)
        if ref is None and module == "builtins":  # NoneType, EllipsisType, ... are named in `types`
            ref = self._reference(cls, "types", cls.__name__, path)
        if ref is not None:
            return ref
        if _is_namedtuple_class(cls):
            return self._namedtuple_class(cls, path)
        if module == "builtins":  # what exec() or type() made in a namespace without __name__
            raise CaptureError(path, f"class {cls.__qualname__}", f"the destination ({self._dest_name()}) has no "
                               f"class {cls.__qualname__!r}, and it has no source to ship (made by exec or type(), "
                               "not by a class statement in a file)",
                               "Define the class with a `class` statement in a .py file, notebook cell or script.")
        if self.dest.provides(module):
            home = sys.modules.get(module)
            namespace = _class_globals(cls)
            if home is None or (namespace is not None and namespace is not vars(home)):
                raise self._made_here(cls, path, "class")
            raise CaptureError(path, f"class {cls.__qualname__}", f"{cls.__qualname__!r} belongs to {module!r}, which the "
                               f"destination ({self._dest_name()}) has, but is not reachable there by name",
                               "Define the class in a module of your own.")
        outer_name, _, name = cls.__qualname__.rpartition(".")
        if outer_name and not outer_name.endswith("<locals>"):
            try:
                outer = walk_qualname(sys.modules[module], outer_name)
            except (KeyError, AttributeError):
                outer = None
            if isinstance(outer, type) and vars(outer).get(name) is cls:
                return self._new_node(cls, [fmt.ATTRIBUTE, self.value(outer, f"{path}.<outer class>"), name])
        home = sys.modules.get(module)
        if home is not None and _is_compiled(home):
            raise CaptureError(path, f"class {cls.__qualname__}", f"{cls.__qualname__!r} comes from {module!r}, which the destination "
                               f"({self._dest_name()}) does not have and which has no Python source "
                               "(a C extension)", f"Use only what the destination provides, or ask for {module!r} "
                               "to be installed on the server (and add it to your policy).")
        if "__dataclass_fields__" in vars(cls) and not self.dest.provides("dataclasses"):
            raise CaptureError(path, f"{cls.__qualname__} dataclass",
                               f"it is a @dataclass, and the destination ({self._dest_name()}) does not have the "
                               "module 'dataclasses' that its class statement needs",
                               f"Make {cls.__name__} a plain class with an __init__ (plain classes travel as source), "
                               "or use a policy whose destination has dataclasses.")
        namespace = getattr(home, "__dict__", None)
        filename = _class_file(cls, namespace)
        if namespace is None:
            namespace = _class_globals(cls)
        if filename is None or namespace is None:
            raise CaptureError(path, f"class {cls.__qualname__}", f"the destination ({self._dest_name()}) does not "
                               f"have class {cls.__qualname__!r}, so it must travel as source, and its source "
                               f"cannot be found (created by type() or exec, or its module is gone)",
                               "Define the class with a `class` statement in a .py file, notebook cell or script.")
        try:
            segment = class_segment(cls, namespace, filename)
        except SourceUnavailable as exc:
            raise CaptureError(path, f"class {cls.__qualname__}", f"the destination ({self._dest_name()}) does not "
                               f"have class {cls.__qualname__!r}, so it must travel as source, and its source "
                               f"cannot be found: {exc}",
                               "Define the class with a `class` statement in a .py file, notebook cell or script.") from None
        node: dict[str, Any] = {}
        ref = self._new_node(cls, [fmt.CLASS, node])
        record = self._record(namespace, path)
        node["source"] = self._source(segment)
        node["module"] = record.index
        node["name"] = cls.__name__
        node["qualname"] = cls.__qualname__
        used = global_names(class_statement_code(segment))
        try:
            node["deps"] = self._need_globals(namespace, used, path)
            node["closure"] = self._class_closure(cls, used, namespace, path) if "<locals>" in cls.__qualname__ else {}
            node["attrs"] = self._class_attributes(cls, segment, path)
        except CaptureError as exc:
            raise _needed_by(path, f"class {cls.__qualname__}", exc, self._dest_name()) from None
        return ref

    def _namedtuple_class(self, cls: type, path: str) -> fmt.Ref:
        """A class made by ``collections.namedtuple`` has no class statement: it travels as
        the call that makes it (its methods are the library's)."""
        defaults = cls._field_defaults
        node = [fmt.NAMEDTUPLE, cls.__name__, list(cls._fields), None, cls.__module__, cls.__qualname__]
        ref = self._new_node(cls, node)
        node[3] = self.value(tuple(defaults[f] for f in cls._fields if f in defaults), f"{path}._field_defaults")
        return ref

    def _class_closure(self, cls: type, used: dict, namespace: dict, path: str) -> dict:
        """Values of the enclosing function's variables a class defined inside it uses.

        Methods carry them in their closures; a variable only the class body read gets
        None, and its effect survives through the class attributes restored afterwards.
        """
        cells: dict[str, Any] = {}
        for value in list(vars(cls).values()):
            func = getattr(value, "__func__", value)
            if isinstance(func, types.FunctionType) and func.__closure__:
                for name, cell in zip(func.__code__.co_freevars, func.__closure__):
                    if name != "__class__" and name not in cells:
                        cells[name] = self._cell(cell, f"{path}.<closure {name}>")
        for name in used:
            if name not in cells and name not in namespace and not hasattr(builtins, name):
                cells[name] = None
        return cells

    def _class_attributes(self, cls: type, segment: Segment, path: str) -> dict:
        """Class attributes whose current value the class statement does not recreate:
        values mutated or added after definition. Enum members come from the source."""
        import enum

        if issubclass(cls, enum.Enum):
            return {}
        attrs = {}
        for name, value in list(vars(cls).items()):  # reducing an instance may add __slotnames__
            if (name.startswith("__") and name.endswith("__")) or name.startswith("_abc_") \
                    or name in ("_fields", "_field_defaults"):
                continue
            if isinstance(value, (types.MemberDescriptorType, types.GetSetDescriptorType)) \
                    or type(value).__name__ == "_tuplegetter":
                continue  # made by __slots__ or namedtuple machinery when the class is built
            if defined_by_class_statement(cls, name, value, segment) or self._made_by_server_machinery(value):
                continue
            attrs[name] = self.value(value, f"{path}.{name}")
        return attrs

    def _made_by_server_machinery(self, value: Any) -> bool:
        """Methods that library code (namedtuple, enum, ...) adds while the class statement
        runs: running the statement on the destination adds them again."""
        func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        return isinstance(func, types.FunctionType) and bool(func.__module__) and self.dest.provides(func.__module__)

    # --- tensors and arrays ---

    def _requires(self, module: str, path: str, what: str) -> None:
        if not self.dest.provides(module):
            raise CaptureError(path, what, f"the destination ({self._dest_name()}) has no {module} to rebuild it with",
                               f"Convert it to plain Python data (.tolist()), or use a policy that provides {module}.")

    def _tensor(self, tensor: Any, path: str) -> fmt.Ref:
        import torch

        self._requires("torch", path, "Tensor")
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise CaptureError(path, _type_name(tensor), "tensor subclasses carry behaviour outside the data, and "
                               f"the destination ({self._dest_name()}) rebuilds plain tensors only",
                               "Send a plain tensor (tensor.as_subclass(torch.Tensor)) or the data it wraps.")
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
            raise CaptureError(path, "Tensor", f"the destination ({self._dest_name()}) rebuilds dense tensors with "
                               f"data only (this one is {tensor.layout}, device {tensor.device})",
                               "Convert with .to_dense() or materialise it.")
        ref = self._new_node(tensor, [fmt.TENSOR, None])
        if tensor.is_conj() or tensor.is_neg():
            # A lazy conjugate/negative view: its storage holds the unresolved values.
            tensor = tensor.resolve_conj().resolve_neg()
        meta = {
            "storage": None, "dtype": arrays.dtype_name(tensor), "shape": list(tensor.shape),
            "stride": list(tensor.stride()), "offset": tensor.storage_offset(),
            "requires_grad": tensor.requires_grad, "parameter": isinstance(tensor, torch.nn.Parameter),
            "device": str(tensor.device),
        }
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.device.type, storage.nbytes())
        meta["node"] = self.tables.nodes[ref.index]
        if key not in self.tables.storages or storage.nbytes() == 0:
            host, view = arrays.storage_view(tensor)
            self.tables.storages[key] = self._frame(view, host)
        meta["storage"] = self.tables.storages[key]
        self.tables.tensors.append((meta, tensor))
        return ref

    def _compact_lone_views(self) -> None:
        """A small view that is the only user of a big storage ships just its elements."""
        users: dict[int, int] = {}
        for meta, _ in self.tables.tensors:
            users[meta["storage"]] = users.get(meta["storage"], 0) + 1
        for meta, tensor in self.tables.tensors:
            frame = self.tables.frames[meta["storage"]]
            needed = tensor.numel() * tensor.element_size()
            if users[meta["storage"]] == 1 and needed * 2 <= frame.nbytes:
                import torch

                # clone, not contiguous(): a contiguous view part-way into its storage must
                # get storage of its own, or offset 0 would point at someone else's elements.
                dense = tensor.detach().clone(memory_format=torch.contiguous_format)
                host, view = arrays.storage_view(dense)
                self.tables.frames[meta["storage"]] = view
                self.tables.keepalive.append(host)
                meta["stride"], meta["offset"] = list(dense.stride()), 0

    def _ndarray(self, array: Any, path: str) -> fmt.Ref:
        self._requires("numpy", path, "ndarray")
        if array.dtype.hasobject or array.dtype.fields is not None:
            raise CaptureError(path, f"ndarray[{array.dtype}]", "object and structured arrays hold Python "
                               f"objects or named fields, and the destination ({self._dest_name()}) rebuilds arrays "
                               "of raw numbers only", "Convert to a numeric array or a list.")
        contiguous, view = arrays.ndarray_frame(array)
        return self._new_node(array, [fmt.NDARRAY, self._frame(view, contiguous), array.dtype.str, list(array.shape)])

    # --- everything else: the reduce protocol ---

    def _reduce(self, obj: Any, path: str) -> fmt.Ref:
        try:
            reduced = obj.__reduce_ex__(4)
        except Exception as exc:
            raise CaptureError(path, _type_name(obj), f"it does not describe how to rebuild itself ({exc}), so the "
                               f"destination ({self._dest_name()}) would have no way to",
                               "Send the data it holds instead, or give its class __getstate__/__setstate__ "
                               "or __reduce__.") from None
        if isinstance(reduced, str):
            module = getattr(obj, "__module__", None) or "builtins"
            ref = self._reference(obj, module, reduced, path)
            if ref is None:
                raise CaptureError(path, _type_name(obj), f"it names itself {module}.{reduced}, which the "
                                   f"destination ({self._dest_name()}) does not have", "Send its data instead.")
            return ref
        if not isinstance(reduced, tuple) or not 2 <= len(reduced) <= 6:
            raise CaptureError(path, _type_name(obj), "its __reduce_ex__ returned an unusable value, so the "
                               f"destination ({self._dest_name()}) would have no way to rebuild it",
                               "Fix the class's __reduce__.")
        func, args, state, listitems, dictitems, state_setter = (tuple(reduced) + (None,) * 5)[:6]
        if state_setter is not None:
            raise CaptureError(path, _type_name(obj), "its __reduce__ names a state setter, which bundles "
                               f"do not carry to the destination ({self._dest_name()})", "Return state that __setstate__ (or plain attribute "
                               "assignment) restores, without the sixth element.")
        if not isinstance(args, tuple) or not callable(func):
            raise CaptureError(path, _type_name(obj), "its __reduce__ did not return a callable and an "
                               f"argument tuple, so the destination ({self._dest_name()}) would have no way to rebuild it", "Fix the class's __reduce__.")
        if func is copyreg.__newobj__ or func is copyreg.__newobj_ex__:
            cls, new_args = args[0], args[1:]
            kwargs = {}
            if func is copyreg.__newobj_ex__:
                cls, new_args, kwargs = args
            ref = self._new_node(obj, [fmt.OBJECT, None, None, None, None, None, None])
            node = self.tables.nodes[ref.index]
            try:
                node[1] = self.value(cls, f"{path}.__class__")
            except CaptureError as exc:
                if exc.path != f"{path}.__class__":
                    raise
                # The user knows the instance by its own name, not by its class.
                raise CaptureError(path, exc.type_name, exc.reason, exc.workaround) from None
            node[2] = self.value(tuple(new_args), f"{path}.<new args>")
            node[3] = self.value(dict(kwargs), f"{path}.<new kwargs>") if kwargs else None
        else:
            # REDUCE and OBJECT end alike: state, listitems, dictitems.
            ref = self._new_node(obj, [fmt.REDUCE, None, None, None, None, None])
            node = self.tables.nodes[ref.index]
            node[1] = self.value(func, f"{path}.<reduce>")
            node[2] = self.value(tuple(args), f"{path}.<reduce args>")
        node[-3] = self._state(state, path)
        node[-2] = self.value(list(listitems), f"{path}.<items>") if listitems is not None else None
        node[-1] = self.value([[k, v] for k, v in dictitems], f"{path}.<items>") if dictitems is not None else None
        return ref

    def _state(self, state: Any, path: str) -> Any:
        """Instance state, with error paths that read like attribute access."""
        if type(state) is dict and all(type(k) is str for k in state):
            return self._new_node(state, [fmt.DICT, [[self.value(k, path), self.value(v, f"{path}.{k}")]
                                                 for k, v in state.items()]])
        if type(state) is tuple and len(state) == 2 and all(s is None or type(s) is dict for s in state):
            return self._new_node(state, [fmt.TUPLE, [self._state(s, path) if s is not None else None for s in state]])
        return self.value(state, f"{path}.<state>")


def _needed_by(path: str, type_name: str, exc: CaptureError, destination: str) -> CaptureError:
    """A refusal met while capturing what a definition uses (its globals, closure, class
    attributes), told from the definition the user passed: that is the path they know.
    A chain of definitions reads ``it uses a.f, which uses b.g (type), which cannot travel: ...``;
    one that enters an installed library the destination lacks says that instead."""
    if exc.path == path or exc.path.startswith((path + ".", path + "[")):
        return exc
    chain = [exc.path, *getattr(exc, "uses", ())]
    cause = getattr(exc, "cause", (exc.type_name, exc.reason))
    package = _installed_package(chain[0])
    if package is not None:
        error = CaptureError(
            path, type_name,
            f"it uses {chain[0]}, from the installed package '{package}', which the destination ({destination}) "
            f"does not have; your own code travels as source, installed libraries do not (sending "
            f"{package}'s code failed at {chain[-1]}: {cause[1]})",
            f"Use a policy whose destination has '{package}' (python -m sandbox diff shows what each has), "
            f"or keep {chain[0]} out of the code sent to the worker.")
        error.uses, error.cause = chain, cause
        return error
    error = CaptureError(path, type_name, f"it uses {', which uses '.join(chain)} ({cause[0]}), which cannot "
                         f"travel: {cause[1]}", exc.workaround)
    error.uses, error.cause = chain, cause
    return error


def _installed_package(dotted: str) -> str | None:
    """The top-level package of ``dotted`` when it is installed (in site-packages), not the
    user's own code: such code is not the user's to send."""
    top = dotted.partition(".")[0]
    module = sys.modules.get(top)
    return top if in_site_packages(getattr(module, "__file__", None) or "") else None


def _has_lone_surrogate(text: str) -> bool:
    """msgpack strings are UTF-8, which cannot hold the lone surrogates Python allows."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _stable_order(items: Any) -> list:
    """Set members in an order that does not depend on hash randomisation, without calling
    the members' own comparisons (a tensor's ``<`` raises, a frozenset's is partial).
    Members without a canonical form (identity-hashed objects) keep their set order."""
    keyed = [(_canonical_key(v), i, v) for i, v in enumerate(items)]
    keyed.sort(key=lambda entry: (entry[0] is None, entry[0] or (), entry[1]))
    return [v for _, _, v in keyed]


def _canonical_key(value: Any) -> tuple | None:
    kind = type(value)
    if kind in (bool, int, float, str, bytes, type(None)):
        return (kind.__name__, repr(value))
    if kind in (tuple, frozenset):
        keys = [_canonical_key(v) for v in value]
        if any(k is None for k in keys):
            return None
        return (kind.__name__, tuple(keys if kind is tuple else sorted(keys)))
    return None


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _is_namedtuple_class(cls: type) -> bool:
    """Made by ``collections.namedtuple`` (a NamedTuple class statement has its own source)."""
    return (issubclass(cls, tuple) and isinstance(vars(cls).get("_fields"), tuple)
            and getattr(vars(cls).get("_make"), "__func__", None) is not None
            and getattr(cls._make.__func__, "__module__", None) == "collections"
            and "__annotations__" not in vars(cls))


def _is_compiled(module: types.ModuleType) -> bool:
    """A C extension or built-in module: nothing of it can travel as source."""
    import importlib.machinery

    file = getattr(module, "__file__", None)
    if file is None:
        return module.__name__ in sys.builtin_module_names
    return file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def _has_source(module: types.ModuleType) -> bool:
    file = getattr(module, "__file__", None) or ""
    return file.endswith(".py")


def _class_file(cls: type, namespace: dict | None) -> str | None:
    """Where the class statement lives: a method's file is exact (notebook cells included)."""
    file = (namespace or {}).get("__file__")
    if isinstance(file, str) and file.endswith(".py"):
        return file
    for value in vars(cls).values():
        func = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
        if isinstance(func, types.FunctionType) and func.__qualname__.startswith(cls.__qualname__ + ".") \
                and func.__code__.co_filename != "<string>":
            return func.__code__.co_filename
    return None


def _class_globals(cls: type) -> dict | None:
    for value in vars(cls).values():
        func = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
        if isinstance(func, types.FunctionType):
            return func.__globals__
    return None
