"""Reading TOML policy files (schema: docs/SANDBOX.md, "Policy files").

    name = "my-lab"                # optional, default: the file name without .toml
    description = "..."            # optional
    default = "deny"               # allow | deny | log | kill (default: deny)
    extends = "ndif-env"           # optional: a profile name or a path relative to this file;
                                   # its rules come after this file's rules
    python_version = "3.12"        # optional: which stdlib "@stdlib" means

    [[rules]]
    action = "deny"
    modules = ["os"]               # a pattern or a list of them
    attributes = ["system"]        # optional
    submodules = true              # optional
    reason = "shown in refusals"   # optional
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import PolicyError
from .rules import Action, Rule

if TYPE_CHECKING:  # types only: the policy module reads files through this one
    from .policy import Policy

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

_TOP_KEYS = {"name", "description", "default", "extends", "python_version", "rules"}
_RULE_KEYS = {"action", "modules", "attributes", "submodules", "reason"}

# Files being loaded on this call chain, to report `extends` cycles clearly.
_loading: list[Path] = []


def read_toml_policy(path: Path, load_spec: Callable[[Any], Policy]) -> dict[str, Any]:
    """Parse and validate the TOML policy at ``path``: the arguments of ``Policy(...)``.
    ``load_spec`` loads the policy named by ``extends``."""
    if tomllib is None:
        raise PolicyError(
            f"reading the TOML policy {str(path)!r} needs Python 3.11+ or the 'tomli' package"
        )
    resolved = path.resolve()
    if resolved in _loading:
        chain = " -> ".join(str(p) for p in [*_loading, resolved])
        raise PolicyError(f"policy files extend each other in a cycle: {chain}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"policy file {str(path)!r} is not valid TOML: {error}") from None
    where = f"policy file {str(path)!r}"
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PolicyError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"the top level may hold {', '.join(sorted(_TOP_KEYS))}"
        )
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{where}: 'name' must be a non-empty string")
    python_version = data.get("python_version")
    if python_version is not None and not isinstance(python_version, str):
        raise PolicyError(f"{where}: 'python_version' must be a string such as \"3.12\"")

    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise PolicyError(f"{where}: 'rules' must be an array of tables ([[rules]] sections)")
    rules = [
        _parse_rule(raw, f"{path.name} rule {index}", where, python_version)
        for index, raw in enumerate(raw_rules)
    ]

    default = Action.parse(data["default"], f"{where} 'default'") if "default" in data else None
    description = data.get("description", "")
    if not isinstance(description, str):
        raise PolicyError(f"{where}: 'description' must be a string")

    if "extends" in data:
        base = _load_base(data["extends"], path, where, load_spec)
        rules.extend(base.rules)
        if default is None:
            default = base.default
        if not description:
            description = f"{base.name} with local changes"
    return {
        "name": name,
        "rules": rules,
        "default": default if default is not None else Action.DENY,
        "description": description,
        "source": str(path),
    }


def _parse_rule(raw: Any, origin: str, where: str, python_version: str | None) -> Rule:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: {origin} must be a table with action and modules")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise PolicyError(
            f"{where}: {origin} has unknown key(s) {', '.join(sorted(unknown))}; "
            f"a rule may hold {', '.join(sorted(_RULE_KEYS))}"
        )
    for key in ("action", "modules"):
        if key not in raw:
            raise PolicyError(f"{where}: {origin} is missing '{key}'")
    modules = raw["modules"]
    if not isinstance(modules, (str, list)):
        raise PolicyError(f"{where}: {origin}: 'modules' must be a string or a list of strings")
    attributes = raw.get("attributes", [])
    if not isinstance(attributes, (str, list)):
        raise PolicyError(f"{where}: {origin}: 'attributes' must be a string or a list of strings")
    submodules = raw.get("submodules", True)
    if not isinstance(submodules, bool):
        raise PolicyError(f"{where}: {origin}: 'submodules' must be true or false")
    reason = raw.get("reason", "")
    if not isinstance(reason, str):
        raise PolicyError(f"{where}: {origin}: 'reason' must be a string")
    return Rule.make(
        raw["action"],
        modules,
        attributes,
        submodules=submodules,
        reason=reason,
        origin=origin,
        python_version=python_version,
    )


def _load_base(extends: Any, path: Path, where: str, load_spec: Callable[[Any], Policy]) -> Policy:
    if not isinstance(extends, str) or not extends:
        raise PolicyError(f"{where}: 'extends' must be a profile name or a relative file path")
    spec: Any = extends
    if "/" in extends or extends.endswith((".toml", ".json")):
        spec = path.parent / extends
    _loading.append(path.resolve())
    try:
        return load_spec(spec)
    finally:
        _loading.pop()
