"""Where two policies disagree, over a meaningful set of module names.

The universe compared: every module and attribute either policy names, this
Python's standard library, and the top-level modules installed in this
environment. (Comparing "all possible names" is meaningless; these are the
names code written here can actually import.)
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from dataclasses import dataclass

from .policy import Policy
from .rules import access_label


@dataclass(frozen=True)
class Disagreement:
    """One module (or module attribute) the two policies treat differently."""

    module: str
    attribute: str | None
    first: str
    second: str

    @property
    def label(self) -> str:
        return access_label(self.module, self.attribute)


@dataclass
class DiffReport:
    """Result of :func:`diff`: what only one side provides, and other differences."""

    first: str
    second: str
    compared: int
    only_first: list[Disagreement]
    only_second: list[Disagreement]
    other: list[Disagreement]

    @property
    def same(self) -> bool:
        return not (self.only_first or self.only_second or self.other)

    def __str__(self) -> str:
        stdlib = sys.stdlib_module_names
        lines = [
            f"{self.first} vs {self.second}: {self.compared} names compared "
            f"(named by either policy, this Python's stdlib, packages installed here)"
        ]
        if self.same:
            lines.append("  no disagreements")
        for title, entries in (
            (f"provided by {self.first} only", self.only_first),
            (f"provided by {self.second} only", self.only_second),
        ):
            lines.append(f"\n{title} ({len(entries)}):")
            if not entries:
                lines.append("  (none)")
            groups = {
                "stdlib": [e.label for e in entries if e.attribute is None and e.module.partition(".")[0] in stdlib],
                "packages": [e.label for e in entries if e.attribute is None and e.module.partition(".")[0] not in stdlib],
                "attributes": [e.label for e in entries if e.attribute is not None],
            }
            for group, labels in groups.items():
                if labels:
                    text = ", ".join(sorted(labels))
                    lines.append(
                        textwrap.fill(text, 96, initial_indent=f"  {group + ':':<12}", subsequent_indent=" " * 14)
                    )
        if self.other:
            lines.append(f"\nboth refuse or both provide, but with different actions ({len(self.other)}):")
            for entry in self.other:
                lines.append(f"  {entry.label}: {self.first} {entry.first}, {self.second} {entry.second}")
        return "\n".join(lines)


def _universe(first: Policy, second: Policy) -> tuple[set[str], set[tuple[str, str]]]:
    modules: set[str] = set(sys.stdlib_module_names)
    attributes: set[tuple[str, str]] = set()
    for policy in (first, second):
        for rule in policy.rules:
            names = rule.names | rule.parents
            if rule.attributes:
                for name in names:
                    loaded = sys.modules.get(name)
                    attributes.update(
                        (name, attribute)
                        for attribute in rule.attributes
                        # a name the loaded module lacks (posix.execl) is not a real difference
                        if loaded is None or hasattr(loaded, attribute)
                    )
            modules.update(names)
    for module in importlib.metadata.packages_distributions():
        if module.isidentifier():
            modules.add(module)
    return modules, attributes


def diff(first: "Policy | str", second: "Policy | str") -> DiffReport:
    """Compare two policies (objects, profile names or paths)."""
    first, second = Policy.load(first), Policy.load(second)
    modules, attributes = _universe(first, second)
    only_first: list[Disagreement] = []
    only_second: list[Disagreement] = []
    other: list[Disagreement] = []
    subjects = [(module, None) for module in sorted(modules)] + sorted(attributes)
    for module, attribute in subjects:
        a, b = first.decide(module, attribute).action, second.decide(module, attribute).action
        if a is b:
            continue
        if attribute is not None and not (first.decide(module).action.permits or second.decide(module).action.permits):
            continue  # neither provides the module: its attributes are moot
        entry = Disagreement(module, attribute, a.value, b.value)
        if a.permits and not b.permits:
            only_first.append(entry)
        elif b.permits and not a.permits:
            only_second.append(entry)
        else:
            other.append(entry)
    return DiffReport(first.name, second.name, len(subjects), only_first, only_second, other)

