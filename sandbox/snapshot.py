"""Environment snapshots: ``{python_version, packages}`` as a server publishes them.

Two sources:

* :func:`environment_snapshot` describes the running interpreter (what a
  server operator runs on the server to publish its environment); import names
  come from the installed distributions' own file lists, so they are exact.
* :func:`snapshot_from_pip_report` describes an install that is not on this
  machine, from ``pip install --dry-run --report`` output. A report names
  distributions, not import names, so each distribution is mapped by (1) this
  environment's own install of it when present (unless the install shows only
  a namespace the table names subpackages of), else (2) a table of known
  distributions whose import names differ from their names, else (3) the
  normalised distribution name. The snapshot records which way each was mapped.

:func:`read_snapshot` reads one back as a policy's rules (``Policy.from_environment``).
"""

from __future__ import annotations

import datetime as _datetime
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import PolicyError
from .rules import STDLIB_TOKEN, Action, Rule, terminal_rules

# Distributions whose import names are not their normalised names (or that
# install no importable module: an empty list), from the projects' own layouts. Namespace packages are listed by
# the subpackage the distribution owns, so a policy does not grant the whole
# namespace (`google.protobuf`, not `google`).
KNOWN_IMPORT_NAMES: dict[str, list[str]] = {
    "attrs": ["attr", "attrs"],
    "beautifulsoup4": ["bs4"],
    "cffi": ["cffi", "_cffi_backend"],
    "cuda-bindings": ["cuda.bindings"],
    "cuda-pathfinder": ["cuda.pathfinder"],
    "cuda-toolkit": [],
    "google-api-core": ["google.api_core"],
    "google-auth": ["google.auth", "google.oauth2"],
    "googleapis-common-protos": [
        "google.api", "google.cloud", "google.logging", "google.longrunning", "google.rpc", "google.type",
    ],
    "grpcio": ["grpc"],
    "markdown-it-py": ["markdown_it"],
    "multiprocess": ["multiprocess", "_multiprocess"],
    "opencensus-context": ["opencensus.common.runtime_context"],
    "opentelemetry-api": ["opentelemetry"],
    "opentelemetry-exporter-prometheus": ["opentelemetry.exporter.prometheus"],
    "opentelemetry-proto": ["opentelemetry.proto"],
    "opentelemetry-sdk": ["opentelemetry.sdk"],
    "opentelemetry-semantic-conventions": ["opentelemetry.semconv"],
    "pillow": ["PIL"],
    "proto-plus": ["proto"],
    "protobuf": ["google.protobuf"],
    "py-spy": [],
    "python-dateutil": ["dateutil"],
    "python-dotenv": ["dotenv"],
    "pyyaml": ["yaml", "_yaml"],
    "rpds-py": ["rpds"],
    "setuptools": ["setuptools", "pkg_resources", "_distutils_hack"],
    "sympy": ["sympy", "isympy"],
    "torch": ["torch", "torchgen", "functorch"],
    "websocket-client": ["websocket"],
}


def normalise(distribution: str) -> str:
    """PEP 503 normalised distribution name (``Foo_Bar.baz`` -> ``foo-bar-baz``)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _installed_import_names() -> dict[str, list[str]]:
    """normalised distribution name -> import names, for this environment."""
    by_distribution: dict[str, set[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        if not module.isidentifier():
            continue
        for distribution in distributions:
            by_distribution.setdefault(normalise(distribution), set()).add(module)
    return {name: sorted(modules) for name, modules in by_distribution.items()}


def environment_snapshot(name: str | None = None) -> dict[str, Any]:
    """A snapshot of the running interpreter's environment (exact import names)."""
    mapping = _installed_import_names()
    packages = sorted({module for modules in mapping.values() for module in modules})
    return {
        "name": name or "environment",
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        "packages": packages,
        "generated_by": {
            "method": "installed distributions of the running interpreter",
            "interpreter": sys.executable,
            "date": _datetime.date.today().isoformat(),
        },
    }


def _finer(known: list[str] | None, installed: list[str]) -> bool:
    """Whether the table names subpackages of what the install shows (protobuf installs
    into the shared ``google`` namespace; granting ``google`` would grant every owner's)."""
    return bool(known) and set(known) != set(installed) and all(
        any(name.startswith(top + ".") for top in installed) for name in known
    )


def snapshot_from_pip_report(
    report_path: str | Path, *, python_version: str, name: str, command: str
) -> dict[str, Any]:
    """A snapshot from ``pip install --dry-run --report`` JSON (see the module doc)."""
    report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    installed = _installed_import_names()
    distributions: dict[str, dict[str, Any]] = {}
    for item in report.get("install", []):
        metadata = item["metadata"]
        distribution = normalise(metadata["name"])
        if distribution in installed and not _finer(KNOWN_IMPORT_NAMES.get(distribution), installed[distribution]):
            modules, source = installed[distribution], "installed here"
        elif distribution in KNOWN_IMPORT_NAMES:
            modules, source = KNOWN_IMPORT_NAMES[distribution], "known-names table"
        elif distribution.startswith("nvidia-"):
            modules, source = ["nvidia"], "nvidia-* wheels share the nvidia namespace"
        else:
            modules, source = [distribution.replace("-", "_")], "normalised name"
        distributions[distribution] = {
            "version": metadata["version"],
            "import_names": sorted(set(modules)),
            "mapped_by": source,
        }
    packages = sorted({module for entry in distributions.values() for module in entry["import_names"]})
    return {
        "name": name,
        "python_version": python_version,
        "packages": packages,
        "generated_by": {
            "method": "pip dry-run resolve (pip install --dry-run --report), distributions mapped to import names",
            "command": command,
            "pip_version": report.get("pip_version"),
            "date": _datetime.date.today().isoformat(),
        },
        "distributions": dict(sorted(distributions.items())),
    }


def read_snapshot(snapshot: "Mapping[str, Any] | str | os.PathLike[str]") -> dict[str, Any]:
    """The arguments of ``Policy(...)`` for an environment snapshot (a mapping or the
    path of a JSON file): the stdlib of its Python version plus its packages, the rest
    denied. Raises :class:`~sandbox.PolicyError` naming what is wrong with it."""
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
    return {"name": name, "rules": rules, "default": Action.DENY, "description": description, "source": source}
