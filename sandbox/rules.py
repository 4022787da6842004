"""The vocabulary of policies: actions, rules, match decisions and access records.

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
import keyword
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import PolicyError
from .stdlib_modules import stdlib_modules

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
    """An access to a module or module attribute, the rule that judged it, and the first
    place it happened: what ``Policy.log`` holds (LOG rules) and what an audit reports."""

    module: str
    attribute: str | None
    rule: str
    where: str

    @property
    def label(self) -> str:
        return access_label(self.module, self.attribute)


def access_label(module: str, attribute: str | None) -> str:
    """``module.attribute``, or the module alone: how an access is named to the user."""
    return f"{module}.{attribute}" if attribute else module


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
