"""Exceptions raised by the sandbox.

A refusal has to fit the place it happens: an import that the policy refuses
is an ``ImportError`` (so ``try: import x / except ImportError`` keeps
working), a refused module attribute is an ``AttributeError`` (so ``hasattr``
and ``getattr(m, name, default)`` see the server's view: the attribute is not
there), a refused builtin call is a ``PermissionError``. Python's exception
layouts forbid one class deriving from two of these, so each kind has its own
class and all three share the :class:`Refusal` mixin carrying the details.
"""

from __future__ import annotations


class Refusal:
    """Mixin of every policy refusal: which module/attribute, which rule, which policy.

    ``except sandbox.Refusal`` catches all three kinds of refusal.
    """

    module: str
    attribute: str | None
    rule: str
    policy: str

    def _set_details(self, module: str, attribute: str | None, rule: str, policy: str) -> None:
        self.module = module
        self.attribute = attribute
        self.rule = rule
        self.policy = policy


class PolicyViolation(Refusal, ImportError):
    """An import (statement, ``__import__``, ``importlib``, ``sys.modules``) the policy refuses."""

    def __init__(self, message: str, *, module: str, attribute: str | None, rule: str, policy: str):
        ImportError.__init__(self, message, name=module)
        self._set_details(module, attribute, rule, policy)


class AttributeViolation(Refusal, AttributeError):
    """Access by user code to a module attribute the policy refuses (``os.system``)."""

    def __init__(self, message: str, *, module: str, attribute: str, rule: str, policy: str):
        AttributeError.__init__(self, message)
        self._set_details(module, attribute, rule, policy)


class BuiltinViolation(Refusal, PermissionError):
    """A call by user code to a builtin the policy refuses (``input``, ``breakpoint``)."""

    def __init__(self, message: str, *, attribute: str, rule: str, policy: str):
        PermissionError.__init__(self, message)
        self._set_details("builtins", attribute, rule, policy)


class PolicyKill(BaseException):
    """A KILL rule matched: the request must end now.

    Derived from ``BaseException`` so that ``except Exception`` in user code
    cannot swallow it; the worker catches it, ends the request and reports it.
    """

    def __init__(self, message: str, *, module: str, attribute: str | None, rule: str, policy: str):
        super().__init__(message)
        self.module = module
        self.attribute = attribute
        self.rule = rule
        self.policy = policy


class PolicyError(ValueError):
    """A policy specification (profile name, TOML file, snapshot) is malformed or unknown."""


class ConfinementUnavailable(RuntimeError):
    """``confine="required"`` was asked for but a layer cannot be applied here.

    ``layer`` names the missing layer, ``reason`` says why.
    """

    def __init__(self, layer: str, reason: str):
        super().__init__(
            f"confinement layer {layer!r} is unavailable: {reason}. The worker was asked for "
            f'confine="required" and refuses to run user code without it; run on a kernel that '
            f'supports it, or start the worker with confine="best-effort" to run with the layers '
            f"that are available (`python -m sandbox check` lists them)."
        )
        self.layer = layer
        self.reason = reason
