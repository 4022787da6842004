"""The Python layer for user code: guarded imports, module facades, curated builtins.

User code (source shipped in a request, compiled with ``policy.builtins()`` as
its ``__builtins__``) never holds a real module. Every import it makes goes
through :meth:`Guard.import_`, which checks the policy and hands back a
:class:`ModuleFacade`; every attribute read on a facade is checked again, so
``from os import system``, ``os.system``, ``torch.os`` (the module ``os``
reached through ``torch``), ``importlib.import_module("socket")`` and
``sys.modules["socket"]`` all obey the same rules. Libraries keep the real
import system: torch importing its own internals is never checked.

This is the contract and its clear errors, not a security boundary: Python
offers many back doors (``torch.save.__globals__``, ``object.__subclasses__()``,
frame walking) to the real modules. The OS layer (:mod:`sandbox.confine`)
is what stops their effects. docs/SECURITY.md lists the back doors.
"""

from __future__ import annotations

import builtins as _builtins_module
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterator

from .errors import AttributeViolation, BuiltinViolation, PolicyKill, PolicyViolation
from .rules import Action, Decision

if TYPE_CHECKING:  # types only: a policy makes its guard, a guard asks its policy
    from .policy import Policy

_real_import = _builtins_module.__import__

# Identification attributes passed through unchecked: tracebacks, inspect and
# the import system read them, and they give no access to the module's contents.
_IDENTITY = frozenset(
    {"__name__", "__doc__", "__file__", "__spec__", "__loader__", "__package__", "__path__", "__class__"}
)

_WHAT_TO_DO_IMPORT = (
    "What to do: use a module the policy provides (`python -m sandbox show {policy}` "
    "lists its rules), ship the code you need with the request (your own functions "
    "and classes travel as source), or run against a policy that provides it."
)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def caller_site() -> str:
    """``file:line`` of the nearest caller outside this package (the user's code)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class ModuleFacade(types.ModuleType):
    """What user code holds instead of a module: attribute access goes through the policy."""

    def __init__(self, guard: "Guard", module: types.ModuleType, transit: bool):
        super().__init__(module.__name__)
        object.__getattribute__(self, "__dict__")["__sandbox_target__"] = (guard, module, transit)

    def __getattribute__(self, name: str) -> Any:
        guard, module, transit = object.__getattribute__(self, "__dict__")["__sandbox_target__"]
        return guard.read_attribute(module, name, transit)

    def __setattr__(self, name: str, value: Any) -> None:
        guard, module, _ = object.__getattribute__(self, "__dict__")["__sandbox_target__"]
        raise guard.write_refused(module, name)

    def __delattr__(self, name: str) -> None:
        guard, module, _ = object.__getattribute__(self, "__dict__")["__sandbox_target__"]
        raise guard.write_refused(module, name)

    def __dir__(self) -> list[str]:
        guard, module, transit = object.__getattribute__(self, "__dict__")["__sandbox_target__"]
        return sorted(guard.visible_names(module, transit))

    def __repr__(self) -> str:
        _, module, transit = object.__getattribute__(self, "__dict__")["__sandbox_target__"]
        return f"<module {module.__name__!r} (sandboxed{', path only' if transit else ''})>"


class ModulesView(Mapping):
    """``sys.modules`` as user code sees it: only modules the policy provides, as facades.

    Lookups of a refused module raise :class:`~sandbox.PolicyViolation`;
    ``in`` and ``.get()`` treat it as absent. The view is read-only.
    """

    def __init__(self, guard: "Guard"):
        self._guard = guard

    def __getitem__(self, name: str) -> Any:
        module = sys.modules[name]
        if module is None:
            return None
        return self._guard.module_for_user(name, module, how=f"sys.modules[{name!r}]")

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except (KeyError, PolicyViolation):
            return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in sys.modules and self._guard.visible_module(name)

    def __iter__(self) -> Iterator[str]:
        return (name for name in list(sys.modules) if self._guard.visible_module(name))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"<sys.modules as seen under policy {self._guard.policy.name!r}: {len(self)} modules>"


class Guard:
    """Enforces one policy for user code: imports, module attributes, builtins."""

    def __init__(self, policy: Policy, local_modules: Mapping[str, Any] | None = None):
        self.policy = policy
        self.local_modules = dict(local_modules or {})
        self._facades: dict[tuple[int, bool], tuple[types.ModuleType, ModuleFacade]] = {}
        self._plain: set[tuple[str, str]] = set()
        self.modules_view = ModulesView(self)
        self._builtins_template = self._curated_builtins()
        self._overrides: dict[tuple[str, str], Any] = {
            ("builtins", "__import__"): self.import_,
            ("importlib", "__import__"): self.import_,
            ("importlib", "import_module"): self.import_module,
            ("sys", "modules"): self.modules_view,
        }
        for name, value in self._builtins_template.items():
            self._overrides[("builtins", name)] = value

    # ------------------------------------------------------------------ builtins

    def builtins(self) -> dict:
        """A fresh curated ``__builtins__`` dict (user code may mutate its own copy)."""
        return dict(self._builtins_template)

    def _curated_builtins(self) -> dict:
        template = dict(vars(_builtins_module))
        template["__import__"] = self.import_
        for name, original in list(template.items()):
            if name.startswith("__"):
                continue
            decision = self.policy.attribute_rule("builtins", name)
            if decision is None or decision.action is Action.ALLOW:
                continue
            template[name] = self._replace_builtin(name, original, decision)
        return template

    def _replace_builtin(self, name: str, original: Any, decision: Decision) -> Any:
        policy = self.policy
        if decision.action is Action.LOG:

            def logged(*args: Any, **kwargs: Any) -> Any:
                policy.record("builtins", name, decision, caller_site())
                return original(*args, **kwargs)

            logged.__name__ = logged.__qualname__ = name
            logged.__doc__ = getattr(original, "__doc__", None)
            return logged

        def refused(*args: Any, **kwargs: Any) -> Any:
            message = f"{name}() is refused by {decision.describe(policy.name)}."
            if decision.action is Action.KILL:
                raise PolicyKill(
                    f"request ended: {message}",
                    module="builtins",
                    attribute=name,
                    rule=decision.describe(policy.name),
                    policy=policy.name,
                )
            raise BuiltinViolation(
                f"{message} What to do: do without it in code that runs on the worker, or run "
                f"against a policy that allows it.",
                attribute=name,
                rule=decision.describe(policy.name),
                policy=policy.name,
            )

        refused.__name__ = refused.__qualname__ = name
        refused.__doc__ = f"{name} is refused by policy {policy.name!r}."
        return refused

    # -------------------------------------------------------------------- imports

    def import_(self, name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        """The ``__import__`` of user code: the policy decides, facades come back."""
        if not isinstance(name, str):
            raise TypeError(f"module name must be str, not {type(name).__name__}")
        absolute = self._absolute_name(name, globals, level) if level else name
        fromlist = tuple(fromlist or ())
        local = self._local(absolute)
        if local is not None:
            return local if fromlist else self._local_top(absolute)
        decision = self.policy.decide(absolute)
        transit = False
        if not decision.action.permits:
            # `from nnsight.intervention import envoy` passes through a refused
            # package towards a permitted module: allowed, as a path only.
            transit = bool(fromlist) and decision.action is Action.DENY and self.policy.leads_to_permitted(absolute)
            if not transit:
                how = f"from {absolute} import {', '.join(fromlist)}" if fromlist else f"import {absolute}"
                self._refuse_import(absolute, decision, how=how)
        elif decision.action is Action.LOG:
            self.policy.record(absolute, None, decision, caller_site())
        module = self._real_import(absolute, fromlist)
        if not fromlist:
            top = absolute.partition(".")[0]
            return self.module_for_user(top, sys.modules[top], how=f"import {absolute}")
        for item in fromlist:
            if item != "*":
                self._check_from_item(module, item)
        return self._facade(module, transit)

    def import_module(self, name: str, package: str | None = None) -> Any:
        """``importlib.import_module`` for user code: same rules, returns a facade."""
        if name.startswith("."):
            if not package:
                raise TypeError(
                    f"the 'package' argument is required to perform a relative import for {name!r}"
                )
            absolute = importlib.util.resolve_name(name, package)
        else:
            absolute = name
        local = self._local(absolute)
        if local is not None:
            return local
        decision = self.policy.decide(absolute)
        if not decision.action.permits:
            self._refuse_import(absolute, decision, how=f"importlib.import_module({absolute!r})")
        if decision.action is Action.LOG:
            self.policy.record(absolute, None, decision, caller_site())
        module = self._real_import(absolute, ("__name__",))
        return self._facade(module, False)

    def resolve(self, module_name: str, qualname: str) -> Any:
        """Import ``module_name`` under the policy and walk ``qualname`` (for capture)."""
        obj = self.import_module(module_name)
        for part in qualname.split(".") if qualname else ():
            try:
                obj = getattr(obj, part)
            except AttributeViolation as error:
                raise PolicyViolation(
                    f"cannot resolve {module_name}:{qualname}: {error}",
                    module=module_name,
                    attribute=error.attribute,
                    rule=error.rule,
                    policy=error.policy,
                ) from None
            except AttributeError:
                raise ImportError(
                    f"cannot resolve {module_name}:{qualname} on this worker: {module_name!r} has "
                    f"no attribute path {qualname!r} here. The worker's installed version of "
                    f"{module_name.partition('.')[0]!r} probably differs from the client's; "
                    f"align the versions or ship the object by value.",
                    name=module_name,
                ) from None
        return obj

    def _real_import(self, absolute: str, fromlist: tuple) -> types.ModuleType:
        try:
            module = _real_import(absolute, None, None, fromlist, 0)
        except ModuleNotFoundError as error:
            add_note = getattr(error, "add_note", None)  # Python 3.11+
            if add_note and error.name and (error.name == absolute or absolute.startswith(error.name + ".")):
                add_note(
                    f"policy {self.policy.name!r} provides {absolute!r}, but it is not installed "
                    f"in this worker's environment."
                )
            raise
        return module if fromlist else sys.modules[absolute]

    def _absolute_name(self, name: str, globals: Any, level: int) -> str:
        package = None
        if isinstance(globals, Mapping):
            package = globals.get("__package__")
            if package is None:
                spec = globals.get("__spec__")
                if spec is not None:
                    package = spec.parent
                elif "__name__" in globals:
                    module_name = globals["__name__"]
                    package = module_name if "__path__" in globals else module_name.rpartition(".")[0]
        if not package:
            raise ImportError(
                f"attempted relative import of {'.' * level}{name} with no known parent package; "
                f"shipped code is not part of a package on the worker, so write the import "
                f"with its absolute name"
            )
        return importlib.util.resolve_name("." * level + name, package)

    def _local(self, name: str) -> Any:
        return self.local_modules.get(name)

    def _local_top(self, name: str) -> Any:
        """The top package ``import a.b.c`` binds, for a shipped ``a.b.c``.

        Parents that were not shipped get plain placeholder modules, so that
        ``a.b.c`` resolves as user code expects.
        """
        parts = name.split(".")
        child = self.local_modules[name]
        for depth in range(len(parts) - 1, 0, -1):
            parent_name = ".".join(parts[:depth])
            parent = self.local_modules.get(parent_name)
            if parent is None:
                parent = types.ModuleType(parent_name)
                self.local_modules[parent_name] = parent
            setattr(parent, parts[depth], child)
            child = parent
        return child

    def _check_from_item(self, module: types.ModuleType, item: str) -> None:
        owner = module.__name__
        if not self.policy.decide(owner).action.permits:
            value = getattr(module, item, None)
            if isinstance(value, types.ModuleType) and self.visible_module(value.__name__):
                return
            self._refuse_import(
                f"{owner}.{item}",
                self.policy.decide(owner),
                how=f"from {owner} import {item}",
            )
        decision = self.policy.decide(owner, item)
        if not decision.action.permits:
            self._refuse_import(owner, decision, how=f"from {owner} import {item}", attribute=item)
        value = getattr(module, item, None)
        if isinstance(value, types.ModuleType) and not isinstance(value, ModuleFacade):
            real = value.__name__
            inner = self.policy.decide(real)
            if not inner.action.permits and not self.policy.leads_to_permitted(real):
                self._refuse_import(real, inner, how=f"from {owner} import {item} (the module {real})")

    def _refuse_import(self, module: str, decision: Decision, *, how: str, attribute: str | None = None) -> None:
        rule = decision.describe(self.policy.name)
        self._end_request_if_kill(decision, f"`{how}`", module, attribute, rule)
        target = f"{module}.{attribute}" if attribute else module
        raise PolicyViolation(
            f"`{how}` refused: {target!r} is refused by {rule}. "
            + _WHAT_TO_DO_IMPORT.format(policy=self.policy.name),
            module=module,
            attribute=attribute,
            rule=rule,
            policy=self.policy.name,
        )

    # ------------------------------------------------------------------- facades

    def visible_module(self, name: str) -> bool:
        """Would user code get ``name`` (fully, or as a path to permitted modules)?"""
        if name in self.local_modules:
            return True
        return self.policy.decide(name).action.permits or self.policy.leads_to_permitted(name)

    def module_for_user(self, name: str, module: Any, *, how: str, attribute_of: str | None = None) -> Any:
        """The facade user code gets for ``module``, or a refusal.

        ``attribute_of``: the owner module when user code reached ``module`` as
        an attribute (``torch.os``); the refusal is then an AttributeViolation.
        """
        if isinstance(module, ModuleFacade) or not isinstance(module, types.ModuleType):
            return module
        local = self._local(name)
        if local is not None:
            return local
        real = module.__name__
        decision = self.policy.decide(real)
        if decision.action.permits:
            if decision.action is Action.LOG:
                self.policy.record(real, None, decision, caller_site())
            return self._facade(module, False)
        if decision.action is Action.DENY and self.policy.leads_to_permitted(real):
            return self._facade(module, True)
        if attribute_of is None or decision.action is Action.KILL:
            self._refuse_import(real, decision, how=how)
        rule = decision.describe(self.policy.name)
        raise AttributeViolation(
            f"{how} refused: it is the module {real!r}, which is refused by {rule}. "
            + _WHAT_TO_DO_IMPORT.format(policy=self.policy.name),
            module=attribute_of,
            attribute=how.rpartition(".")[2],
            rule=rule,
            policy=self.policy.name,
        )

    def _facade(self, module: types.ModuleType, transit: bool) -> Any:
        if isinstance(module, ModuleFacade):
            return module
        key = (id(module), transit)
        entry = self._facades.get(key)
        if entry is None or entry[0] is not module:
            entry = (module, ModuleFacade(self, module, transit))
            self._facades[key] = entry
        return entry[1]

    def read_attribute(self, module: types.ModuleType, name: str, transit: bool) -> Any:
        """A facade's attribute read: check the policy, wrap modules, apply overrides."""
        # Fast path: attributes already found plainly allowed (no LOG, no
        # override, not special); user code reads torch.* in loops.
        if (module.__name__, name) in self._plain and not transit:
            value = getattr(module, name)
            if not isinstance(value, types.ModuleType):
                return value
        if name in _IDENTITY:
            return getattr(module, name)
        owner = module.__name__
        if name == "__dict__":
            return {key: self.read_attribute(module, key, transit) for key in self.visible_names(module, transit)}
        if name == "__builtins__":
            return self.builtins()
        if transit:
            value = getattr(module, name)
            if isinstance(value, types.ModuleType) and self.visible_module(value.__name__):
                return self.module_for_user(value.__name__, value, how=f"{owner}.{name}", attribute_of=owner)
            raise self._transit_violation(
                owner, name, f"{owner}.{name} refused: policy {self.policy.name!r} does not provide "
                f"{owner!r}; it only lets user code pass through {owner!r} to the modules beneath it "
                f"that the policy provides.")
        decision = self.policy.decide(owner, name)
        if not decision.action.permits:
            self._refuse_attribute(owner, name, decision)
        if decision.action is Action.LOG:
            self.policy.record(owner, name, decision, caller_site())
        override = self._overrides.get((owner, name))
        if override is not None:
            return override
        value = getattr(module, name)
        if decision.action is Action.ALLOW and name != "__all__":
            self._plain.add((owner, name))
        if name == "__all__" and isinstance(value, (list, tuple)):
            return [item for item in value if self._attribute_visible(module, item)]
        if isinstance(value, types.ModuleType):
            return self.module_for_user(value.__name__, value, how=f"{owner}.{name}", attribute_of=owner)
        return value

    def _end_request_if_kill(self, decision: Decision, what: str, module: str, attribute: str | None,
                             rule: str) -> None:
        if decision.action is Action.KILL:
            raise PolicyKill(f"request ended: {what} matched a KILL rule: {rule}.", module=module,
                             attribute=attribute, rule=rule, policy=self.policy.name)

    def _refuse_attribute(self, owner: str, name: str, decision: Decision) -> None:
        rule = decision.describe(self.policy.name)
        self._end_request_if_kill(decision, f"{owner}.{name}", owner, name, rule)
        raise AttributeViolation(
            f"{owner}.{name} is refused by {rule}. What to do: do without it in code that runs "
            f"on the worker, or run against a policy that provides it.",
            module=owner,
            attribute=name,
            rule=rule,
            policy=self.policy.name,
        )

    def write_refused(self, module: types.ModuleType, name: str) -> AttributeViolation:
        """Why setting or deleting an attribute through a facade is refused: a provided module
        is shared by every request a long-lived worker runs, so a change would reach the
        next tenant (``torch.softmax = spy``)."""
        owner = module.__name__
        return AttributeViolation(
            f"cannot set or delete {owner}.{name} ({caller_site()}): modules the policy provides are "
            f"shared by every request on the worker, so user code may not change them. What to do: keep "
            f"your replacement in your own module and call it from your code, or pass it where it is used.",
            module=owner, attribute=name, rule="provided modules are read-only", policy=self.policy.name)

    def _transit_violation(self, owner: str, name: str, message: str) -> AttributeViolation:
        """Refusal for a module user code only passes through on the way to an allowed one."""
        return AttributeViolation(message, module=owner, attribute=name,
                                  rule=self.policy.decide(owner).describe(self.policy.name), policy=self.policy.name)

    def _attribute_visible(self, module: types.ModuleType, name: str) -> bool:
        if not isinstance(name, str):
            return False
        if not self.policy.decide(module.__name__, name).action.permits:
            return False
        value = getattr(module, name, None)
        if isinstance(value, types.ModuleType) and not isinstance(value, ModuleFacade):
            return self.visible_module(value.__name__)
        return True

    def visible_names(self, module: types.ModuleType, transit: bool) -> list[str]:
        """Attribute names of ``module`` that user code may read."""
        names = []
        for name, value in list(vars(module).items()):
            if transit:
                if isinstance(value, types.ModuleType) and self.visible_module(value.__name__):
                    names.append(name)
            elif self._attribute_visible(module, name):
                names.append(name)
        return names
