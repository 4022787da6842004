"""Policies: what a destination (a server, or the local worker) provides.

A :class:`Policy` is modelled on a seccomp filter: an ordered list of
:class:`Rule` objects and a default :class:`Action`. The first rule that
matches decides; if none matches, the default does.

Module patterns (see docs/SANDBOX.md, "Rules"):

* ``"torch"``: the module ``torch`` and everything beneath it (``torch.nn``,
  ``torch.nn.functional``) but not ``torchvision``. This is the prefix
  matching NDIF's allowlist used, made dot-aware.
* ``"torch.*"``: only the modules beneath ``torch``, not ``torch`` itself.
* ``submodules = false`` on a rule: only the named modules themselves.
* ``"*"``: every module. ``"@stdlib"``: every standard-library module of the
  policy's Python version (each with its submodules).

A rule with ``attributes`` applies only when user code reads those attributes
of a matching module (``os.system``), or imports them (``from os import
system``); a rule without attributes applies to the module and all its
attributes. The language builtins (``len``, ``open``) are governed only by
attribute rules on the module ``builtins``: a policy that does not mention
``builtins`` leaves them all usable.
"""

from __future__ import annotations

import enum
import json
import keyword
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .errors import PolicyError
from .stdlib_modules import stdlib_modules

if TYPE_CHECKING:
    from .guard import Guard

PROFILE_DIR = Path(__file__).with_name("profiles")
STDLIB_TOKEN = "@stdlib"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# The worker has no terminal: its standard input is not a person, and a debugger
# prompt would hang the request. Every shipped profile carries these rules.
TERMINAL_RULE_REASON = (
    "the worker has no terminal; pass values in the request and inspect results "
    "on the client instead"
)


class Action(enum.Enum):
    """What happens when a rule (or the default) matches."""

    ALLOW = "allow"
    DENY = "deny"
    LOG = "log"
    KILL = "kill"

    @property
    def permits(self) -> bool:
        """True for the actions under which the access goes ahead (ALLOW, LOG)."""
        return self in (Action.ALLOW, Action.LOG)

    @classmethod
    def parse(cls, text: Any, where: str) -> "Action":
        if isinstance(text, Action):
            return text
        try:
            return cls(str(text).lower())
        except ValueError:
            choices = ", ".join(repr(action.value) for action in cls)
            raise PolicyError(f"{where}: action {text!r} is not one of {choices}") from None


def _check_module_name(name: str, where: str) -> None:
    parts = name.split(".")
    if not all(_IDENTIFIER.match(part) and not keyword.iskeyword(part) for part in parts):
        raise PolicyError(
            f"{where}: {name!r} is not a module name (dotted Python identifiers such as "
            f"'torch' or 'nnsight.intervention.envoy')"
        )


@dataclass(frozen=True)
class Rule:
    """One ordered rule: an action for some modules, optionally only some attributes.

    Build rules with :meth:`Rule.make`, which validates and expands patterns.
    """

    action: Action
    patterns: tuple[str, ...]
    attributes: tuple[str, ...] = ()
    submodules: bool = True
    reason: str = ""
    origin: str = ""
    # Expanded forms used for matching (filled by make()).
    names: frozenset[str] = field(default=frozenset(), repr=False)
    parents: frozenset[str] = field(default=frozenset(), repr=False)
    everything: bool = field(default=False, repr=False)
    stdlib_version: str = field(default="", repr=False)

    @classmethod
    def make(
        cls,
        action: Action | str,
        modules: str | Iterable[str],
        attributes: str | Iterable[str] = (),
        *,
        submodules: bool = True,
        reason: str = "",
        origin: str = "",
        python_version: str | None = None,
    ) -> "Rule":
        """Validate and build a rule.

        ``modules``: patterns (``"torch"``, ``"torch.*"``, ``"*"``, ``"@stdlib"``).
        ``attributes``: attribute names the rule is limited to (empty: all).
        ``python_version``: which stdlib ``"@stdlib"`` stands for (default: this Python).
        """
        where = origin or "rule"
        action = Action.parse(action, where)
        patterns = (modules,) if isinstance(modules, str) else tuple(modules)
        if not patterns:
            raise PolicyError(f"{where}: a rule needs at least one module pattern")
        attributes = (attributes,) if isinstance(attributes, str) else tuple(attributes)
        for attribute in attributes:
            if not isinstance(attribute, str) or not _IDENTIFIER.match(attribute):
                raise PolicyError(f"{where}: attribute {attribute!r} is not a Python identifier")
        names: set[str] = set()
        parents: set[str] = set()
        everything = False
        stdlib_version = ""
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise PolicyError(f"{where}: module pattern {pattern!r} is not a string")
            if pattern == "*":
                everything = True
            elif pattern == STDLIB_TOKEN:
                try:
                    stdlib, stdlib_version = stdlib_modules(python_version)
                except ValueError as error:
                    raise PolicyError(f"{where}: {error}") from None
                names.update(stdlib)
            elif pattern.endswith(".*"):
                _check_module_name(pattern[:-2], where)
                parents.add(pattern[:-2])
            else:
                _check_module_name(pattern, where)
                names.add(pattern)
        return cls(
            action=action,
            patterns=patterns,
            attributes=attributes,
            submodules=submodules,
            reason=reason,
            origin=origin,
            names=frozenset(names),
            parents=frozenset(parents),
            everything=everything,
            stdlib_version=stdlib_version,
        )

    def matches_module(self, module: str) -> bool:
        """Does this rule's module part match ``module``?"""
        if self.everything:
            return True
        if module in self.names:
            return True
        prefix = module
        while "." in prefix:
            prefix = prefix.rpartition(".")[0]
            if prefix in self.parents or (self.submodules and prefix in self.names):
                return True
        return False

    def leads_below(self, module: str) -> bool:
        """Does this rule name some module strictly beneath ``module``?"""
        if self.everything:
            return True
        if module in self.parents:
            return True
        below = module + "."
        return any(name.startswith(below) for name in self.names | self.parents)

    def describe(self) -> str:
        """A short human description: ``deny os (attributes: system)``."""
        shown = []
        for pattern in self.patterns:
            if pattern == STDLIB_TOKEN:
                shown.append(f"{STDLIB_TOKEN} (Python {self.stdlib_version})")
            else:
                shown.append(pattern)
        if len(shown) > 8:
            shown = shown[:8] + [f"... {len(shown) - 8} more"]
        text = f"{self.action.value} {', '.join(shown)}"
        if not self.submodules:
            text += " (exact modules only)"
        if self.attributes:
            text += f" (attributes: {', '.join(self.attributes)})"
        return text


@dataclass(frozen=True)
class Decision:
    """The outcome of matching one module (and attribute) against a policy."""

    action: Action
    rule: Rule | None
    rule_index: int | None

    def describe(self, policy_name: str) -> str:
        if self.rule is None:
            return f"the default action of policy {policy_name!r} ({self.action.value}; no rule matches)"
        where = f" ({self.rule.origin})" if self.rule.origin else ""
        reason = f": {self.rule.reason}" if self.rule.reason else ""
        return f"rule {self.rule_index} of policy {policy_name!r}, {self.rule.describe()}{where}{reason}"


@dataclass(frozen=True)
class LogEntry:
    """An access that a LOG rule let through, with the first place it happened."""

    module: str
    attribute: str | None
    rule: str
    where: str


class Policy:
    """What a destination provides, as ordered rules plus a default action.

    The destination protocol used by ``capture``: :attr:`name`,
    :meth:`provides`, :meth:`resolve`, :meth:`builtins`.
    """

    def __init__(
        self,
        name: str,
        rules: Iterable[Rule] = (),
        default: Action | str = Action.DENY,
        *,
        description: str = "",
        source: str = "",
    ):
        if not isinstance(name, str) or not name.strip():
            raise PolicyError(f"a policy needs a non-empty name, got {name!r}")
        self.name = name
        self.rules: tuple[Rule, ...] = tuple(rules)
        for index, rule in enumerate(self.rules):
            if not isinstance(rule, Rule):
                raise PolicyError(
                    f"policy {name!r}: rule {index} is {type(rule).__name__}, not sandbox.Rule "
                    f"(build rules with sandbox.Rule.make)"
                )
        self.default = Action.parse(default, f"policy {name!r} default")
        self.description = description
        self.source = source
        self._decisions: dict[tuple[str, str | None], Decision] = {}
        self._leads: dict[str, bool] = {}
        self._log: dict[tuple[str, str | None], LogEntry] = {}
        self._lock = threading.Lock()
        self._guard: Guard | None = None

    def __repr__(self) -> str:
        return f"<sandbox.Policy {self.name!r}: {len(self.rules)} rules, default {self.default.value}>"

    # ----------------------------------------------------------------- matching

    def decide(self, module: str, attribute: str | None = None) -> Decision:
        """Match ``module`` (and ``attribute``, if given) against the rules."""
        key = (module, attribute)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._match(module, attribute)
            self._decisions[key] = decision
        return decision

    def _match(self, module: str, attribute: str | None) -> Decision:
        for index, rule in enumerate(self.rules):
            if rule.attributes:
                if attribute is None or attribute not in rule.attributes:
                    continue
            if rule.matches_module(module):
                return Decision(rule.action, rule, index)
        return Decision(self.default, None, None)

    def attribute_rule(self, module: str, attribute: str) -> Decision | None:
        """The first rule naming ``attribute`` of ``module`` explicitly, if any."""
        for index, rule in enumerate(self.rules):
            if rule.attributes and attribute in rule.attributes and rule.matches_module(module):
                return Decision(rule.action, rule, index)
        return None

    def leads_to_permitted(self, module: str) -> bool:
        """Is some module strictly beneath ``module`` named by a permitting rule?

        User code importing ``nnsight.intervention.envoy`` gets the package
        ``nnsight`` bound in its namespace; it may walk through it only towards
        such modules.
        """
        cached = self._leads.get(module)
        if cached is None:
            cached = any(
                rule.action.permits and not rule.attributes and rule.leads_below(module)
                for rule in self.rules
            ) or (self.default.permits)
            self._leads[module] = cached
        return cached

    def provides(self, module_name: str) -> bool:
        """Does the destination provide ``module_name``? (capture: reference vs. source)"""
        return self.decide(module_name).action.permits

    # ------------------------------------------------------------------ logging

    def record(self, module: str, attribute: str | None, decision: Decision, where: str) -> None:
        """Remember an access a LOG rule let through (first occurrence kept)."""
        key = (module, attribute)
        if key not in self._log:
            with self._lock:
                self._log.setdefault(
                    key, LogEntry(module, attribute, decision.describe(self.name), where)
                )

    @property
    def log(self) -> list[LogEntry]:
        """Accesses let through by LOG rules, in first-seen order."""
        return list(self._log.values())

    # ------------------------------------------------------- destination protocol

    def guard(self, local_modules: Mapping[str, Any] | None = None) -> "Guard":
        """The Python-layer enforcer for user code under this policy.

        ``local_modules`` maps names to modules that travel with the request
        (shipped user modules): user code may import those whatever the policy says.
        """
        from .guard import Guard

        if local_modules:
            return Guard(self, local_modules)
        if self._guard is None:
            self._guard = Guard(self)
        return self._guard

    def builtins(self, local_modules: Mapping[str, Any] | None = None) -> dict:
        """A fresh ``__builtins__`` mapping for namespaces of shipped user code.

        Its ``__import__`` enforces the policy and hands out module facades;
        builtins named by attribute rules on ``builtins`` are replaced (DENY:
        a stub raising :class:`~sandbox.BuiltinViolation`; LOG: a recording
        wrapper; KILL: a stub raising :class:`~sandbox.PolicyKill`).
        """
        return self.guard(local_modules).builtins()

    def resolve(self, module_name: str, qualname: str = "") -> Any:
        """Import ``module_name`` under the policy and walk ``qualname`` (``"Tensor.add"``).

        Raises ``ImportError`` (:class:`~sandbox.PolicyViolation` when the
        policy refuses) with a message naming the module, rule and policy.
        Modules come back as the same facades user code gets from ``import``.
        """
        return self.guard().resolve(module_name, qualname)

    # ------------------------------------------------------------ construction

    @classmethod
    def load(cls, spec: "str | os.PathLike[str] | Policy") -> "Policy":
        """Load a shipped profile by name, or a TOML policy / JSON snapshot by path."""
        if isinstance(spec, Policy):
            return spec
        if not isinstance(spec, (str, os.PathLike)):
            raise PolicyError(
                f"a policy spec is a profile name or a file path, got {type(spec).__name__}"
            )
        text = os.fspath(spec)
        looks_like_path = os.sep in text or text.endswith((".toml", ".json"))
        if not looks_like_path:
            for suffix in (".toml", ".json"):
                candidate = PROFILE_DIR / f"{text}{suffix}"
                if candidate.is_file():
                    return cls._load_file(candidate)
            raise PolicyError(
                f"no shipped profile named {text!r}; shipped profiles: {', '.join(profiles())}. "
                f"To use your own policy pass the path of a .toml policy file or a .json "
                f"environment snapshot (docs/SANDBOX.md describes both)."
            )
        path = Path(text)
        if not path.is_file():
            raise PolicyError(f"policy file {text!r} does not exist (or is not a file)")
        return cls._load_file(path)

    @classmethod
    def _load_file(cls, path: Path) -> "Policy":
        if path.suffix == ".json":
            return cls.from_environment(path)
        if path.suffix == ".toml":
            from .policy_file import load_toml_policy

            return load_toml_policy(path, cls.load)
        raise PolicyError(
            f"policy file {str(path)!r} is neither .toml (a policy) nor .json (an environment snapshot)"
        )

    @classmethod
    def from_environment(cls, snapshot: "Mapping[str, Any] | str | os.PathLike[str]") -> "Policy":
        """A policy allowing the stdlib of a Python version plus installed packages.

        ``snapshot``: a mapping, or the path of a JSON file, with
        ``python_version`` (``"3.12"``) and ``packages`` (import names such as
        ``"torch"``, ``"PIL"``, ``"google.protobuf"``); optional ``name`` and
        ``description``. Everything else is denied.
        """
        source = ""
        if isinstance(snapshot, (str, os.PathLike)):
            path = Path(snapshot)
            source = str(path)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise PolicyError(f"environment snapshot {source!r} does not exist") from None
            except json.JSONDecodeError as error:
                raise PolicyError(f"environment snapshot {source!r} is not valid JSON: {error}") from None
            default_name = path.stem
        elif isinstance(snapshot, Mapping):
            data = snapshot
            default_name = "environment"
        else:
            raise PolicyError(
                f"an environment snapshot is a mapping or a JSON file path, got {type(snapshot).__name__}"
            )
        where = f"environment snapshot {source!r}" if source else "environment snapshot"
        if not isinstance(data, Mapping):
            raise PolicyError(f"{where}: the top level must be an object with python_version and packages")
        missing = [key for key in ("python_version", "packages") if key not in data]
        if missing:
            raise PolicyError(
                f"{where}: missing {', '.join(missing)}; expected "
                f'{{"python_version": "3.12", "packages": ["torch", "numpy", ...]}}'
            )
        packages = data["packages"]
        if not isinstance(packages, (list, tuple)) or not all(isinstance(p, str) for p in packages):
            raise PolicyError(f"{where}: 'packages' must be a list of import names (strings)")
        packages = sorted(set(packages))
        name = data.get("name") or default_name
        origin = f"{Path(source).name}" if source else "snapshot"
        version = str(data["python_version"])
        rules = [
            *terminal_rules(origin="sandbox built-in"),
            Rule.make(
                Action.ALLOW,
                STDLIB_TOKEN,
                reason=f"the standard library of Python {version}",
                origin=origin,
                python_version=version,
            ),
        ]
        if packages:
            rules.append(
                Rule.make(
                    Action.ALLOW,
                    packages,
                    reason="installed in the snapshot's environment",
                    origin=origin,
                )
            )
        description = data.get("description") or (
            f"the environment of a Python {version} install with {len(packages)} importable packages"
        )
        return cls(name, rules, Action.DENY, description=description, source=source)


def terminal_rules(origin: str) -> list[Rule]:
    """Rules refusing ``input`` and ``breakpoint``: the worker has no terminal."""
    return [
        Rule.make(
            Action.DENY,
            "builtins",
            ("input", "breakpoint"),
            reason=TERMINAL_RULE_REASON,
            origin=origin,
        )
    ]


def profiles() -> list[str]:
    """Names of the shipped profiles (``Policy.load(name)`` accepts each)."""
    return sorted(
        path.stem for path in PROFILE_DIR.iterdir() if path.suffix in (".toml", ".json")
    )
