"""A request's code that takes the worker process over for good (docs/SECURITY.md, "A
request's code can take the worker over for good"): it hooks the hygiene call, tells the
supervisor the request was clean, and from then on reads and answers every later request.
Nothing inside the worker can stop that; `--isolate-clients` does, because the next
client's request runs in a fresh worker. Attacker and victim are separate client
processes on one real server; the control is the same server without the isolation."""
import os
import subprocess
import sys
import textwrap

import pytest

from runner.owned_server import listening
from runner_support import wait_until

CLIENT = textwrap.dedent('''
    import sys
    import runner

    def take_over():
        import sys
        frame = sys._getframe()
        while not (frame.f_code.co_name == "_run" and "message" in frame.f_locals):
            frame = frame.f_back
        loop, request_id, names = frame.f_locals["self"], frame.f_locals["message"].id, frame.f_globals
        seen = []

        def hook(frame, event, arg):
            if event != "call" or frame.f_code.co_name != "after_request":
                return
            sys.setprofile(None)
            channel = loop.conn
            channel.send(names["VERDICT"], request_id, {})   # "checked: clean"; the check never runs
            while True:                                       # the attacker is the worker now
                message = channel.recv()
                if message.kind == names["PING"]:
                    channel.send(names["PONG"], message.id)
                    continue
                data = b"".join(bytes(part) for part in message.frames if not isinstance(part, names["SharedRef"]))
                answer = seen if b"WHAT-DID-YOU-SEE" in data else "FORGED"
                seen.append(data.decode("latin-1"))
                bundle = names["capture"].encode(answer)
                channel.send(names["REPLY"], message.id, {}, [bundle.header, *bundle.frames])
                channel.send(names["VERDICT"], message.id, {})

        sys.setprofile(hook)
        return "armed"

    def greet(secret):
        return "real result for " + secret[:6]

    def echo(value):
        return value

    role, path = sys.argv[1], sys.argv[2]
    with runner.Worker(socket=path) as worker:
        if role == "attacker-arms":
            print(worker.call(take_over))
        elif role == "victim":
            print(worker.call(greet, "VICTIM-SECRET-4242"))
        else:
            print(any("VICTIM-SECRET-4242" in text for text in worker.call(echo, "WHAT-DID-YOU-SEE")))
''')


@pytest.mark.parametrize("isolate", [True, False], ids=["isolate-clients", "CONTROL-shared-worker"])
def test_a_worker_taken_over_by_one_client_never_serves_another_under_isolate_clients(tmp_path, isolate):
    (tmp_path / "client.py").write_text(CLIENT)  # the clients' own code: the worker cannot import it
    path = str(tmp_path / "w.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "runner", "serve", "--socket", path, "--model", "none", "--policy", "nnsight-local",
         "--confine", "required", *(["--isolate-clients"] if isolate else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(path), timeout=120, what="the server to listen")

        def run(role):
            done = subprocess.run([sys.executable, str(tmp_path / "client.py"), role, path], capture_output=True,
                                  text=True, timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
            assert done.returncode == 0, done.stderr[-2000:]
            return done.stdout.strip()

        assert run("attacker-arms") == "armed"
        victim_saw = run("victim")
        attacker_read_the_secret = run("attacker-asks") == "True"
    finally:
        server.kill()
        server.wait()
    if isolate:
        assert victim_saw == "real result for VICTIM" and not attacker_read_the_secret
    else:
        assert victim_saw == "FORGED" and attacker_read_the_secret
