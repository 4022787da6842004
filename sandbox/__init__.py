"""sourcebox's sandbox: what the destination provides, and confinement of the worker.

* :class:`Policy` (ordered rules + default action, seccomp style) is the single
  source of truth for "what the server has". ``capture`` consults it (the
  destination protocol: ``name``, ``provides``, ``resolve``, ``builtins``);
  the worker enforces it on user code (:mod:`sandbox.guard`).
* :func:`enter` confines the worker process once, before user code runs: the
  Python layer plus the OS layers (rlimits, capabilities, no-new-privs,
  Landlock, seccomp). ``python -m sandbox check`` says which layers this
  kernel supports.
* :func:`diff` and :func:`audit` make the differences between destinations
  visible (also ``python -m sandbox diff`` / ``audit``).

docs/SANDBOX.md is the user guide; docs/SECURITY.md the threat model.
"""

from .audit import AuditReport, audit, audit_script
from .confine import LAYERS, OS_LAYERS, LayerStatus, Report, enter, entered
from .diff import DiffReport, diff
from .errors import (
    AttributeViolation,
    BuiltinViolation,
    ConfinementUnavailable,
    PolicyError,
    PolicyKill,
    PolicyViolation,
    Refusal,
)
from .guard import ModuleFacade
from .policy import Policy, profiles
from .rules import Action, Decision, LogEntry, Rule

__all__ = [
    "Action",
    "AttributeViolation",
    "AuditReport",
    "BuiltinViolation",
    "ConfinementUnavailable",
    "Decision",
    "DiffReport",
    "LAYERS",
    "LayerStatus",
    "LogEntry",
    "ModuleFacade",
    "OS_LAYERS",
    "Policy",
    "PolicyError",
    "PolicyKill",
    "PolicyViolation",
    "Refusal",
    "Report",
    "Rule",
    "audit",
    "audit_script",
    "diff",
    "enter",
    "entered",
    "profiles",
]
