"""Environment snapshots: ``{python_version, packages}`` as a server publishes them.

Two sources:

* :func:`environment_snapshot` describes the running interpreter (what a
  server operator runs on the server to publish its environment); import names
  come from the installed distributions' own file lists, so they are exact.
* :func:`snapshot_from_pip_report` describes an install that is not on this
  machine, from ``pip install --dry-run --report`` output. A report names
  distributions, not import names, so each distribution is mapped by (1) this
  environment's own install of it when present, else (2) a table of known
  distributions whose import names differ from their names, else (3) the
  normalised distribution name. The snapshot records which way each was mapped.
"""

from __future__ import annotations

import datetime as _datetime
import importlib.metadata
import json
import re
import sys
from pathlib import Path
from typing import Any

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
        if distribution in installed:
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
