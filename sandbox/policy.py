"""Policies: what a destination (a server, or the local worker) provides.

A :class:`Policy` is modelled on a seccomp filter: an ordered list of
:class:`~sandbox.rules.Rule` objects and a default :class:`~sandbox.rules.Action`.
The first rule that matches decides; if none matches, the default does
(module patterns: :mod:`sandbox.rules`). A policy holds its rules, matches
against them and loads itself from a profile, a TOML file
(:mod:`sandbox.policy_file`) or an environment snapshot (:mod:`sandbox.snapshot`);
enforcing it on user code is the guard's part (:mod:`sandbox.guard`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import PolicyError
from .guard import Guard
from .policy_file import read_toml_policy
from .rules import Action, Decision, LogEntry, Rule
from .snapshot import read_snapshot

PROFILE_DIR = Path(__file__).with_name("profiles")


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
    # What capture asks of a destination: the guard answers, this policy decides.

    def guard(self, local_modules: Mapping[str, Any] | None = None) -> Guard:
        """The Python-layer enforcer for user code under this policy.

        ``local_modules`` maps names to modules that travel with the request
        (shipped user modules): user code may import those whatever the policy says.
        """
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
            return cls(**read_toml_policy(path, cls.load))
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
        return cls(**read_snapshot(snapshot))


def profiles() -> list[str]:
    """Names of the shipped profiles (``Policy.load(name)`` accepts each)."""
    return sorted(
        path.stem for path in PROFILE_DIR.iterdir() if path.suffix in (".toml", ".json")
    )
