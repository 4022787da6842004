"""Between requests the worker is as it was after start-up, verified, not assumed.

A ``Baseline`` is taken at the end of the worker's start-up (model loaded, before
``ready``). After every request, before the worker reads the next one, ``scrub()`` puts
back what can be put back exactly and cheaply (trace and profile functions, the sys and
threading hooks, torch's grad mode and default dtype, gradients on the model, files in
the scratch directory, linecache entries the request added), and ``check()`` lists what
cannot: a changed weight, a hook on the model, a replaced function of a library, a thread
or descriptor left behind. Any finding retires the worker: the ``verdict`` it sends after
its answer says why (``"retire"``) and the supervisor starts a fresh one before the next
request runs.

How each part is found (docs/SECURITY.md, "Requests cannot touch each other"):

- the model: every tensor's object, class, shape, strides, dtype, device, memory and
  ``requires_grad`` against start-up; its CPU parameters are read-only memory
  (``runner.weights``: a write faults), every other storage has a SHA-256 fingerprint;
- namespaces: the dicts of every module loaded at start-up and of their classes, of every
  submodule of the model and its config, the model's hook dicts and torch's global hook
  dicts are watched by CPython's per-dict version tag (one vectorised read of all of
  them), and only the dicts whose tag moved are compared with their start-up copy;
- an audit hook records ``object.__setattr__``/``__delattr__`` on classes and functions
  of start-up modules (``type.__setattr__``, a function's ``__code__``, ``__defaults__``)
  and refuses ``sys.addaudithook``;
- ``/proc/self/task`` and ``/proc/self/fd`` against their start-up sets.

Code that reaches ctypes or raw memory can undo any in-process check; the limits are in
docs/SECURITY.md.
"""
from __future__ import annotations

import builtins
import copyreg
import faulthandler
import gc
import hashlib
import itertools
import linecache
import operator
import os
import random
import shutil
import signal
import sys
import threading
import types
import warnings
from typing import Any

from . import handlers
from .nnsight_compat import torch_module

#: TEST ONLY: ``SOURCEBOX_TEST_NO_HYGIENE=1`` makes the worker skip the scrub and every
#: check, as before this module existed, so tests/test_isolation.py's controls can show
#: each attack working. Read once, at import; never set it in production.
DISABLED = os.environ.get("SOURCEBOX_TEST_NO_HYGIENE") == "1"

_SYS_HOOKS = ("excepthook", "unraisablehook", "displayhook", "breakpointhook")
_MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                      "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                      "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_parameters", "_buffers",
                      "_modules")
# Class attributes that count and nothing else: each hook handle takes the next id.
_COUNTERS = {("class torch.utils.hooks.RemovableHandle", "next_id")}
# CPython 3.10-3.13 lay a dict out as PyObject_HEAD, ma_used, ma_version_tag.
_USED_OFFSET, _VERSION_OFFSET = 16, 24


class _Memory:
    """An ``__array_interface__`` over the whole address range of the watched dicts, so
    numpy can gather all their version tags at once."""

    def __init__(self, base: int, length: int):
        self.__array_interface__ = {"data": (base, True), "shape": (length,), "typestr": "<u8", "version": 3}


def _version_tags_work() -> bool:
    """Whether this interpreter keeps ``ma_version_tag`` where we read it, and bumps it on
    every change: checked on dicts made here, before the tags are trusted."""
    import ctypes

    if not (3, 10) <= sys.version_info[:2] <= (3, 13) or sys.implementation.name != "cpython":
        return False
    probe = {"a": 1}
    used = ctypes.c_ssize_t.from_address(id(probe) + _USED_OFFSET)
    tag = ctypes.c_uint64.from_address(id(probe) + _VERSION_OFFSET)
    seen = [tag.value]
    probe["b"] = 2
    seen.append(tag.value)
    probe["a"] = object()
    seen.append(tag.value)
    del probe["b"]
    seen.append(tag.value)
    return used.value == 1 and len(set(seen)) == 4 and 0 not in seen


def _class_dict(cls: type) -> dict | None:
    """The dict behind ``cls.__dict__`` (a read-only proxy)."""
    referents = gc.get_referents(cls.__dict__)
    return referents[0] if len(referents) == 1 and type(referents[0]) is dict else None


class _Watched:
    """Dicts that must stay as they were, each with its start-up copy; which of them
    changed is found from their version tags where the interpreter allows it."""

    def __init__(self):
        self.dicts: list[dict] = []
        self.copies: list[dict] = []
        self.labels: list[str] = []
        self.owners: list[Any] = []  # a namespace's module name or class: what is benign there
        self._ids: set[int] = set()
        self._tags = None
        self._read = None

    def add(self, mapping: Any, label: str, owner: Any = None) -> None:
        if not isinstance(mapping, dict) or id(mapping) in self._ids:
            return
        self._ids.add(id(mapping))
        self.dicts.append(mapping)
        self.copies.append(dict(mapping))
        self.labels.append(label)
        self.owners.append(owner)

    def freeze(self) -> None:
        """Start watching: read every dict's version tag now (the dicts are held here, so
        their memory stays theirs and the addresses stay valid)."""
        try:
            import numpy
        except ImportError:
            return
        if not self.dicts or not _version_tags_work():
            return  # compare every dict with its copy instead
        addresses = numpy.array([id(d) + _VERSION_OFFSET for d in self.dicts], dtype=numpy.uint64)
        base = int(addresses.min())
        memory = numpy.asarray(_Memory(base, int(addresses.max() - base) // 8 + 1))
        offsets = ((addresses - base) // 8).astype(numpy.intp)
        self._read = lambda: memory[offsets]
        self._tags = self._read()

    @property
    def uses_tags(self) -> bool:
        return self._tags is not None

    def changed(self) -> list[int]:
        if self._tags is None:
            return [i for i, (d, copy) in enumerate(zip(self.dicts, self.copies)) if not _same(d, copy)]
        now = self._read()
        moved = (now != self._tags).nonzero()[0].tolist()
        self._tags = now
        return moved

    def findings(self) -> list[str]:
        found = []
        for index in self.changed():
            mapping, copy, label, owner = self.dicts[index], self.copies[index], self.labels[index], \
                self.owners[index]
            problems = []
            for key in copy.keys() - mapping.keys():
                problems.append(f"{key!s} deleted")
            for key, value in list(mapping.items()):
                if key not in copy:
                    if owner is not None and _benign_addition(owner, key, value):
                        copy[key] = value
                        continue
                    problems.append(f"{key!s} added")
                elif copy[key] is not value:
                    if (label, key) in _COUNTERS and type(value) is int:
                        copy[key] = value
                        continue
                    if copy[key] is None and isinstance(owner, str):
                        # A module's lazily made singleton (a compiled pattern, tempfile's name
                        # sequence, urllib's opener): put back, the module makes it again.
                        mapping[key] = None
                        continue
                    problems.append(f"{key!s} replaced")
            if problems:
                found.append(f"{label}: {', '.join(sorted(problems)[:5])}")
        return found


def _benign_addition(owner: Any, key: str, value: Any) -> bool:
    """A name added that changes nothing: on a package, a submodule imported later binds
    itself on its parent, and a lazy package (transformers) caches what its own submodule
    defines under that very name, and warnings keeps ``__warningregistry__`` in the
    module that warned; on a class, copyreg caches ``__slotnames__``, and a
    library that patched an inherited attribute and put it back (nnsight's
    ``Tensor.grad``) leaves the inherited value bound on the class itself."""
    if isinstance(owner, type):
        if key == "__slotnames__":
            return isinstance(value, list) and value == _slot_names(owner)
        inherited = next((vars(base)[key] for base in owner.__mro__[1:] if key in vars(base)), _ABSENT)
        return inherited is value
    if key == "__warningregistry__":  # warnings' bookkeeping of what it has shown
        return type(value) is dict
    module = owner
    if isinstance(value, types.ModuleType):
        return sys.modules.get(f"{module}.{key}") is value
    home = getattr(value, "__module__", None)
    return isinstance(home, str) and home.startswith(module + ".") and \
        getattr(sys.modules.get(home), key, None) is value


_ABSENT = object()


def _slot_names(cls: type) -> list[str]:
    """The names copyreg records as ``cls.__slotnames__``: every slot along the MRO
    but ``__dict__`` and ``__weakref__``, private ones mangled."""
    names = []
    for klass in cls.__mro__:
        slots = vars(klass).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{klass.__name__.lstrip('_')}{name}" if klass.__name__.lstrip("_") else name
            names.append(name)
    return names


def _same(mapping: dict, copy: dict) -> bool:
    """The same keys holding the same objects (identity, not ``==``, which an object of a
    request could answer as it likes), in one pass in C."""
    return len(mapping) == len(copy) and \
        not any(map(operator.is_not, map(mapping.get, copy, itertools.repeat(_ABSENT)), copy.values()))


def _directory_set(path: str) -> frozenset[str]:
    try:
        return frozenset(os.listdir(path))
    except OSError:
        return frozenset()


def _open_fds() -> dict[int, str]:
    """Open descriptors and what each points at (the listing's own, closed by the time
    it is read, drops out)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return found


class Baseline:
    """The worker as it was at the end of start-up: ``scrub()`` and ``check()`` after every
    request bring it back or say why it cannot be."""

    def __init__(self, model: Any, *, scratch: str | None, read_only: Any = None):
        self.scratch = scratch
        self._read_only = read_only  # runner.weights.ReadOnlyParameters: not fingerprinted
        self.torch = torch = sys.modules.get("torch")
        self._torch_modes = (torch.is_grad_enabled(), torch.get_default_dtype()) if torch is not None else None
        self.audit_events: list[str] = []
        self._sys_hooks = {name: getattr(sys, name) for name in _SYS_HOOKS}
        self._threading_hook = threading.excepthook
        self._import = builtins.__import__
        self._meta_path = list(sys.meta_path)
        self._path_hooks = list(sys.path_hooks)
        self._path = list(sys.path)
        self._linecache = dict(linecache.cache)
        self._signal_numbers = tuple(number for number in signal.valid_signals()
                                     if number not in (signal.SIGKILL, signal.SIGSTOP))
        self._signal_handlers = tuple(map(signal.getsignal, self._signal_numbers))
        self._gc_callbacks = list(gc.callbacks)
        self._environ = dict(os.environ)
        self._environ_bytes = dict(os.environ._data)  # what os.environ holds, encoded
        self._environ_parts = dict(vars(os.environ))  # its _data dict and its encoders, by identity
        self._faulthandler = faulthandler.is_enabled()
        self._warning_filters = list(warnings.filters)
        self._limits = (sys.getrecursionlimit(), sys.getswitchinterval(), sys.get_asyncgen_hooks(),
                        torch.get_num_threads() if torch is not None else None)
        self._registry = {kind: (handler, getattr(handler, "__code__", None))
                          for kind, handler in handlers._registry.items()}
        self._watched = _Watched()
        self._watched.add(copyreg.dispatch_table, "copyreg.dispatch_table")
        # ids of the classes and functions of start-up modules (held by the copies of
        # their namespaces, so the ids stay theirs): what the audit hook guards.
        self._guarded: set[int] = set()
        self._watch_namespaces()
        self._model = self._model_state(model)
        self._watched.freeze()
        self._fingerprints = self._fingerprint()
        self._tasks = _directory_set("/proc/self/task")
        self._fds = _open_fds()
        sys.addaudithook(self._audit)

    def _watch_namespaces(self) -> None:
        for name, module in list(sys.modules.items()):
            if not isinstance(module, types.ModuleType):
                continue
            self._watched.add(getattr(module, "__dict__", None), f"module {name}", owner=name)
            # type(), not isinstance(): a deprecated object warns when its __class__ is read.
            for attribute, value in list(vars(module).items()):
                if type(value) is types.FunctionType:
                    self._guarded.add(id(value))
                elif issubclass(type(value), type) and value.__module__ == name:
                    self._guarded.add(id(value))
                    namespace = _class_dict(value)
                    self._watched.add(namespace, f"class {name}.{attribute}", owner=value)
                    for member in (namespace or {}).values():
                        member = getattr(member, "__func__", member)
                        if isinstance(member, types.FunctionType):
                            self._guarded.add(id(member))

    # -- the model ----------------------------------------------------------------------
    def _model_state(self, model: Any) -> dict | None:
        torch = self.torch
        module = torch_module(model)
        if torch is None or not isinstance(module, torch.nn.Module):
            return None
        nn_module = sys.modules["torch.nn.modules.module"]
        for name, value in vars(nn_module).items():
            if name.startswith("_global_") and isinstance(value, dict):
                self._watched.add(value, f"torch's global module hooks {name}")
        for name, sub in module.named_modules(remove_duplicate=False):
            where = f"model module {name or '(root)'}"
            self._watched.add(sub.__dict__, where)
            for attribute in _MODULE_HOOK_DICTS:
                self._watched.add(getattr(sub, attribute, None), f"{where} {attribute}")
        config = getattr(module, "config", None)
        if config is not None:
            self._watched.add(getattr(config, "__dict__", None), "model config")
        self._watched.add(getattr(model, "__dict__", None), "model wrapper")
        tensors = [(f"parameter {name}", tensor) for name, tensor in module.named_parameters(remove_duplicate=False)]
        tensors += [(f"buffer {name}", tensor) for name, tensor in module.named_buffers(remove_duplicate=False)]
        if self._read_only is not None:  # memory the parameters left, still viewed by something else
            tensors += [(f"memory a parameter moved out of ({index})", tensor)
                        for index, tensor in enumerate(self._read_only.left_behind)]
        return {
            "module": module, "types": [(sub, type(sub)) for sub in module.modules()],
            "tensors": [(label, tensor, _tensor_facts(tensor)) for label, tensor in tensors],
            "parameters": [tensor for _, tensor in module.named_parameters(remove_duplicate=False)],
        }

    def _fingerprint(self) -> dict[int, bytes]:
        """SHA-256 of each storage ``_hashed_storages`` names. A storage on another device is
        copied to the host first: correct, but a CUDA model wants a device-side hash
        (docs/SECURITY.md)."""
        digests = {}
        for address, storage in self._hashed_storages().items():
            raw = self.torch.empty(0, dtype=self.torch.uint8, device=storage.device).set_(
                storage, 0, (storage.nbytes(),))
            digests[address] = hashlib.sha256(raw.cpu().numpy()).digest()
        return digests

    def _hashed_storages(self) -> dict[int, Any]:
        """The storages the model's tensors use that are not read-only memory, by address,
        each once (tied weights share one)."""
        storages: dict[int, Any] = {}
        for _, tensor, _ in self._model["tensors"] if self._model is not None else ():
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
            if address not in storages and not (self._read_only is not None and self._read_only.holds(address)):
                storages[address] = storage
        return storages

    def _model_findings(self) -> list[str]:
        state = self._model
        if state is None:
            return []
        found = [f"model module {type(sub).__name__} changed class (a parametrization?)"
                 for sub, cls in state["types"] if type(sub) is not cls]
        for label, tensor, facts in state["tensors"]:
            if _tensor_facts(tensor) != facts:
                found.append(f"{label}: its class, shape, strides, dtype, device, memory or requires_grad changed")
            if tensor._backward_hooks or getattr(tensor, "_post_accumulate_grad_hooks", None):
                found.append(f"{label}: a tensor hook is registered")
        if not found and self._fingerprint() != self._fingerprints:
            found.append("the model's weights differ from start-up (fingerprint)")
        return found

    # -- after every request ---------------------------------------------------------------
    def _audit(self, event: str, args: tuple) -> None:
        # Runs on every audited event in the process (thousands per import): cheap first.
        if event == "object.__setattr__" or event == "object.__delattr__":
            target = args[0]
            if id(target) in self._guarded and isinstance(target, (type, types.FunctionType)):
                self.audit_events.append(f"{event} on {target.__module__}.{getattr(target, '__qualname__', '?')}"
                                         f".{args[1]}")
        elif event == "sys.addaudithook":
            self.audit_events.append("a request tried to add an audit hook (refused)")
            raise RuntimeError("sourcebox: audit hooks cannot be added on a shared worker")

    def scrub(self) -> list[str]:
        """Put back what can be put back exactly; return what was."""
        done = []
        if sys.gettrace() is not None or sys.getprofile() is not None:
            done.append("trace/profile function")
            sys.settrace(None)
            sys.setprofile(None)
        if threading._trace_hook is not None or threading._profile_hook is not None:
            done.append("threading trace/profile hook")
            threading.settrace(None)
            threading.setprofile(None)
        for name, hook in self._sys_hooks.items():
            if getattr(sys, name) is not hook:
                done.append(f"sys.{name}")
                setattr(sys, name, hook)
        if threading.excepthook is not self._threading_hook:
            done.append("threading.excepthook")
            threading.excepthook = self._threading_hook
        handlers_now = tuple(map(signal.getsignal, self._signal_numbers))
        signals_changed = any(map(operator.is_not, handlers_now, self._signal_handlers))  # identity, in C
        if signals_changed:
            for number, handler, now in zip(self._signal_numbers, self._signal_handlers, handlers_now):
                if now is not handler:  # a handler would run inside the next request
                    done.append(f"signal handler {number}")
                    signal.signal(number, handler)
        # faulthandler's handlers are below Python's table (getsignal never sees them): put
        # back over a fault signal the request took, or after it turned faulthandler off.
        if self._faulthandler and (signals_changed or not faulthandler.is_enabled()):
            faulthandler.enable()
        for timer in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
            if signal.getitimer(timer) != (0.0, 0.0):
                done.append("interval timer")
                signal.setitimer(timer, 0)
        if gc.callbacks != self._gc_callbacks:
            done.append("gc.callbacks")
            gc.callbacks[:] = self._gc_callbacks
        if not _same(vars(os.environ), self._environ_parts):  # a stand-in _data could lie to the check below
            done.append("os.environ's parts")
            vars(os.environ).clear()
            vars(os.environ).update(self._environ_parts)
        if not _same(os.environ._data, self._environ_bytes):
            done.append("environment variables")
            for key in os.environ.keys() - self._environ.keys():
                del os.environ[key]
            os.environ.update(self._environ)
        if warnings.filters != self._warning_filters:
            done.append("warnings filters")
            warnings.filters[:] = self._warning_filters
            warnings._filters_mutated()
        recursion, switch, asyncgen, threads = self._limits
        if (sys.getrecursionlimit(), sys.getswitchinterval(), sys.get_asyncgen_hooks()) != \
                (recursion, switch, asyncgen):
            done.append("interpreter limits")
            sys.setrecursionlimit(recursion)
            sys.setswitchinterval(switch)
            sys.set_asyncgen_hooks(*asyncgen)
        random.seed()  # nobody predicts the next request's random numbers from a seed set in this one
        torch = self.torch
        if torch is not None:
            torch.default_generator.seed()
            if torch.cuda.is_initialized():
                torch.cuda.seed_all()
            if torch.get_num_threads() != threads:
                done.append("torch threads")
                torch.set_num_threads(threads)
            grad, dtype = self._torch_modes
            if torch.is_grad_enabled() is not grad:
                done.append("torch grad mode")
                torch.set_grad_enabled(grad)
            if torch.get_default_dtype() is not dtype:
                done.append("torch default dtype")
                torch.set_default_dtype(dtype)
        if self._model is not None:
            for parameter in self._model["parameters"]:
                if parameter.grad is not None:
                    parameter.grad = None
        if not _same(linecache.cache, self._linecache):
            linecache.cache.clear()
            linecache.cache.update(self._linecache)
        if self.scratch and _directory_set(self.scratch):
            done.append("scratch files")
            for name in os.listdir(self.scratch):
                path = os.path.join(self.scratch, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
        return done

    def after_request(self, keep_fds=()) -> str | None:
        """Scrub, then check: the reason to retire the worker, or ``None``."""
        if DISABLED:
            return None
        try:
            self.scrub()
            found = self.check(keep_fds)
        except Exception as exc:  # what a request left could not even be checked: not trusted
            found = [f"the worker could not check itself ({type(exc).__name__}: {exc})"]
        return "; ".join(found) if found else None

    def check(self, keep_fds=()) -> list[str]:
        """What differs from start-up and cannot be put back: any finding retires the
        worker. ``keep_fds``: descriptors the reply being sent holds."""
        found, self.audit_events = self.audit_events, []
        if builtins.__import__ is not self._import or sys.meta_path != self._meta_path \
                or sys.path_hooks != self._path_hooks or sys.path != self._path:
            found.append("the import system (builtins.__import__, sys.meta_path, sys.path_hooks or sys.path)")
        if handlers._registry.keys() != self._registry.keys() or any(
                handlers._registry[kind] is not handler or getattr(handler, "__code__", None) is not code
                for kind, (handler, code) in self._registry.items()):
            found.append("the handler registry")
        torch = self.torch
        if torch is not None and (torch.is_inference_mode_enabled() or torch._C._len_torch_function_stack()
                                  or torch._C._len_torch_dispatch_stack()):
            found.append("torch inference mode or a torch function/dispatch mode left on")
        found += self._watched.findings()
        found += self._model_findings()
        if _directory_set("/proc/self/task") != self._tasks:
            found.append("threads differ from start-up (a thread left running?)")
        fds = self._fds_now(keep_fds)
        if fds != self._fds:
            gc.collect()  # a file the request left in a reference cycle closes when collected
            fds = self._fds_now(keep_fds)
        if fds != self._fds:
            extra = sorted(set(fds.items()) - set(self._fds.items()))
            found.append(f"open file descriptors differ from start-up: {extra[:5]}")
        return found

    @staticmethod
    def _fds_now(keep_fds) -> dict[int, str]:
        fds = _open_fds()
        for fd in keep_fds:
            fds.pop(fd, None)
        return fds


def _tensor_facts(tensor: Any) -> tuple:
    """What makes a tensor read the bytes it read at start-up: its class (a subclass would run
    a request's ``__torch_function__`` in later forwards), where and how it views its storage
    (strides, offset, the negation and conjugation bits change what the same bytes mean).
    The class enters by ``id`` (it stays alive: the baseline holds the tensor's start-up
    class through torch), so a metaclass's ``__eq__`` cannot pass for it."""
    storage = tensor.untyped_storage()
    return (id(type(tensor)), tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.dtype,
            tensor.layout, tensor.device, tensor.data_ptr(), storage.data_ptr(), storage.nbytes(),
            tensor.requires_grad, tensor.is_neg(), tensor.is_conj())
