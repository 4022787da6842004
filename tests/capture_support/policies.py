"""A destination for the tests, implementing the duck-typed protocol capture consults
(``name``, ``provides``, ``resolve``, ``builtins``) and recording what capture asked."""
import builtins
import importlib
import sys


class StdlibDestination:
    """Has the stdlib except ``missing`` top-level modules, plus ``extra`` ones; its
    ``__import__`` refuses what it lacks, as a server's would."""

    def __init__(self, name="test-destination", *, missing=(), extra=()):
        self.name = name
        self.missing = set(missing)
        self.extra = set(extra)
        self.provides_asked = []
        self.resolved = []

    def _has(self, module_name):
        top = module_name.partition(".")[0]
        if top in self.missing:
            return False
        return top in self.extra or top in sys.stdlib_module_names or top == "builtins"

    def provides(self, module_name):
        self.provides_asked.append(module_name)
        return self._has(module_name)

    def resolve(self, module_name, qualname):
        self.resolved.append((module_name, qualname))
        if not self._has(module_name):
            raise ImportError(f"{self.name} does not provide module {module_name!r}")
        obj = importlib.import_module(module_name)
        for part in qualname.split(".") if qualname else ():
            obj = getattr(obj, part)
        return obj

    def builtins(self):
        namespace = dict(vars(builtins))

        def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0 and not self._has(name):
                raise ImportError(f"{self.name} does not provide module {name!r}")
            return builtins.__import__(name, globals, locals, fromlist, level)

        namespace["__import__"] = guarded_import
        return namespace
