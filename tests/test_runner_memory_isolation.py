"""Shared memory is private to its holders, judged by effect through the real server with
attacker and victim as separate client processes.

(a) The victim sends a large tensor holding a secret; the attacker's next request on the
    same worker searches /dev/shm, /proc/self/fd, /proc/self/maps and /proc/self/mem for
    it. (b) The victim holds a large result; the attacker, having poisoned the worker's
    ``os.close`` to keep a handle on every memfd the worker lets go of, writes into every
    memfd it can reach. Each has a CONTROL run with the protection turned off by its
    test-only switch (``runner.shm``), where the same attack succeeds.

The attacks are functions of a user module that the worker cannot import: capture ships
them as source, as any user's code.
"""
import json
import os
import secrets
import subprocess
import sys
import textwrap

import pytest

import runner

MODULE = "memory_attack_" + secrets.token_hex(4)
MARKER = "SBX-SECRET-"
TENSOR_BYTES = 64 << 20

USER_MODULE = textwrap.dedent('''\
    import os

    import torch


    def consume(tensor):
        return float(tensor[:16].sum())


    def produce(n):
        return torch.full((n,), 7.0)


    def hunt(marker):
        """Everything of the worker's memory and descriptors this request can read."""
        marker = marker.encode()
        found, scanned = [], {"shm": 0, "fds": 0, "mappings": 0, "bytes": 0}

        def search(where, data):
            at = data.find(marker)
            if at >= 0:
                found.append([where, data[at:at + 64].decode("latin-1")])

        try:
            names = os.listdir("/dev/shm")
        except OSError:
            names = []
        for name in names:
            try:
                with open("/dev/shm/" + name, "rb") as handle:
                    search("/dev/shm/" + name, handle.read())
                scanned["shm"] += 1
            except OSError:
                pass
        for name in os.listdir("/proc/self/fd"):
            scanned["fds"] += 1
            try:
                fd = int(name)
                size = os.fstat(fd).st_size
                if size > 0:
                    search(f"fd {fd} " + os.readlink(f"/proc/self/fd/{fd}"), os.pread(fd, min(size, 1 << 28), 0))
            except OSError:
                pass
        mem = os.open("/proc/self/mem", os.O_RDONLY)
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
        for line in lines:
            fields = line.split()
            perms, path = fields[1], fields[5] if len(fields) > 5 else ""
            if "r" not in perms or path in ("[vvar]", "[vsyscall]", "[vdso]"):
                continue
            if path.startswith("/") and "w" not in perms and "s" not in perms and "memfd" not in path:
                continue  # read-only text and data of libraries
            start, end = (int(value, 16) for value in fields[0].split("-"))
            for at in range(start, end, 1 << 24):
                try:
                    data = os.pread(mem, min(1 << 24, end - at), at)
                except OSError:
                    break
                scanned["bytes"] += len(data)
                search(f"mem {fields[0]} {perms} {path}", data)
            scanned["mappings"] += 1
        os.close(mem)
        return found, scanned


    def plant():
        """Poison the worker: keep a duplicate of every memfd it closes from now on."""
        real_close, kept = os.close, []

        def close(fd):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                    kept.append(os.dup(fd))
            except OSError:
                pass
            return real_close(fd)

        os.makedirs.__globals__["close"] = close  # past the facade, which refuses os.close = ...
        return "planted"


    def tamper():
        """Write into every memfd this process holds, and every memfd mapping."""
        outcomes = []
        for name in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue
            if link.startswith("/memfd:"):
                try:
                    os.pwrite(int(name), bytes(1 << 16), 0)
                    outcomes.append([link, "written"])
                except OSError as error:
                    outcomes.append([link, type(error).__name__])
        with open("/proc/self/maps") as maps:
            mapped = [line.split() for line in maps if "/memfd:" in line]
        for fields in mapped:
            try:
                mem = os.open("/proc/self/mem", os.O_RDWR)
                os.pwrite(mem, bytes(1 << 16), int(fields[0].split("-")[0], 16))
                outcomes.append([" ".join(fields[5:]), "written through /proc/self/mem"])
            except OSError as error:
                outcomes.append([" ".join(fields[5:]), "mem " + type(error).__name__])
        return outcomes
    ''')

CLIENT = textwrap.dedent(f'''\
    import json
    import os
    import sys

    import torch

    import runner
    import {MODULE} as user

    mode, path = sys.argv[1], sys.argv[2]
    policy = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allow-all.toml")
    with runner.Worker(socket=path, policy=policy) as worker:
        if mode == "send-secret":
            pattern = torch.frombuffer(bytearray(("{MARKER}" + sys.argv[3]).encode() * 4), dtype=torch.uint8)
            tensor = pattern.repeat({TENSOR_BYTES} // pattern.numel() + 1)[:{TENSOR_BYTES}].clone()
            worker.call(user.consume, tensor)
            print("sent", flush=True)
            sys.stdin.readline()  # alive while the attacker looks
        elif mode == "hold-result":
            result = worker.call(user.produce, {TENSOR_BYTES} // 4)
            print("held", flush=True)
            sys.stdin.readline()
            print(json.dumps(bool((result == 7).all())), flush=True)
        else:
            print(json.dumps(worker.call(getattr(user, mode))  if mode != "hunt" else
                             worker.call(user.hunt, "{MARKER}")), flush=True)
    ''')


@pytest.fixture
def project(tmp_path, monkeypatch):
    # These attacks leave the worker poisoned on purpose, to test the memory layer alone:
    # with the worker's hygiene on (runner.hygiene) it would retire before the next request.
    monkeypatch.setenv("SOURCEBOX_TEST_NO_HYGIENE", "1")
    (tmp_path / f"{MODULE}.py").write_text(USER_MODULE)
    (tmp_path / "client.py").write_text(CLIENT)
    # Everything allowed but the user module, so it travels as source.
    policy = tmp_path / "allow-all.toml"
    policy.write_text(f'name = "allow-all"\ndefault = "allow"\n\n[[rules]]\naction = "deny"\n'
                      f'modules = ["{MODULE}"]\nreason = "user code travels as source"\n')
    return tmp_path


def client(project, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(project), *sys.path]))
    return subprocess.Popen([sys.executable, str(project / "client.py"), *args], env=env, cwd=project,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, stdin=""):
    out, err = process.communicate(stdin, timeout=300)
    assert process.returncode == 0, err
    return out


def serve(project):
    return runner.Worker(model="none", policy=str(project / "allow-all.toml"), confine="required")


@pytest.mark.parametrize("control", [False, True], ids=["protected", "CONTROL-request-memory-kept"])
def test_the_next_request_cannot_find_the_previous_clients_tensor(project, monkeypatch, control):
    if control:
        monkeypatch.setenv("SOURCEBOX_TEST_KEEP_REQUEST_MEMORY", "1")
    secret = secrets.token_hex(16)
    with serve(project) as worker:
        victim = client(project, "send-secret", worker.socket_path, secret)
        assert victim.stdout.readline().strip() == "sent"
        found, scanned = json.loads(finish(client(project, "hunt", worker.socket_path)))
        finish(victim, "done\n")
    assert scanned["fds"] and scanned["mappings"] and scanned["bytes"] > 0  # it did look
    hits = [where for where, snippet in found if secret in snippet]
    if control:
        assert hits, "with the request's memory kept, the attack should find the secret"
        assert any("memfd:sourcebox-request" in where for where in hits)
    else:
        assert hits == [], f"the victim's secret was found by the next request: {hits}"


@pytest.mark.parametrize("control", [False, True], ids=["protected", "CONTROL-results-unsealed"])
def test_the_worker_cannot_change_a_result_the_client_holds(project, monkeypatch, control):
    if control:
        monkeypatch.setenv("SOURCEBOX_TEST_UNSEALED_RESULTS", "1")
    with serve(project) as worker:
        assert json.loads(finish(client(project, "plant", worker.socket_path))) == "planted"
        victim = client(project, "hold-result", worker.socket_path)
        assert victim.stdout.readline().strip() == "held"
        outcomes = json.loads(finish(client(project, "tamper", worker.socket_path)))
        unchanged = json.loads(finish(victim, "check\n"))
    on_result = [outcome for link, outcome in outcomes if "sourcebox-result" in link]
    assert on_result, f"the attack never got a handle on the result's memfd: {outcomes}"
    if control:
        assert "written" in on_result and unchanged is False
    else:
        assert set(on_result) <= {"PermissionError", "mem PermissionError"}, outcomes
        assert unchanged is True
