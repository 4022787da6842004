"""Requests cannot touch each other (issue 10), judged by effect on one real server with
attacker and victim as separate client processes.

Each attack is a request of the attacker that leaves something behind in the worker (a
hook on the model, a changed weight, a replaced ``torch.softmax``, a profile function, a
replaced handler, a thread), then the victim's requests run, then the attacker's next
request collects what was left behind. Protected: the victim's results equal those of a
fresh worker and nothing of the victim reaches the attacker, because the worker scrubs
and checks itself after every request and retires when it cannot put things back
(``runner.hygiene``). CONTROL: the same run with ``SOURCEBOX_TEST_NO_HYGIENE=1`` (the
test-only switch that turns the scrub, the checks and the per-client source store off),
where each attack works. The user code is in modules the worker cannot import, so it
travels as source as any user's does.
"""
import json
import os
import secrets
import subprocess
import sys
import textwrap

import pytest

import runner
from runner_support import environment

TAG = secrets.token_hex(4)
USER = f"iso_user_{TAG}"
VICTIM = f"iso_victim_{TAG}"
API_KEY = f"sk-live-{secrets.token_hex(12)}"
PASSWORD = f"pw-{secrets.token_hex(8)}"
IDS = [17, 42, 99, 7, 63, 5]
VALUES = [0.375, 0.5, 0.125, 0.25]  # the victim's private input to torch.softmax (exact in float32)

USER_MODULE = textwrap.dedent('''\
    import hashlib
    import sys
    import threading
    import time

    import torch


    # -- the victim's code ---------------------------------------------------------------
    def predict(model, ids):
        with torch.no_grad():
            logits = model._module(torch.tensor([ids])).logits[0, -1]
        return [int(logits.argmax()), [float(x) for x in logits[:64]]]


    def login(password):
        return hashlib.pbkdf2_hmac("sha256", password.encode(), b"salt", 100_000).hex()


    def softmax_probe(values):
        return torch.softmax(torch.tensor(values), 0).tolist()


    def leave_secret(secret):
        """Forgets a file in the scratch directory (the cwd) and a descriptor to another."""
        import os

        with open("notes.txt", "w") as handle:
            handle.write(secret)
        with open("kept.txt", "w") as handle:
            handle.write(secret)
        os.open("kept.txt", os.O_RDONLY)
        os.unlink("kept.txt")
        return "left"


    # -- the attacker's code -------------------------------------------------------------
    def find_leftovers(prefix):
        import os

        found = []
        for name in os.listdir("."):
            if not os.path.isfile(name):
                continue  # torch's cache directory, made at start-up (TMPDIR is scratch)
            with open(name) as handle:
                found.append(["file " + name, handle.read()])
        for name in os.listdir("/proc/self/fd"):
            try:
                data = os.pread(int(name), 4096, 0)
            except OSError:
                continue
            if prefix.encode() in data:
                found.append(["fd " + os.readlink("/proc/self/fd/" + name), data.decode(errors="replace")])
        return found


    def _lists_in_closure(function):
        cells = getattr(function, "__closure__", None) or ()
        return [cell.cell_contents for cell in cells if isinstance(cell.cell_contents, list)]


    def plant_hook(model):
        seen = []
        model._module.transformer.wte.register_forward_pre_hook(lambda module, args: seen.append(args[0].tolist()))
        return "planted"


    def collect_hook(model):
        return [item for hook in model._module.transformer.wte._forward_pre_hooks.values()
                for found in _lists_in_closure(hook) for item in found]


    def plant_weight(model):
        model._module.transformer.h[0].mlp.c_fc.weight.data.add_(1.0)
        return "planted"


    def plant_weight_state(model):
        module = model._module
        module.load_state_dict({name: value + 1.0 for name, value in module.state_dict().items()})  # copies in place
        return "planted"


    def plant_weight_discard(model):
        """Has the kernel drop the pages of every mapping a Python object holds (zero-filled
        or refetched on the next read, no write fault): the weights' among them if one did."""
        import gc
        import mmap

        seen = set()
        for obj in gc.get_objects():
            for ref in list(obj.values()) if type(obj) is dict else gc.get_referents(obj):
                if type(ref) is mmap.mmap and id(ref) not in seen and not ref.closed:
                    seen.add(id(ref))
                    for advice in (mmap.MADV_REMOVE, mmap.MADV_DONTNEED):
                        try:
                            ref.madvise(advice)
                        except OSError:
                            pass
        return "planted"


    class _Flipped(torch.nn.Parameter):
        """A weight whose embedding lookups come out negated: code of one request that would
        run inside every later forward."""

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            result = super().__torch_function__(func, types, args, kwargs or {})
            return -result if func is torch.nn.functional.embedding else result


    def plant_weight_class(model):
        model._module.transformer.wte.weight.__class__ = _Flipped
        return "planted"


    def plant_weight_strides(model):
        weight = model._module.transformer.h[0].mlp.c_fc.weight
        with torch.no_grad():
            weight.as_strided_(weight.shape, (0, 1))  # every row reads row 0: no byte written
        return "planted"


    def plant_weight_negation(model):
        weight = model._module.transformer.h[0].mlp.c_fc.weight
        weight.data = weight.data._neg_view()  # same memory, same pointer, read negated
        return "planted"


    def plant_weight_rebind(model):
        weight = model._module.transformer.h[0].mlp.c_fc.weight
        weight.data = weight.data + 1.0  # other memory, not a write to the parameter's own
        return "planted"


    class _EqualsAnything:
        """A signal handler that compares equal to any other: only identity tells it apart."""

        def __eq__(self, other):
            return True

        __hash__ = object.__hash__

        def __call__(self, *args):
            pass


    class _LyingEnviron(dict):
        """Stands in for os.environ's store: says it holds what it held, records what comes."""

        def get(self, key, default=None):
            return dict.get(self, key, default) if key != b"SBX_PLANTED" else default

        def __len__(self):
            return dict.__len__(self) - (b"SBX_PLANTED" in self)


    def plant_process_state(model):
        import faulthandler
        import os
        import signal

        os.environ["SBX_PLANTED"] = "1"
        os.environ._data = _LyingEnviron(os.environ._data)
        signal.signal(signal.SIGUSR1, _EqualsAnything())
        signal.signal(signal.SIGSEGV, _EqualsAnything())  # over faulthandler's, which getsignal never shows
        faulthandler.disable()
        return "planted"


    def collect_process_state(model):
        import faulthandler
        import os
        import signal

        return [os.environ.get("SBX_PLANTED"), type(os.environ._data).__name__,
                type(signal.getsignal(signal.SIGUSR1)).__name__, type(signal.getsignal(signal.SIGSEGV)).__name__,
                faulthandler.is_enabled()]


    def plant_softmax_through_facade():
        torch.softmax = lambda *args, **kwargs: None
        return "planted"


    def plant_softmax(model):
        real, seen = torch.softmax, []

        def softmax(input, *args, **kwargs):
            seen.append(input.tolist())
            return real(input, *args, **kwargs) * 0
        torch.is_tensor.__globals__["softmax"] = softmax  # a back door to the real torch namespace
        return "planted"


    def collect_softmax(model):
        return [item for found in _lists_in_closure(torch.softmax) for item in found]


    def plant_profile(model):
        seen = []

        def profile(frame, event, arg):
            if event == "call" and "password" in frame.f_code.co_varnames[:frame.f_code.co_argcount]:
                seen.append(frame.f_locals["password"])
        sys.setprofile(profile)
        return "planted"


    def collect_profile(model):
        return [item for found in _lists_in_closure(sys.getprofile()) for item in found]


    def plant_thread(model):
        seen, main = [], threading.main_thread().ident

        def watch():
            deadline = time.time() + 120
            while time.time() < deadline:
                frame = sys._current_frames().get(main)
                while frame is not None:
                    password = frame.f_locals.get("password")
                    if isinstance(password, str) and password not in seen:
                        seen.append(password)
                    frame = frame.f_back
                time.sleep(0.001)
        thread = threading.Thread(target=watch, name="sbx-watch", daemon=True)
        thread.seen = seen
        thread.start()
        return "planted"


    def collect_thread(model):
        return [item for thread in threading.enumerate() if thread.name == "sbx-watch" for item in thread.seen]


    def plant_handler(model):
        import runner.handlers

        registry = runner.handlers._registry
        real, seen = registry["call"], []

        def call(context, payload):
            seen.append(repr(payload.get("args")))
            return real(context, payload)
        registry["call"] = call
        return "planted"


    def collect_handler(model):
        import runner.handlers

        return [item for found in _lists_in_closure(runner.handlers._registry["call"]) for item in found]


    def read_linecache(prefix):
        import linecache

        return [line for entry in list(linecache.cache.values()) for line in entry[2] if prefix in line]


    def search_memory(prefix):
        """Every live str and code constant in the worker that holds ``prefix``."""
        import gc
        import types

        found = set()
        for obj in gc.get_objects():
            texts = dict.values(obj) if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
            found.update(t for t in texts if isinstance(t, str) and prefix in t)
            if isinstance(obj, types.CodeType):
                found.update(c for c in obj.co_consts if isinstance(c, str) and prefix in c)
        return sorted(found)


    def steal(function):
        """Run with ``function`` rebuilt from a digest the attacker sent without text."""
        return [c for c in function.__code__.co_consts if isinstance(c, str)]


    def stub():
        return None
    ''')

VICTIM_MODULE = textwrap.dedent(f'''\
    def api_client():
        API_KEY = "{API_KEY}"
        return len(API_KEY)
    ''')

CLIENT = textwrap.dedent(f'''\
    import json
    import sys

    import capture
    import capture.format
    import capture.source
    import nnsight
    import runner
    import runner.models
    import runner.nnsight

    import {USER} as user

    role, path, policy = sys.argv[1:4]
    if role == "victim":
        import {VICTIM} as victim


    def handle(worker, command):
        op = command["op"]
        if op == "call":
            args = [runner.MODEL if arg == "MODEL" else arg for arg in command.get("args", ["MODEL"])]
            return worker.call(getattr(user, command["fn"]), *args)
        if op == "victim":
            return {{"predict": worker.call(user.predict, runner.MODEL, command["ids"]),
                    "login": worker.call(user.login, command["password"]),
                    "softmax": worker.call(user.softmax_probe, command["values"]),
                    "api": worker.call(victim.api_client)}}
        if op == "segment":  # what an attacker might learn: where the victim's code is and its digest
            s = capture.source.function_segment(victim.api_client.__code__, vars(victim))
            return {{"file": s.file, "line": s.line, "col": s.col, "kind": s.kind, "futures": list(s.futures),
                    "digest": s.digest}}
        if op == "trace":
            runner.nnsight.install(worker)
            model = nnsight.LanguageModel(runner.models.path("tiny-gpt2"))
            with model.trace("The quick brown fox", remote="local"):
                out = model.lm_head.output.save()
            return list(out.shape)
        if op == "steal":  # a request naming the victim's source by digest alone
            data = runner.encode_call(user.steal, (user.stub,), policy=policy)
            header, _ = capture.format.unpack_header(data)
            for source in header["sources"]:
                if "def stub" in source.get("text", ""):
                    source.pop("text")
                    source.update(command["segment"])
            return runner.decode_result(worker.run_bytes(capture.format.pack_header(header)))
        raise ValueError(op)


    with runner.Worker(socket=path, policy=policy) as worker:
        print(json.dumps("connected"), flush=True)
        for line in sys.stdin:
            try:
                answer = {{"ok": handle(worker, json.loads(line))}}
            except Exception as exc:
                answer = {{"error": f"{{type(exc).__name__}}: {{exc}}"}}
            print(json.dumps(answer), flush=True)
    ''')


class Client:
    """A client process on the server, driven one JSON command per line."""

    def __init__(self, project, role, socket_path, policy):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(project), *sys.path]))
        self.process = subprocess.Popen([sys.executable, str(project / "client.py"), role, socket_path, policy],
                                        env=env, cwd=project, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        assert json.loads(self.process.stdout.readline()) == "connected"

    def ask(self, op, **fields):
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return answer.get("ok"), answer.get("error")

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


class Session:
    def __init__(self, worker, attacker, victim, protected):
        self.worker, self.attacker, self.victim, self.protected = worker, attacker, victim, protected
        self.reference, error = victim.ask("victim", ids=IDS, password=PASSWORD, values=VALUES)
        assert error is None, error

    def victim_run(self):
        result, error = self.victim.ask("victim", ids=IDS, password=PASSWORD, values=VALUES)
        assert error is None, error
        return result

    def plant(self, fn, *args):
        before = self.worker.status()["retirements"]
        result, error = self.attacker.ask("call", fn=fn, args=list(args) or ["MODEL"])
        assert (result, error) == ("planted", None)  # the attack did its thing in its own request
        return self.worker.status()["retirements"] - before

    def collect(self, fn):
        result, error = self.attacker.ask("call", fn=fn)
        assert error is None, error
        return result


def _same_result(result, reference):
    """Equal to a fresh worker's: the same answers, logits equal to float rounding."""
    (top, logits), (top_ref, logits_ref) = result["predict"], reference["predict"]
    return top == top_ref and max(abs(a - b) for a, b in zip(logits, logits_ref)) < 1e-5 and \
        {k: result[k] for k in ("login", "softmax", "api")} == {k: reference[k] for k in ("login", "softmax", "api")}


@pytest.fixture(scope="module", params=["protected", "CONTROL-hygiene-off"])
def session(request, tmp_path_factory):
    protected = request.param == "protected"
    project = tmp_path_factory.mktemp("isolation")
    (project / f"{USER}.py").write_text(USER_MODULE)
    (project / f"{VICTIM}.py").write_text(VICTIM_MODULE)
    (project / "client.py").write_text(CLIENT)
    policy = project / "allow-all.toml"  # the strongest attacker the policy allows
    policy.write_text(f'name = "allow-all"\ndefault = "allow"\n\n[[rules]]\naction = "deny"\n'
                      f'modules = ["{USER}", "{VICTIM}"]\nreason = "user code travels as source"\n')
    with environment(SOURCEBOX_TEST_NO_HYGIENE=None if protected else "1"), \
            runner.Worker(model="tiny-gpt2", policy=str(policy), confine="required") as worker:
        attacker = Client(project, "attacker", worker.socket_path, str(policy))
        victim = Client(project, "victim", worker.socket_path, str(policy))
        try:
            yield Session(worker, attacker, victim, protected)
        finally:
            attacker.close()
            victim.close()


def test_normal_calls_and_traces_do_not_retire_the_worker(session):
    shape, error = session.victim.ask("trace")
    assert error is None and shape[0] == 1
    assert _same_result(session.victim_run(), session.reference)
    status = session.worker.status()
    assert (status["retirements"], status["restarts"]) == (0, 0)


def test_a_forward_hook_does_not_see_the_next_clients_prompt(session):
    retired = session.plant("plant_hook")
    result = session.victim_run()
    seen = session.collect("collect_hook")
    if session.protected:
        assert retired == 1 and seen == [] and _same_result(result, session.reference)
    else:
        assert [IDS] in seen, "with hygiene off the hook should record the victim's prompt"


@pytest.mark.parametrize("attack", ["plant_weight", "plant_weight_state"])
def test_a_weight_written_in_place_does_not_change_the_next_clients_prediction(session, attack):
    before = session.victim_run()
    restarts = session.worker.status()["restarts"]
    planted, error = session.attacker.ask("call", fn=attack, args=["MODEL"])
    result = session.victim_run()
    if session.protected:
        # The parameters are read-only memory (runner.weights): the write faults, the worker
        # is replaced, and the attacker is told why and where.
        assert planted is None and error.startswith("WorkerCrashed") and "read-only" in error and attack in error
        assert session.worker.status()["restarts"] == restarts + 1
        assert _same_result(result, session.reference)
    else:
        assert planted == "planted" and result["predict"] != before["predict"]


def test_weights_cannot_be_discarded_through_a_python_handle_on_their_memory(session):
    planted, error = session.attacker.ask("call", fn="plant_weight_discard", args=["MODEL"])
    assert (planted, error) == ("planted", None)
    # Protected, the read-only mapping is libc's, with no Python object to madvise (through
    # one, MADV_REMOVE zeroed every weight without a fault: found in review). With hygiene
    # off there is no such mapping: the .data attacks above are this layer's control.
    if session.protected:
        assert _same_result(session.victim_run(), session.reference)


@pytest.mark.parametrize("attack", ["plant_weight_rebind", "plant_weight_class", "plant_weight_strides",
                                    "plant_weight_negation"])
def test_a_weight_rebound_restrided_negated_or_reclassed_does_not_change_the_next_clients_prediction(session, attack):
    before = session.victim_run()
    retired = session.plant(attack)
    result = session.victim_run()
    if session.protected:
        assert retired == 1 and _same_result(result, session.reference)
    else:
        assert result["predict"] != before["predict"]


def test_torch_softmax_cannot_be_replaced_for_the_next_client(session):
    _, error = session.attacker.ask("call", fn="plant_softmax_through_facade", args=[])
    assert error.startswith("AttributeViolation: cannot set or delete torch.softmax") and "What to do" in error
    retired = session.plant("plant_softmax")  # through a function's __globals__, past the facade
    result = session.victim_run()
    seen = session.collect("collect_softmax")
    if session.protected:
        assert retired == 1 and seen == [] and _same_result(result, session.reference)
    else:
        assert VALUES in seen and result["softmax"] == [0.0] * len(VALUES)


def test_a_profile_function_does_not_see_the_next_clients_arguments(session):
    retired = session.plant("plant_profile")
    result = session.victim_run()
    seen = session.collect("collect_profile")
    if session.protected:  # put back exactly (sys.setprofile(None)): no restart needed
        assert retired == 0 and seen == [] and _same_result(result, session.reference)
    else:
        assert PASSWORD in seen


def test_environment_and_signal_handlers_are_put_back_before_the_next_request(session):
    retired = session.plant("plant_process_state")
    seen = session.collect("collect_process_state")
    if session.protected:  # put back exactly: no restart needed
        assert retired == 0 and seen == [None, "dict", "Handlers", "Handlers", True]
    else:
        assert seen == ["1", "_LyingEnviron", "_EqualsAnything", "_EqualsAnything", False]


def test_another_clients_source_is_neither_in_linecache_nor_in_the_source_store(session):
    segment, error = session.victim.ask("segment")
    assert error is None
    session.victim_run()
    lines, error = session.attacker.ask("call", fn="read_linecache", args=["sk-live-"])
    assert error is None
    stolen, error = session.attacker.ask("steal", segment=segment)
    if session.protected:
        assert lines == [] and stolen is None
        assert "sent by digest only and this worker does not hold them" in error
    else:
        # Shipped lines leave linecache after every request in any case (the bounded line
        # registry), so the control shows the theft through the shared store.
        assert API_KEY in stolen


def test_a_thread_left_running_does_not_watch_the_next_request(session):
    retired = session.plant("plant_thread")
    result = session.victim_run()
    seen = session.collect("collect_thread")
    if session.protected:
        assert retired == 1 and seen == [] and _same_result(result, session.reference)
    else:
        assert PASSWORD in seen


def test_files_and_descriptors_a_request_leaves_are_gone_before_the_next(session):
    secret = f"note-{secrets.token_hex(8)}"
    before = session.worker.status()["retirements"]
    left, error = session.victim.ask("call", fn="leave_secret", args=[secret])
    assert (left, error) == ("left", None)
    retired = session.worker.status()["retirements"] - before
    found, error = session.attacker.ask("call", fn="find_leftovers", args=["note-"])
    assert error is None
    seen = [where for where, text in found if secret in text]
    if session.protected:  # the file is removed; the descriptor retires the worker
        assert retired == 1 and seen == []
    else:
        assert any(where == "file notes.txt" for where in seen) and any(where.startswith("fd ") for where in seen)


def test_a_replaced_handler_does_not_serve_the_next_client(session):
    restarts = session.worker.status()["restarts"]
    retired = session.plant("plant_handler")
    result = session.victim_run()
    seen = session.collect("collect_handler")
    if session.protected:
        assert retired == 1 and seen == [] and _same_result(result, session.reference)
        assert session.worker.status()["restarts"] == restarts  # retirements are planned, not crashes
    else:
        assert any(PASSWORD in args for args in seen)


def test_isolate_clients_gives_each_client_a_fresh_worker(tmp_path):
    """The opt-in strong mode: the second client's request runs on another worker process
    than the first's, and the first client's next one on a third."""
    (tmp_path / f"{USER}.py").write_text(USER_MODULE + "\n\ndef pid():\n    import os\n    return os.getpid()\n")
    (tmp_path / "client.py").write_text(CLIENT)
    policy = tmp_path / "allow-all.toml"
    policy.write_text(f'name = "allow-all"\ndefault = "allow"\n\n[[rules]]\naction = "deny"\n'
                      f'modules = ["{USER}"]\nreason = "user code travels as source"\n')
    with runner.Worker(model="none", policy=str(policy), confine="required", isolate_clients=True) as worker:
        first = Client(tmp_path, "attacker", worker.socket_path, str(policy))
        second = Client(tmp_path, "attacker", worker.socket_path, str(policy))
        try:
            pids = [client.ask("call", fn="pid", args=[])[0] for client in (first, first, second, first)]
        finally:
            first.close()
            second.close()
        status = worker.status()
    assert pids[0] == pids[1] and len(set(pids)) == 3, pids
    assert (status["retirements"], status["restarts"]) == (2, 0)


def test_another_clients_source_and_code_are_not_live_in_the_worker(session):
    """gc.get_objects() walks every live object: the previous client's source texts (in the
    store) and compiled code (in the compile cache) must not be among them."""
    session.victim_run()
    found, error = session.attacker.ask("call", fn="search_memory", args=["sk-live-"])
    assert error is None
    if session.protected:
        assert not any(API_KEY in text for text in found), found
    else:
        assert any(API_KEY in text for text in found)
