"""Audit mode: what does code touch that a server profile would refuse?

A library author runs their code here, in their own environment, under a
LOG-everything policy; the audit lists each module and module attribute the
code touched that the chosen server profile refuses, with the first place it
happened. "The code" is project code: modules whose files lie outside the
interpreter's install and site-packages (they would travel with a request as
source), plus code executed without a file (``exec``). Libraries installed in
the environment keep importing freely, as on the worker.

    with sandbox.audit("ndif-allowlist") as report:
        my_library.run_demo()
    print(report)

or ``python -m sandbox audit --profile ndif-allowlist path/to/script.py``.
The audit sees imports executed while it is active: run it in a fresh process
(the CLI does) so that your modules' top-level imports are seen too.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import runpy
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from .guard import Guard, caller_site
from .paths import interpreter_roots, is_under
from .policy import Policy
from .rules import Action, LogEntry

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class AuditReport:
    """Filled in when the audit ends: refusals, project modules, counts."""

    profile: str
    #: What the server profile refuses, with the rule that refuses it.
    findings: list[LogEntry] = field(default_factory=list)
    travels: list[str] = field(default_factory=list)
    touched: int = 0
    error: str = ""

    @property
    def clean(self) -> bool:
        """True when the server profile refuses nothing the code touched."""
        return not self.findings

    def __str__(self) -> str:
        lines = [
            f"audit against {self.profile!r}: {len(self.findings)} refusal(s) among "
            f"{self.touched} modules/attributes touched by the audited code"
        ]
        width = max((len(f.label) for f in self.findings), default=0)
        for finding in self.findings:
            lines.append(f"  {finding.label:<{width}}  at {finding.where}")
            lines.append(f"  {'':<{width}}  refused by {finding.rule}")
        if self.travels:
            lines.append(f"travels with the request as source (your project): {', '.join(self.travels)}")
        if self.error:
            lines.append("the audited code raised (the audit covers what ran before that):")
            lines.append(self.error.rstrip())
        return "\n".join(lines)


class _Auditor:
    def __init__(self, server: Policy):
        self.server = server
        self.policy = Policy("audit", default=Action.LOG, description="log everything (audit)")
        self.guard = Guard(self.policy)
        self.roots = [*interpreter_roots(), _PACKAGE_DIR]
        self._project_files: dict[str, bool] = {}
        self.builtin_findings: dict[str, LogEntry] = {}

    def is_project(self, namespace: Any) -> bool:
        if not isinstance(namespace, Mapping):
            return False
        file = namespace.get("__file__")
        if not isinstance(file, str):
            spec = namespace.get("__spec__")
            return getattr(spec, "origin", None) not in ("built-in", "frozen")
        cached = self._project_files.get(file)
        if cached is None:
            cached = not is_under(file, self.roots) if os.path.isabs(file) else not file.startswith("<frozen")
            self._project_files[file] = cached
        return cached

    def import_hook(self, name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if self.is_project(globals):
            return self.guard.import_(name, globals, locals, fromlist, level)
        return _REAL_IMPORT(name, globals, locals, fromlist, level)

    def watch_builtin(self, name: str, original: Any) -> Any:
        decision = self.server.attribute_rule("builtins", name)

        def watched(*args: Any, **kwargs: Any) -> Any:
            if self.is_project(sys._getframe(1).f_globals) and name not in self.builtin_findings:
                self.builtin_findings[name] = LogEntry("builtins", name, decision.describe(self.server.name), caller_site())
            return original(*args, **kwargs)

        watched.__name__ = watched.__qualname__ = name
        return watched

    def fill(self, report: AuditReport) -> None:
        travels = set()
        entries = self.policy.log
        for entry in entries:
            module = sys.modules.get(entry.module)
            if module is not None and self.is_project(vars(module)):
                travels.add(entry.module.partition(".")[0])
                continue
            if entry.attribute is not None and not self.server.provides(entry.module):
                continue  # the module itself is reported; its attributes would be noise
            decision = self.server.decide(entry.module, entry.attribute)
            if not decision.action.permits:
                report.findings.append(
                    LogEntry(entry.module, entry.attribute, decision.describe(self.server.name), entry.where)
                )
        report.findings.extend(self.builtin_findings.values())
        report.travels = sorted(travels)
        report.touched = len(entries) + len(self.builtin_findings)


_REAL_IMPORT = builtins.__import__


@contextlib.contextmanager
def audit(server_profile: "Policy | str") -> Iterator[AuditReport]:
    """Audit the code run inside the ``with`` block against ``server_profile``.

    Yields an :class:`AuditReport` that is filled in when the block ends.
    Not thread-safe: it swaps ``builtins.__import__`` for the block's duration.
    """
    server = Policy.load(server_profile)
    auditor = _Auditor(server)
    report = AuditReport(server.name)
    watched = {
        name: getattr(builtins, name)
        for name in vars(builtins)
        if not name.startswith("_")
        and (decision := server.attribute_rule("builtins", name)) is not None
        and not decision.action.permits
    }
    builtins.__import__ = auditor.import_hook
    for name, original in watched.items():
        setattr(builtins, name, auditor.watch_builtin(name, original))
    try:
        yield report
    finally:
        builtins.__import__ = _REAL_IMPORT
        for name, original in watched.items():
            setattr(builtins, name, original)
        auditor.fill(report)


def audit_script(path: str | os.PathLike[str], server_profile: "Policy | str", argv: tuple[str, ...] = ()) -> AuditReport:
    """Run the script at ``path`` as ``__main__`` under :func:`audit`; never raises for its errors."""
    script = os.path.abspath(os.fspath(path))
    if not os.path.isfile(script):
        raise FileNotFoundError(f"audit target {os.fspath(path)!r} is not a file")
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(script))
    try:
        with audit(server_profile) as report:
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as exit_:
                if exit_.code not in (None, 0):
                    report.error = f"SystemExit({exit_.code!r})"
            except Exception:
                report.error = traceback.format_exc()
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return report
