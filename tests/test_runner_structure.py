"""The runner's shape, which later changes must keep: the client pulls in no server code,
message kinds come from one table in ``runner.protocol``, nnsight's internals sit behind
one adapter that refuses an untested nnsight; and the defects found while cutting it
(a server that exits before listening leaves its directory; a start fills the terminal)."""
import ast
import glob
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from runner import nnsight_compat, protocol

RUNNER = pathlib.Path(protocol.__file__).parent
TESTS = pathlib.Path(__file__).parent
# The modules that speak the protocol, and the tests' own hand-written client.
SPEAKERS = sorted(RUNNER.glob("*.py")) + [TESTS / "runner_support.py"]
KIND_NAMES = {name: value for name, value in vars(protocol).items()
              if name.isupper() and isinstance(value, str) and value in
              {kind for route in protocol.ROUTES.values() for kind in route}}


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env))


# -- the cut along process lines ----------------------------------------------------------

def test_importing_the_client_pulls_in_no_server_code():
    done = run_python("""
        import sys
        import runner
        runner.Worker, runner.SandboxExecutor, runner.encode_call, runner.decode_result
        print(" ".join(sorted(name for name in sys.modules if name.startswith("runner"))))
    """)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "runner.client" in loaded
    assert not loaded & {"runner.supervisor", "runner.lifecycle", "runner.cli", "runner.worker"}, loaded


def test_the_client_handle_and_the_workers_request_loop_have_different_names():
    import runner.worker

    assert runner.Worker.__module__ == "runner.client"
    assert not hasattr(runner.worker, "Worker") and hasattr(runner.worker, "RequestLoop")


def _lease(table, size=4096):
    buffer = table.pool.lease(size)
    buffer.put(memoryview(bytes(size)))
    return buffer


def test_a_lease_ends_with_its_answer_whether_the_answer_or_the_send_returns_first():
    from runner.leases import LeaseTable

    table = LeaseTable()
    try:
        send = table.sending(1)
        table.sent(send, _lease(table))
        assert table.pool.stats()["leased"] == 1
        table.answered(1)
        assert table.pool.stats()["leased"] == 0
        send = table.sending(2)       # the answer is read before the send returns its lease
        table.answered(2)
        table.sent(send, _lease(table))
        assert table.pool.stats()["leased"] == 0
    finally:
        table.close()


def test_a_resent_requests_lease_is_held_until_its_own_answer():
    from runner.leases import LeaseTable

    table = LeaseTable()
    try:
        # The first send is answered (a miss) and resent before it returns its lease.
        first = table.sending(7)
        table.answered(7)
        second = table.sending(7)
        table.sent(second, _lease(table))
        table.sent(first, _lease(table))
        assert table.pool.stats()["leased"] == 1   # the resend's, still in flight
        table.answered(7)
        assert table.pool.stats()["leased"] == 0
    finally:
        table.close()


# -- one protocol vocabulary ----------------------------------------------------------------

def _sent_kinds(path: pathlib.Path):
    """(line, first argument) of every send/post call and every ``.kind`` comparison."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("send", "post") and node.args:
            yield node.lineno, node.args[0]
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "kind":
            for comparator in node.comparators:
                yield node.lineno, comparator


def test_every_kind_the_runner_sends_or_checks_is_a_named_constant_of_the_table():
    literals, unknown = [], []
    for path in SPEAKERS:
        for line, argument in _sent_kinds(path):
            where = f"{path.name}:{line}"
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                literals.append(f"{where} {argument.value!r}")
            elif isinstance(argument, ast.Name) and argument.id.isupper() and argument.id not in KIND_NAMES:
                unknown.append(f"{where} {argument.id}")
    assert not literals, "message kinds written as strings (use runner.protocol's constants): " + ", ".join(literals)
    assert not unknown, "constants used as message kinds that the protocol table lacks: " + ", ".join(unknown)


def test_the_table_is_consistent_and_every_kind_in_it_is_used():
    for (sender, receiver), sent in protocol.ROUTES.items():
        for kind, answers in sent.items():
            # Every answer is something the receiver may send back.
            assert set(answers) <= set(protocol.kinds(receiver, sender)), (sender, receiver, kind)
    assert set(protocol.STARTED) <= set(protocol.kinds(protocol.WORKER, protocol.SUPERVISOR))
    used = {node.id for path in SPEAKERS for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Name)}
    assert set(KIND_NAMES) <= used, f"kinds in the table that no code names: {set(KIND_NAMES) - used}"


def test_an_unknown_kind_is_refused_naming_the_kinds_the_table_allows():
    import runner
    from runner_support import raw_client

    with runner.Worker(model="none", policy="nnsight-local") as worker:
        conn = raw_client(worker)
        try:
            conn.send("no-such-kind", 3)
            answer = conn.recv()
        finally:
            conn.close()
    assert answer.kind == protocol.ERROR and answer.id == 3
    message = answer.meta["error"]["message"]
    assert "'no-such-kind'" in message
    assert all(kind in message for kind in protocol.kinds(protocol.CLIENT, protocol.SERVER) if kind != protocol.HELLO)


# -- the nnsight adapter ----------------------------------------------------------------------

def test_the_installed_nnsight_is_of_the_tested_series():
    # This module imported nnsight_compat, whose import checks the installed version.
    version = nnsight_compat.installed_version()
    assert version is not None and version.startswith("0.8.")


@pytest.mark.parametrize("version", ["0.8.0", "0.8.1", "0.8.2rc1", "0.8.10.dev3"])
def test_a_tested_nnsight_version_passes(version):
    nnsight_compat.check_version(version)


@pytest.mark.parametrize("version", ["0.9.0", "0.7.5", "1.0", "0", "nightly"])
def test_an_untested_nnsight_version_is_refused_saying_what_to_do(version):
    with pytest.raises(ImportError) as refused:
        nnsight_compat.check_version(version)
    message = str(refused.value)
    assert f"nnsight {version} is installed" in message          # what was found
    assert "tested with nnsight 0.8.x" in message                # what is tested
    assert "pip install 'nnsight>=0.8,<0.9'" in message          # what to do
    assert "runner/nnsight_compat.py" in message


def test_no_runner_module_but_the_adapter_touches_nnsight_internals():
    internals = ("._module", "._cache", "._remote_backend", "interleaver", "SOURCES", "BLOCKS", "Tracer.",
                 "__intervention_tb__", "nnsight.tracing", "nnsight.intervention.cache")
    found = [f"{path.name}: {text}" for path in RUNNER.glob("*.py") if path.name != "nnsight_compat.py"
             for text in internals if text in path.read_text()]
    assert not found, found


# -- defects found on the way ---------------------------------------------------------------

def test_a_server_that_exits_before_listening_leaves_no_private_directory(tmp_path):
    # threads=0 makes `python -m runner serve` refuse its arguments: it exits before it listens.
    done = run_python("""
        import glob, os, tempfile
        import runner
        try:
            runner.Worker(model="none", threads=0)
        except runner.WorkerStartError as exc:
            assert "exited before listening" in str(exc) and "--threads" in str(exc), exc
        else:
            raise AssertionError("the server started")
        # Before this process exits (and its atexit hooks run).
        print(glob.glob(os.path.join(tempfile.gettempdir(), "sourcebox-*")))
    """, TMPDIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert glob.glob(str(tmp_path / "sourcebox-*")) == []


def test_a_server_start_prints_one_line_and_status_has_the_full_sandbox_report(tmp_path):
    done = run_python("""
        import runner
        with runner.Worker(model="none", policy="nnsight-local") as worker:
            report = worker.status()["sandbox"]
        print(report)
    """, TMPDIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "ready in" in lines[0] and "policy nnsight-local" in lines[0] and "layers active" in lines[0]
    assert "seccomp" in done.stdout and "landlock" in done.stdout  # the full report, layer by layer
