"""The README as a new user meets it: its first Python block and every command it names.

Each runs in a fresh process from a project directory of the user's own (outside the
repository), with sourcebox installed non-editable (the ``installed_sourcebox`` fixture),
never from the checkout. `make run`, `make test` and `make bench` rebuild a virtual
environment, so they are only checked to be Makefile targets.
"""

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")

MYMETHODS = '''\
"""My lab's helpers."""
import torch


def normalize(x, dim=-1, eps=1e-8):
    """x scaled to unit length along dim."""
    return x / (x.norm(dim=dim, keepdim=True) + eps)
'''

# What the tests below run, per `python -m` package; the README may name no other.
COMMANDS_RUN_HERE = {"capture": {"inspect"}, "sandbox": {"check", "diff", "audit"}, "runner": {"serve", "status", "stop"}}

# Runs the block from its own file, as written, then checks in the same process which copy
# of sourcebox ran it and what the block left behind.
_RUN_THE_BLOCK = """
import json, runpy, sys
site, example = sys.argv[1], sys.argv[2]
namespace = runpy.run_path(example, run_name="__main__")

import capture, runner, sandbox, torch
import mymethods
files = {module.__name__: module.__file__ for module in (capture, runner, sandbox, runner.models)}
for name, file in files.items():
    assert file.startswith(site + "/"), f"{name} ran from {file}, not from the installed copy in {site}"
ones = torch.ones(2, 3)
assert torch.equal(capture.loads(namespace["data"])(ones), mymethods.normalize(ones))
result = namespace["result"]
assert torch.allclose(result.norm(dim=-1), torch.ones(result.shape[:-1]), atol=1e-5), result
print("CHECKED " + json.dumps({"files": files, "result": list(result.shape)}))
"""


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert match is not None, "README.md has no ```python block"
    return match.group(1)


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's project: their own helper module, and nothing of sourcebox's."""
    (tmp_path / "mymethods.py").write_text(MYMETHODS)
    return tmp_path


def _succeeded(finished, *codes) -> str:
    assert finished.returncode in (codes or (0,)), f"exit {finished.returncode}\n{finished.stdout}\n{finished.stderr}"
    assert "Traceback" not in finished.stderr, finished.stderr
    return finished.stdout


def test_the_first_python_block_runs_as_written(installed_sourcebox, project):
    example = project / "readme_example.py"
    example.write_text(first_python_block(README))
    finished = installed_sourcebox.run(["-c", _RUN_THE_BLOCK, installed_sourcebox.site, example], cwd=project)
    output = _succeeded(finished)
    # The block prints worker.call(normalize, torch.ones(2, 3)): rows of 1/sqrt(3).
    assert "0.5774" in output
    checked = json.loads(output.split("CHECKED ", 1)[1])
    assert checked["result"][-1] == 64


def test_capture_inspect_describes_a_bundle(installed_sourcebox, project):
    _succeeded(installed_sourcebox.run(
        ["-c", "import capture, mymethods; open('normalize.bundle', 'wb').write(capture.dumps(mymethods.normalize))"],
        cwd=project))
    output = _succeeded(installed_sourcebox.run(["-m", "capture", "inspect", "normalize.bundle"], cwd=project))
    assert "sourcebox.bundle v" in output
    assert f"mymethods  ({project / 'mymethods.py'})" in output
    assert "def normalize(x, dim=-1, eps=1e-8):" in output


def test_sandbox_check_diff_and_audit(installed_sourcebox, project):
    # check exits 1 when this kernel lacks a layer; either way it reports every layer.
    check = _succeeded(installed_sourcebox.run(["-m", "sandbox", "check"], cwd=project), 0, 1)
    for layer in ("python", "rlimits", "capabilities", "no_new_privs", "landlock", "seccomp"):
        assert re.search(rf"^\s+{layer}\b", check, re.MULTILINE), check

    diff = _succeeded(installed_sourcebox.run(["-m", "sandbox", "diff", "ndif-allowlist", "nnsight-local"], cwd=project))
    assert diff.startswith("ndif-allowlist vs nnsight-local:")
    assert "provided by nnsight-local only" in diff

    (project / "analysis.py").write_text(
        "import functools\nimport torch\nfrom mymethods import normalize\n\n"
        "print(functools.reduce(max, normalize(torch.ones(2, 3)).flatten().tolist()))\n")
    # Exit 1: the profile refuses something the script touched.
    audit = _succeeded(installed_sourcebox.run(
        ["-m", "sandbox", "audit", "--profile", "ndif-allowlist", "analysis.py"], cwd=project), 1)
    assert "0.577" in audit  # the script ran
    assert re.search(r"^  functools +at .*analysis\.py:1$", audit, re.MULTILINE), audit
    assert "travels with the request as source (your project): mymethods" in audit


def test_runner_serve_status_stop(installed_sourcebox, project):
    # Not under tmp_path: a Unix socket's path must stay short.
    socket_directory = Path(tempfile.mkdtemp(prefix="sourcebox-readme-"))
    socket, log = socket_directory / "worker.sock", project / "serve.log"
    server = installed_sourcebox.start(["-m", "runner", "serve", "--socket", socket, "--policy", "ndif-allowlist"],
                                       cwd=project, log=log)
    try:
        status = _wait_until_ready(installed_sourcebox, project, socket, server, log)
        assert status["policy"] == "ndif-allowlist" and status["model"] == "tiny-gpt2"
        table = _succeeded(installed_sourcebox.run(["-m", "runner", "status", socket], cwd=project))
        assert re.search(r"^ +state: ready$", table, re.MULTILINE), table

        # A client of the user's connects to the served worker and calls their own function.
        call = _succeeded(installed_sourcebox.run(["-c", (
            "import sys, torch, runner\nfrom mymethods import normalize\n"
            "with runner.Worker(socket=sys.argv[1]) as worker:\n"
            "    print(worker.call(normalize, torch.ones(2, 3)))\n"), socket], cwd=project))
        assert "0.5774" in call

        stopped = _succeeded(installed_sourcebox.run(["-m", "runner", "stop", socket], cwd=project))
        assert stopped.strip() == f"stopped the worker server at {socket}"
        assert server.wait(timeout=120) == 0, log.read_text()
        assert not socket.exists()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(socket_directory, ignore_errors=True)


def _wait_until_ready(installed, project, socket, server, log, limit=300.0) -> dict:
    """The server's status once it reports ready; fails with its output if it exits first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode} before it was ready:\n{log.read_text()}")
        if socket.exists():
            status = json.loads(_succeeded(installed.run(["-m", "runner", "status", socket, "--json"], cwd=project)))
            if status["state"] == "ready":
                return status
        time.sleep(0.5)
    pytest.fail(f"the server at {socket} was not ready within {limit:.0f} s")


def test_every_command_the_readme_names_is_run_here():
    named = {}
    for package, commands in re.findall(r"python -m (\w+) ([a-z|]+)", README):
        named.setdefault(package, set()).update(commands.split("|"))
    assert named, "found no `python -m` command in README.md"
    for package, commands in named.items():
        missing = commands - COMMANDS_RUN_HERE.get(package, set())
        assert not missing, f"README.md names `python -m {package} {'|'.join(sorted(missing))}`, which no test here runs"

    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))
    made = set(re.findall(r"(?:^|`)make ([a-z][\w-]*)", README, re.MULTILINE))
    assert {"run", "test", "bench"} <= made
    assert made <= targets, f"README.md names make targets the Makefile lacks: {sorted(made - targets)}"
