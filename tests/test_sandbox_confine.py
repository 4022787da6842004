"""sandbox.enter in real child processes, judged by effect.

Each test starts a fresh Python process that does what the worker does (import
what it needs, then ``sandbox.enter``), tries things, and prints a JSON line;
the test side also checks what happened outside the child (files, listeners).
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import textwrap
from pathlib import Path


import sandbox

REPO = Path(__file__).resolve().parents[1]


def run_child(tmp_path: Path, source: str, *, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``source`` in a fresh interpreter; :func:`finish` collects the JSON it prints last."""
    script = tmp_path / f"child_{len(list(tmp_path.glob('child_*.py')))}.py"
    script.write_text(textwrap.dedent(source))
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=cwd or tmp_path,
    )
    return process


def finish(process: subprocess.Popen, timeout: float = 120) -> dict:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"child failed ({process.returncode}):\n{stderr[-4000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


def test_python_layer_scrubs_imports_and_environment(tmp_path):
    client = tmp_path / "client_project"
    client.mkdir()
    (client / "client_mod.py").write_text("VALUE = 1\n")
    editable_src = tmp_path / "editable_src" / "demo_editable"
    editable_src.mkdir(parents=True)
    (editable_src / "__init__.py").write_text("VALUE = 2\n")
    scratch = tmp_path / "scratch"
    finder_source = textwrap.dedent(
        f"""
        import importlib.abc, importlib.util
        class EditableFinder(importlib.abc.MetaPathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name == "demo_editable":
                    return importlib.util.spec_from_file_location(name, {str(editable_src / "__init__.py")!r})
        """
    )
    child = run_child(
        tmp_path,
        f"""
        import importlib.abc, importlib.util, json, os, sys, tempfile, types

        # What setuptools' editable installs put in place: a finder module named
        # __editable___*_finder on sys.meta_path, mapping a package to a source tree.
        finder_module = types.ModuleType("__editable___demo_0_1_finder")
        exec({finder_source!r}, finder_module.__dict__)
        sys.modules[finder_module.__name__] = finder_module
        sys.meta_path.append(finder_module.EditableFinder)

        import torch
        import sandbox
        before = {{
            "client": importlib.util.find_spec("client_mod") is not None,
            "editable": importlib.util.find_spec("demo_editable") is not None,
        }}
        report = sandbox.enter("default", scratch={str(scratch)!r}, confine="required")
        policy = sandbox.Policy.load("default")

        def user(source):
            namespace = {{"__builtins__": policy.builtins(), "__name__": "request"}}
            try:
                exec(compile(source, "<user>", "exec"), namespace)
            except ImportError as error:
                return "ImportError: " + str(error)
            return namespace.get("result")

        print(json.dumps({{
            "before": before,
            "after": {{
                "client": importlib.util.find_spec("client_mod") is not None,
                "editable": importlib.util.find_spec("demo_editable") is not None,
            }},
            "sys_path": sys.path,
            "cwd": os.getcwd(),
            "tempdir": tempfile.gettempdir(),
            "environ": dict(os.environ),
            "proc_environ_has_secret": b"hunter2" in open("/proc/self/environ", "rb").read(),
            "socket": user("import socket"),
            "client_mod": user("import client_mod"),
            "matmul": user("import torch\\nresult = (torch.ones(2, 2) @ torch.ones(2, 2)).sum().item()"),
            "nn": user("import torch.nn.functional as F\\nimport torch\\nresult = F.relu(torch.tensor([-1.0, 1.0])).tolist()"),
            "report": str(report),
        }}))
        """,
        env={"SOURCEBOX_TEST_TOKEN": "hunter2", "PYTHONPATH": f"{REPO}:{client}"},
        cwd=client,
    )
    result = finish(child)
    assert result["before"] == {"client": True, "editable": True}
    assert result["after"] == {"client": False, "editable": False}
    roots = [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)]
    assert result["sys_path"] and all(any(os.path.realpath(p).startswith(r) for r in roots) for p in result["sys_path"])
    assert result["cwd"] == str(scratch) and result["tempdir"] == str(scratch)
    assert "SOURCEBOX_TEST_TOKEN" not in result["environ"] and "PYTHONPATH" not in result["environ"]
    assert result["environ"]["HOME"] == str(scratch)
    assert result["proc_environ_has_secret"] is False
    assert "'socket' is refused by rule" in result["socket"] and "the worker has no network" in result["socket"]
    assert "policy 'default'" in result["client_mod"] and "What to do" in result["client_mod"]
    assert result["matmul"] == 8.0 and result["nn"] == [0.0, 1.0]
    assert "WARNING" not in result["report"]


def test_os_layers_block_by_effect_and_keep_the_worker_working(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("client secret")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"ok": true}')
    scratch = tmp_path / "scratch"
    tcp = socket.create_server(("127.0.0.1", 0))
    tcp.setblocking(False)
    transport_path = str(tmp_path / "transport.sock")
    transport_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    transport_listener.bind(transport_path)
    transport_listener.listen(1)

    child = run_child(
        tmp_path,
        f"""
        import json, mmap, os, socket, threading, _posixshmem
        import torch
        import sandbox

        transport = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        transport.connect({transport_path!r})  # the worker's own transport, connected before enter()
        report = sandbox.enter("default", scratch={str(scratch)!r}, read_paths=[{str(model_dir)!r}], confine="required")

        def attempt(action):
            try:
                value = action()
            except OSError as error:
                return "blocked: " + type(error).__name__
            return "allowed: " + repr(value)[:60]

        def fork():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            return os.waitpid(pid, 0)

        def shared_memory():  # what the runner's transport uses: an anonymous memfd
            fd = os.memfd_create("sourcebox-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(fd, 1 << 20)
                with mmap.mmap(fd, 1 << 20) as view:
                    view[:5] = b"hello"
                    return bytes(view[:5])
            finally:
                os.close(fd)

        def named_shared_memory():  # a name in /dev/shm, which any process could open
            fd = _posixshmem.shm_open("/sourcebox-test-" + str(os.getpid()), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.close(fd)

        def pair():
            left, right = socket.socketpair()
            left.sendall(b"ping")
            return right.recv(4)

        def thread_matmul():
            out = []
            worker = threading.Thread(target=lambda: out.append((torch.ones(64, 64) @ torch.ones(64, 64)).sum().item()))
            worker.start()
            worker.join()
            return out[0]

        transport.sendall(b"hello from the confined worker")
        echoed = transport.recv(100)
        print(json.dumps({{
            "write_outside": attempt(lambda: open({str(outside / 'written.txt')!r}, "w").write("x")),
            "read_secret": attempt(lambda: open({str(secret)!r}).read()),
            "read_model": attempt(lambda: open({str(model_dir / 'config.json')!r}).read()),
            "write_model": attempt(lambda: open({str(model_dir / 'new.txt')!r}, "w").write("x")),
            "write_scratch": attempt(lambda: open({str(scratch / 'out.txt')!r}, "w").write("ok")),
            "exec": attempt(lambda: os.posix_spawn("/bin/true", ["/bin/true"], {{}})),
            "fork": attempt(fork),
            "tcp": attempt(lambda: socket.create_connection(("127.0.0.1", {tcp.getsockname()[1]}), timeout=2)),
            "unix_connect": attempt(lambda: socket.socket(socket.AF_UNIX).connect({transport_path!r})),
            "socketpair": attempt(pair),
            "shared_memory": attempt(shared_memory),
            "named_shared_memory": attempt(named_shared_memory),
            "matmul": (torch.randn(128, 128) @ torch.eye(128)).shape[0],
            "thread_matmul": attempt(thread_matmul),
            "echoed": echoed.decode(),
            "confined": report.confined,
        }}))
        """,
    )
    connection, _ = transport_listener.accept()
    message = connection.recv(100)
    connection.sendall(message)
    result = finish(child)
    connection.close()
    transport_listener.close()

    assert message == b"hello from the confined worker" and result["echoed"] == message.decode()
    assert result["confined"] is True
    for blocked in ("write_outside", "read_secret", "write_model", "exec", "fork", "tcp", "unix_connect",
                    "named_shared_memory"):
        assert result[blocked].startswith("blocked"), (blocked, result[blocked])
    for allowed in ("read_model", "write_scratch", "socketpair", "shared_memory", "thread_matmul"):
        assert result[allowed].startswith("allowed"), (allowed, result[allowed])
    assert result["shared_memory"] == "allowed: b'hello'" and result["matmul"] == 128
    assert not (outside / "written.txt").exists() and not (model_dir / "new.txt").exists()
    assert (scratch / "out.txt").read_text() == "ok"
    assert not select.select([tcp], [], [], 0)[0], "a TCP connection reached the listener"
    assert not any(name.startswith("sourcebox-test-") for name in os.listdir("/dev/shm"))
    tcp.close()


def test_confine_off_applies_only_the_python_layer_and_says_so(tmp_path):
    outside = tmp_path / "outside.txt"
    child = run_child(
        tmp_path,
        f"""
        import json, sys
        import sandbox
        report = sandbox.enter("ndif-allowlist", scratch={str(tmp_path / 'scratch')!r}, confine="off")
        open({str(outside)!r}, "w").write("written")
        print(json.dumps({{"text": str(report), "layers": report.as_dict()["layers"], "path": sys.path}}))
        """,
    )
    result = finish(child)
    assert result["text"].startswith("WARNING: OS confinement is OFF")
    assert result["layers"]["python"]["status"] == "active"
    assert all(result["layers"][layer]["status"] == "off" for layer in sandbox.OS_LAYERS)
    assert outside.read_text() == "written", "confine='off' must really leave the OS layers off"
    assert str(REPO) not in result["path"]


def _without_landlock(body: str) -> str:
    """A child that first hides Landlock from itself (as a kernel without it would: ENOSYS)."""
    return textwrap.dedent(
        """
        import errno, json
        import pyseccomp
        hide = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        for name in ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"):
            hide.add_rule(pyseccomp.ERRNO(errno.ENOSYS), name)
        hide.load()
        import sandbox
        """
    ) + textwrap.dedent(body)


def test_missing_layer_fails_closed_when_required_and_is_reported_otherwise(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("readable without landlock")
    required = run_child(
        tmp_path,
        _without_landlock(
            f"""
            try:
                sandbox.enter("default", scratch={str(tmp_path / 'a')!r}, confine="required")
            except sandbox.ConfinementUnavailable as error:
                print(json.dumps({{"layer": error.layer, "message": str(error)}}))
            """
        ),
    )
    best_effort = run_child(
        tmp_path,
        _without_landlock(
            f"""
            report = sandbox.enter("default", scratch={str(tmp_path / 'b')!r}, confine="best-effort")
            print(json.dumps({{
                "layers": {{name: status.status for name, status in report.layers.items()}},
                "landlock": report.layers["landlock"].detail,
                "text": str(report),
                "secret": open({str(secret)!r}).read(),
            }}))
            """
        ),
    )
    refused, reported = finish(required), finish(best_effort)
    assert refused["layer"] == "landlock"
    assert "no Landlock support" in refused["message"] and 'confine="best-effort"' in refused["message"]
    assert reported["layers"]["landlock"] == "unavailable"
    assert all(status == "active" for name, status in reported["layers"].items() if name != "landlock")
    assert reported["text"].startswith("WARNING: partial confinement, missing: landlock")
    assert reported["secret"] == "readable without landlock", "the report must match what is enforced"


def test_enter_validates_its_arguments_and_runs_once(tmp_path):
    child = run_child(
        tmp_path,
        f"""
        import json
        import sandbox
        errors = {{}}
        for label, kwargs in {{
            "confine": dict(confine="sometimes"),
            "missing": dict(read_paths=["/no/such/model"]),
            "string": dict(read_paths="/usr"),
            "policy": dict(policy="no-such-profile"),
        }}.items():
            arguments = dict(policy="default", scratch={str(tmp_path / 's')!r}, confine="off")
            arguments.update(kwargs)
            try:
                sandbox.enter(arguments.pop("policy"), **arguments)
            except Exception as error:
                errors[label] = type(error).__name__ + ": " + str(error)
        sandbox.enter("default", scratch={str(tmp_path / 's')!r}, confine="off")
        try:
            sandbox.enter("default", scratch={str(tmp_path / 's')!r}, confine="off")
        except RuntimeError as error:
            errors["twice"] = str(error)
        errors["entered"] = sandbox.entered().policy
        print(json.dumps(errors))
        """,
    )
    errors = finish(child)
    assert errors["confine"].startswith("ValueError: confine='sometimes' is not one of")
    assert errors["missing"] == "FileNotFoundError: read_paths entry '/no/such/model' does not exist"
    assert errors["string"].startswith("TypeError: read_paths must be a list of paths")
    assert errors["policy"].startswith("PolicyError: no shipped profile named 'no-such-profile'")
    assert "can only be applied once" in errors["twice"]
    assert errors["entered"] == "default"


def test_check_cli_probes_every_layer(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sandbox", "check"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for layer in sandbox.LAYERS:
        assert re.search(rf"^  {layer} +can be active ", result.stdout, re.MULTILINE), layer
    assert "NOT blocked" not in result.stdout and result.stdout.count("blocked (") == 5
    assert "all layers can be active on this kernel" in result.stdout


def test_report_round_trips_through_plain_data():
    report = sandbox.Report("default", "best-effort", "/tmp/scratch")
    report.layers["python"] = sandbox.LayerStatus("python", "active", "sys.path scrubbed")
    report.layers["seccomp"] = sandbox.LayerStatus("seccomp", "unavailable", "no libseccomp")
    again = sandbox.Report.from_dict(json.loads(json.dumps(report.as_dict())))
    assert again == report
    assert not again.confined and again.active("python") and not again.active("seccomp")
    assert "missing: rlimits, capabilities, no_new_privs, landlock, seccomp, threads" in str(again)

