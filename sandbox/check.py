"""``python -m sandbox check``: which layers can be active on this kernel?

Each layer is applied for real in a throwaway child process (``enter`` with
``confine="best-effort"``), and the child then tests the effects: a file
outside its scratch directory cannot be read or written, a process cannot be
started, a TCP socket cannot be created. The parent also reports which layers
are active in its own process (normally none: the CLI is not a worker).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .confine import LAYERS, Report, format_detail

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


@dataclass
class CheckResult:
    """The child's report, the effects it observed, and this process's own state."""

    report: Report
    effects: dict[str, str]
    this_process: dict[str, str]

    @property
    def all_available(self) -> bool:
        return self.report.confined and all(value.startswith("blocked") for value in self.effects.values())

    def __str__(self) -> str:
        lines = ["layer          here (probe child)  detail"]
        for name in LAYERS:
            status = self.report.layers.get(name)
            if status is None:
                continue
            state = "can be active" if status.active else status.status
            lines.append(f"  {name:<13}{state:<20}{format_detail(status.detail, 35)}")
        lines.append("\neffects observed in the confined probe child:")
        for name, outcome in self.effects.items():
            lines.append(f"  {name:<34}{outcome}")
        lines.append("\nthis process (the one running check):")
        for name, value in self.this_process.items():
            lines.append(f"  {name:<34}{value}")
        verdict = (
            "all layers can be active on this kernel"
            if self.all_available
            else "some layers are unavailable: confine='required' would refuse to start"
        )
        lines.append(f"\n{verdict}")
        return "\n".join(lines)


def _status_fields() -> dict[str, str]:
    fields = {}
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("NoNewPrivs", "Seccomp", "CapEff"):
                fields[key] = value.strip()
    return fields


def check(timeout: float = 60.0) -> CheckResult:
    """Probe the layers in a child process and report (see the module doc)."""
    with tempfile.TemporaryDirectory(prefix="sandbox-check-") as workdir:
        scratch = Path(workdir, "scratch")
        outside = Path(workdir, "outside")
        outside.mkdir()
        secret = outside / "secret.txt"
        secret.write_text("not for the sandbox")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _PACKAGE_PARENT}
        completed = subprocess.run(
            [sys.executable, "-c", "from sandbox.check import _probe_child; _probe_child()", str(scratch), str(secret)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=workdir,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"the probe child failed (exit {completed.returncode}):\n{completed.stderr.strip()}"
            )
        result = json.loads(completed.stdout)
    this = _status_fields()
    return CheckResult(
        Report.from_dict(result["report"]),
        result["effects"],
        {
            "no_new_privs": "set" if this.get("NoNewPrivs") == "1" else "not set",
            "seccomp": {"0": "no filter", "1": "strict", "2": "filter loaded"}.get(this.get("Seccomp", "0"), "?"),
            "effective capabilities": this.get("CapEff", "?"),
        },
    )


def _attempt(action) -> str:
    try:
        action()
    except OSError as error:
        return f"blocked ({type(error).__name__}: {error.strerror or error})"
    return "NOT blocked"


def _probe_child() -> None:
    """Runs in the child: enter best-effort, then test effects; JSON to stdout."""
    from .confine import enter
    from .policy import Policy
    from .rules import Action

    scratch, secret = sys.argv[1], sys.argv[2]
    report = enter(Policy("probe", default=Action.ALLOW), scratch=scratch, confine="best-effort")

    def spawn() -> None:
        pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
        os.waitpid(pid, 0)

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    effects = {
        "read a file outside scratch": _attempt(lambda: Path(secret).read_text()),
        "write a file outside scratch": _attempt(lambda: Path(secret).with_name("written").write_text("x")),
        "start a program (posix_spawn)": _attempt(spawn),
        "fork": _attempt(fork),
        "create a TCP socket": _attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
    }
    Path(scratch, "ok").write_text("scratch is writable")
    print(json.dumps({"report": report.as_dict(), "effects": effects}))

