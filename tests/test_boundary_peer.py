"""Who the client talks to, who may stop the server, recovery, and what user code can do
with the worker's channel to the supervisor. Real servers, real client processes, judged
by effect; each attack has a control with the layer that stops it switched off
(``runner.auth._SKIP_PEER_CHECKS_FOR_TESTS``, ``serve --test-only-trust-worker-channel``)."""
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import runner
from runner import auth, shm
from runner.lifecycle import CHANNEL_READ_SECONDS as _CHANNEL_READ_SECONDS
from runner.owned_server import listening
from runner_support import wait_until

POLICY = "nnsight-local"
CANARY = "sbx-canary-7d41c09e"  # appears only in the source of the user's function


def users_secret_function():
    return "sbx-canary-7d41c09e"


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def echo(value):
    return value


# A process on the socket path that is not a runner server: it speaks the greeting and the
# hello/welcome exchange, answers wait_ready, and prints whatever requests reach it.
FAKE_SERVER = textwrap.dedent('''\
    import os, socket, sys
    from runner import protocol
    from runner.protocol import Connection

    path, mode = sys.argv[1], sys.argv[2]
    if mode == "hijack":  # take the path over from the server listening there
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    if mode == "nobody":  # SO_PEERCRED reports who called listen()
        os.setgid(65534)
        os.setuid(65534)
    listener.listen(8)
    print("listening", flush=True)
    while True:
        sock, _ = listener.accept()
        conn = Connection(sock)
        greeted = False
        try:
            conn.greet(peer="client")
            greeted = True
            print("greeted", flush=True)
            hello = conn.recv()
            conn.send(protocol.WELCOME, hello.id, {"server_pid": os.getpid(), "nonce": os.urandom(32),
                                                     "proof": os.urandom(32), "policy": "nnsight-local"})
            while True:
                message = conn.recv()
                if message.kind == protocol.WAIT_READY:
                    conn.send(protocol.READY, message.id, {"policy": "nnsight-local", "worker_pid": None})
                elif message.kind == protocol.REQUEST:
                    print("request", b"".join(bytes(f) for f in message.frames), flush=True)
        except Exception as exc:
            print("connection ended:", type(exc).__name__, flush=True)
        finally:
            conn.close()
        if greeted:  # a client talked to us and left: all it sent is printed
            break
    ''')

# A man in the middle: it took the path over from a real server (holding connections to
# it opened before) and relays bytes both ways, printing what clients send.
RELAY = textwrap.dedent('''\
    import os, socket, sys, threading

    path = sys.argv[1]
    backends = []
    for _ in range(3):
        backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        backend.connect(path)
        backends.append(backend)
    os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    print("listening", flush=True)


    def pump(source, sink, show):
        while True:
            data = source.recv(1 << 16)
            if not data:
                break
            if show:
                print("client sent", data, flush=True)
            sink.sendall(data)
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


    for backend in backends:
        client, _ = listener.accept()
        threading.Thread(target=pump, args=(backend, client, False), daemon=True).start()
        pump(client, backend, True)
    ''')

CLIENT = textwrap.dedent('''\
    import socket, struct, sys

    import capture
    import runner
    from runner import protocol
    from runner.protocol import Connection


    def echo(value):
        return value


    def victim_value(seconds):
        import time
        time.sleep(seconds)
        return "REAL"


    def hold_then_write_partial_header():
        import os, sys, time
        fd = int(sys.argv[sys.argv.index("--channel-fd") + 1])
        deadline = time.monotonic() + 60
        while not os.path.exists("go") and time.monotonic() < deadline:
            time.sleep(0.05)
        os.write(fd, b"SBXM" + (64).to_bytes(4, "little"))  # half of a message prefix
        time.sleep(3600)


    def hold_then_spray(messages, seconds):
        import os, sys, threading, time
        fd = int(sys.argv[sys.argv.index("--channel-fd") + 1])
        deadline = time.monotonic() + 60
        while not os.path.exists("go") and time.monotonic() < deadline:
            time.sleep(0.05)

        def spray():  # outlives this request: writes while the next one runs
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(0.1)
                for message in messages:
                    os.write(fd, message)

        threading.Thread(target=spray, daemon=True).start()
        return "attacker done"


    def forged_replies(ids):
        """Complete wire messages: a reply carrying "FORGED" for each id."""
        bundle = capture.encode("FORGED")
        ours, theirs = socket.socketpair()
        conn, wire = Connection(ours), []
        for request_id in ids:
            conn.send(protocol.REPLY, request_id, {"dropped": [], "sources": {"id": "forged"}}, [bundle.header])
            prefix = theirs.recv(16, socket.MSG_WAITALL)
            _, header, inline = struct.unpack("<4sIQ", prefix)
            wire.append(prefix + theirs.recv(header + inline, socket.MSG_WAITALL))
        return wire


    mode, path = sys.argv[1], sys.argv[2]
    with runner.Worker(socket=path) as worker:
        print("connected", flush=True)
        try:
            if mode == "echo":
                print(worker.call(echo, 41) + 1, flush=True)
            elif mode == "victim":
                print(worker.call(victim_value, 1.0), flush=True)
            elif mode == "partial":
                worker.call(hold_then_write_partial_header)
            elif mode == "forge":
                print(worker.call(hold_then_spray, forged_replies(range(1, 101)), 3.0), flush=True)
        except runner.RunnerError as exc:
            print(f"{type(exc).__name__}: {exc}", flush=True)
    ''')


def child_env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def spawn(*argv):
    return subprocess.Popen([sys.executable, *map(str, argv)], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)






@pytest.fixture
def private_dir():
    path = tempfile.mkdtemp(prefix="sbx-peer-test-")  # 0700, ours
    yield path
    subprocess.run(["rm", "-rf", path])


@pytest.fixture
def client_script(tmp_path):
    path = tmp_path / "peer_client.py"
    path.write_text(CLIENT)
    return path


@pytest.fixture
def fake_script(tmp_path):
    path = tmp_path / "fake_server.py"
    path.write_text(FAKE_SERVER)
    return path


def start_fake(fake_script, path, mode):
    fake = spawn(fake_script, path, mode)
    assert fake.stdout.readline().strip() == "listening", fake.stderr.read()
    return fake


def fake_output(fake, *, talked_to: bool):
    """What the fake printed: once the client that talked to it left, or at once."""
    if not talked_to:
        fake.kill()
    out, _ = fake.communicate(timeout=60)
    return out


def serve(path, *extra):
    """A server started from the command line (it writes PATH.secret)."""
    server = subprocess.Popen([sys.executable, "-m", "runner", "serve", "--socket", path, "--model", "none",
                               "--policy", POLICY, *extra], env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: listening(path) or server.poll() is not None, what="the server to listen")
    assert server.poll() is None
    return server


def stop_server(server):
    if server.poll() is None:
        server.kill()
    server.wait()


# -- (a) a process on the socket path never gets a request --------------------------------
def test_a_peer_of_another_uid_is_refused_before_anything_is_sent(fake_script, private_dir):
    path = os.path.join(private_dir, "worker.sock")
    fake = start_fake(fake_script, path, "nobody")
    try:
        with pytest.raises(runner.ProtocolError) as caught:
            runner.Worker(socket=path, policy=POLICY)
    finally:
        out = fake_output(fake, talked_to=False)
    assert isinstance(caught.value, runner.PeerAuthError)
    assert path in str(caught.value) and "runs as uid 65534" in str(caught.value)
    assert "greeted" not in out and CANARY not in out


def test_control_without_the_check_a_peer_of_another_uid_gets_the_source(fake_script, private_dir, monkeypatch):
    monkeypatch.setattr(auth, "_SKIP_PEER_CHECKS_FOR_TESTS", True)
    path = os.path.join(private_dir, "worker.sock")
    fake = start_fake(fake_script, path, "nobody")
    try:
        with runner.Worker(socket=path, policy=POLICY) as worker:
            worker.submit(users_secret_function)  # sent when submit returns
    finally:
        out = fake_output(fake, talked_to=True)
    assert CANARY in out


@pytest.mark.parametrize("check", ["on", "off (control)"])
def test_a_process_that_took_over_the_socket_path_cannot_prove_the_secret(fake_script, private_dir, check,
                                                                            monkeypatch):
    path = os.path.join(private_dir, "worker.sock")
    server = serve(path)
    try:
        with runner.Worker(socket=path) as worker:  # the real server: proves the secret in PATH.secret
            assert worker.owner and worker.call(echo, 1) == 1
        fake = start_fake(fake_script, path, "hijack")  # same uid, lacks the secret
        try:
            if check == "on":
                with pytest.raises(runner.PeerAuthError, match="could not prove it holds the secret"):
                    runner.Worker(socket=path, policy=POLICY)
            else:
                monkeypatch.setattr(auth, "_SKIP_PEER_CHECKS_FOR_TESTS", True)
                with runner.Worker(socket=path, policy=POLICY) as worker:
                    worker.submit(users_secret_function)
        finally:
            out = fake_output(fake, talked_to=True)
    finally:
        stop_server(server)
    assert "greeted" in out  # it was reached either way
    assert (CANARY in out) == (check != "on")


@pytest.mark.parametrize("check", ["on", "off (control)"])
def test_a_relay_of_the_real_servers_proof_is_refused(tmp_path, private_dir, check, monkeypatch):
    relay_script = tmp_path / "relay.py"
    relay_script.write_text(RELAY)
    path = os.path.join(private_dir, "worker.sock")
    server = serve(path)
    try:
        relay = start_fake(relay_script, path, "relay")
        try:
            if check == "on":
                # The proof is the real server's, but made for the relay's pid, not ours.
                with pytest.raises(runner.PeerAuthError, match="could not prove it holds the secret"):
                    runner.Worker(socket=path, policy=POLICY)
            else:
                monkeypatch.setattr(auth, "_SKIP_PEER_CHECKS_FOR_TESTS", True)
                with runner.Worker(socket=path, policy=POLICY) as worker:
                    assert worker.call(users_secret_function) == CANARY  # served, through the relay
        finally:
            out = fake_output(relay, talked_to=False)
    finally:
        stop_server(server)
    assert (CANARY in out) == (check != "on")


# -- (b) only the owner may stop a shared server -------------------------------------------
def test_a_client_that_is_not_the_owner_cannot_stop_the_server(client_script):
    owner = runner.Worker(model="none", policy=POLICY)
    try:
        server_pid = owner.server_pid
        attacker = subprocess.run([sys.executable, "-m", "runner", "stop", owner.socket_path], env=child_env(),
                                  capture_output=True, text=True, timeout=60)
        assert attacker.returncode == 2 and "stop refused: only the owner" in attacker.stderr
        victim = spawn(client_script, "echo", owner.socket_path)
        out, err = victim.communicate(timeout=120)
        assert victim.returncode == 0 and out.split() == ["connected", "42"], err
        assert owner.server_pid == server_pid and owner.call(echo, 7) == 7
    finally:
        owner.close()
    # Control: the owner's stop works (close() kills only a server that did not stop).
    assert owner._server.returncode == 0 and not shm.alive(server_pid)


# -- (c) recovery --------------------------------------------------------------------------
def test_a_worker_whose_own_server_was_killed_starts_a_new_one():
    with runner.Worker(model="none", policy=POLICY) as worker:
        first = worker.server_pid
        running = worker.submit(sleep_for, 60)
        wait_until(lambda: worker.status()["running"], what="the request to run")
        os.kill(first, signal.SIGKILL)
        with pytest.raises(runner.WorkerCrashed):
            running.result(timeout=60)
        assert worker.call(echo, 5) == 5
        assert worker.server_pid != first and worker.owner


def test_a_worker_reconnects_when_the_server_at_its_socket_returns(private_dir):
    path = os.path.join(private_dir, "worker.sock")
    first = serve(path)
    try:
        with runner.Worker(socket=path, reconnect=120) as worker:
            assert worker.call(echo, 1) == 1
            running = worker.submit(sleep_for, 60)
            wait_until(lambda: worker.status()["running"], what="the request to run")
            first.kill()
            first.wait()
            with pytest.raises(runner.WorkerCrashed):
                running.result(timeout=60)
            second = subprocess.Popen([sys.executable, "-m", "runner", "serve", "--socket", path, "--model",
                                       "none", "--policy", POLICY], env=child_env(),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                assert worker.call(echo, 3) == 3  # waits for it, checks its new secret
                assert worker.server_pid == second.pid and worker.owner
            finally:
                stop_server(second)
    finally:
        stop_server(first)


def test_reconnecting_gives_up_after_its_bound(private_dir):
    path = os.path.join(private_dir, "worker.sock")
    server = serve(path)
    try:
        with runner.Worker(socket=path, reconnect=1.0) as worker:
            server.kill()
            server.wait()
            with pytest.raises(runner.WorkerCrashed):
                worker.call(echo, 1)
            with pytest.raises(runner.WorkerCrashed, match="did not come back within 1s"):
                worker.call(echo, 1)
    finally:
        stop_server(server)


# -- (d) a partial message on the worker's channel -----------------------------------------
def scratch_of(path):
    with runner.Worker(socket=path) as probe:
        server_pid, worker_pid = probe.server_pid, probe.status()["worker_pid"]
    # The worker's cwd is its scratch (a standby worker has another one of its own).
    scratch = os.readlink(f"/proc/{worker_pid}/cwd")
    assert os.path.basename(scratch).startswith(f"sourcebox-scratch-{server_pid}-")
    return scratch, worker_pid


def queue_victim_behind_attacker(client_script, path, attack, victim_mode):
    """Start the attacker's request, queue the victim's behind it, then let the attacker go."""
    scratch, worker_pid = scratch_of(path)
    with runner.Worker(socket=path) as watcher:
        attacker = spawn(client_script, attack, path)
        wait_until(lambda: watcher.status()["running"], what="the attacker's request to run")
        victim = spawn(client_script, victim_mode, path)
        wait_until(lambda: watcher.status()["queued"] >= 1, what="the victim's request to queue")
    with open(os.path.join(scratch, "go"), "w"):
        pass
    return attacker, victim, worker_pid


@pytest.mark.parametrize("deadline", ["on", "off (control)"])
def test_a_partial_message_on_the_channel_cannot_stall_the_supervisor(client_script, private_dir, deadline):
    path = os.path.join(private_dir, "worker.sock")
    server = serve(path, *(["--test-only-trust-worker-channel"] if deadline != "on" else []))
    try:
        attacker, victim, worker_pid = queue_victim_behind_attacker(client_script, path, "partial", "echo")
        if deadline == "on":
            out, err = victim.communicate(timeout=120)
            assert out.split() == ["connected", "42"], err
            out, err = attacker.communicate(timeout=60)
            assert "WorkerCrashed" in out and "unfinished" in out, out + err
            with runner.Worker(socket=path) as after:
                status = after.status()
            assert status["restarts"] == 1 and status["worker_pid"] != worker_pid
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) == 0
        else:
            with pytest.raises(subprocess.TimeoutExpired):
                victim.communicate(timeout=3 * _CHANNEL_READ_SECONDS)
            victim.kill()
            attacker.kill()
            victim.communicate()
            attacker.communicate()
    finally:
        stop_server(server)


# -- (e) a forged reply for another client's request ---------------------------------------
@pytest.mark.parametrize("check", ["on", "off (control)"])
def test_a_forged_reply_never_reaches_another_client(client_script, private_dir, check, monkeypatch):
    # The forging request leaves a writer behind on purpose, to test the channel checks
    # alone: with the worker's hygiene on (runner.hygiene) it would retire first.
    monkeypatch.setenv("SOURCEBOX_TEST_NO_HYGIENE", "1")
    path = os.path.join(private_dir, "worker.sock")
    server = serve(path, *(["--test-only-trust-worker-channel"] if check != "on" else []))
    try:
        attacker, victim, worker_pid = queue_victim_behind_attacker(client_script, path, "forge", "victim")
        out, err = victim.communicate(timeout=120)
        attacker_out, attacker_err = attacker.communicate(timeout=60)
        assert "attacker done" in attacker_out, attacker_out + attacker_err
        if check == "on":
            assert out.split() == ["connected", "REAL"], err
            with runner.Worker(socket=path) as after:
                assert after.status()["restarts"] >= 1
        else:
            assert out.split() == ["connected", "FORGED"], err
    finally:
        stop_server(server)
