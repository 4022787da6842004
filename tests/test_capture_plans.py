"""Repeat loads replay a cached plan: fresh objects each time, never another load's
mutable state, and never a plan made for other bytes, another policy or another tenant.
Also: the decoder's dispatch table matches the format's tags, and two threads loading
modules of the same name keep their own module in ``sys.modules``."""
import importlib
import sys
import threading
import types

import pytest

import capture
from capture import decoder, format as fmt
from capture.dataonly import DataDecoder
from capture_support.policies import StdlibDestination

STATEFUL = '''\
import os

REGISTRY = []
SETTINGS = {"scale": 2}


class Counter:
    instances = []

    def __init__(self):
        self.seen = [1, 2]
        self.config = {"depth": [3]}
        Counter.instances.append("made")

    def bump(self):
        REGISTRY.append(len(REGISTRY))
        return len(REGISTRY)


def joined(*parts):
    return os.path.join(*parts)
'''


@pytest.fixture
def stateful(tmp_path):
    (tmp_path / "plan_stateful.py").write_text(STATEFUL)
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("plan_stateful")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("plan_stateful", None)


def hits():
    return capture.plan_cache_info().hits


def test_a_repeat_load_replays_a_plan_into_fresh_objects(stateful):
    data = capture.dumps({"counter": stateful.Counter(), "cls": stateful.Counter, "bump": stateful.Counter.bump,
                          "settings": stateful.SETTINGS})
    first = capture.loads(data)
    before = hits()
    second = capture.loads(data)
    assert hits() == before + 1  # the second load was a replay
    # Fresh classes, namespaces and containers: nothing the first load made is shared.
    assert second["cls"] is not first["cls"] and type(second["counter"]) is second["cls"]
    assert second["bump"].__globals__ is not first["bump"].__globals__
    assert second["counter"].seen is not first["counter"].seen
    assert second["counter"].config["depth"] is not first["counter"].config["depth"]
    first["counter"].seen.append(99)
    first["counter"].config["depth"].append(99)
    first["settings"]["scale"] = 99
    first["cls"].instances.append("mutated")
    assert first["counter"].bump() == 1 and first["counter"].bump() == 2  # the first load's module state
    third = capture.loads(data)
    for loaded in (second, third):
        assert loaded["counter"].seen == [1, 2] and loaded["counter"].config == {"depth": [3]}
        assert loaded["settings"] == {"scale": 2}
        assert "mutated" not in loaded["cls"].instances
        assert loaded["counter"].bump() == 1  # its own, empty REGISTRY
    assert "plan_stateful" in sys.modules and sys.modules["plan_stateful"] is stateful  # never shadowed


def test_a_plan_is_only_used_for_the_same_bytes():
    long = "x" * 6000  # the header runs past the part of the bytes that keys a plan
    assert capture.loads(capture.dumps([long, 1])) == [long, 1]
    assert capture.loads(capture.dumps([long, 1])) == [long, 1]
    assert capture.loads(capture.dumps([long, 2])) == [long, 2]
    bundle = capture.encode([long, 3])
    assert capture.decode(bundle.header, bundle.frames) == [long, 3]
    assert capture.decode(capture.encode([long, 4]).header, []) == [long, 4]


def test_a_plan_made_under_a_permissive_policy_is_not_used_under_a_stricter_one(stateful):
    permissive, strict = StdlibDestination(), StdlibDestination(missing={"os", "posixpath"})
    data = capture.dumps(stateful.joined, policy=permissive)
    for _ in range(2):  # the second load replays the plan
        assert capture.loads(data, policy=permissive)("a", "b") == "a/b"
    with pytest.raises(ImportError, match="does not provide module 'os'"):
        capture.loads(data, policy=strict)("a", "b")
    # A reference the strict policy refuses at load time is refused on every load.
    refs = capture.dumps([len, __import__("os").path.join], policy=permissive)
    capture.loads(refs, policy=permissive)
    capture.loads(refs, policy=permissive)
    for _ in range(2):
        with pytest.raises(ImportError, match="does not provide module 'posixpath'"):
            capture.loads(refs, policy=strict)


def test_a_plan_is_kept_per_tenant(stateful):
    data = capture.dumps(stateful.joined)
    capture.loads(data, tenant="alice")
    before = capture.plan_cache_info()
    capture.loads(data, tenant="bob")
    after = capture.plan_cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses + 1)
    capture.clear_caches()
    assert capture.plan_cache_info().plans == 0


def test_a_replay_needs_the_sources_it_was_sent_by_digest(stateful):
    store = {}
    full = capture.encode(stateful.joined)
    capture.decode(full.header, full.frames, source_store=store)
    by_digest = capture.encode(stateful.joined, known_sources=set(store))
    for _ in range(2):
        assert capture.decode(by_digest.header, by_digest.frames, source_store=store)("a", "b") == "a/b"
    store.clear()  # the receiver forgot the text: the replay must ask for it again
    with pytest.raises(capture.MissingSources) as missing:
        capture.decode(by_digest.header, by_digest.frames, source_store=store)
    assert missing.value.digests == list(full.source_digests)
    capture.decode(full.header, full.frames, source_store=store)  # a replay with text teaches the store
    assert set(store) == set(full.source_digests)


def test_every_node_tag_has_a_builder():
    table = decoder.Decoder.BUILDERS
    decoder.check_builders(table, decoder.Decoder)
    decoder.check_builders(DataDecoder.BUILDERS, DataDecoder)
    assert set(table) == fmt.TAGS and DataDecoder.BUILDERS[fmt.REFERENCE] is DataDecoder._ref
    with pytest.raises(RuntimeError, match=r"no builder for \['list'\]"):
        decoder.check_builders({tag: b for tag, b in table.items() if tag != fmt.LIST}, decoder.Decoder)
    # A subclass overriding a builder must name it in its table.
    with pytest.raises(RuntimeError, match=r"overrides the builders of \['tuple'\]"):
        type("Forgetful", (decoder.Decoder,), {"_tuple": lambda self, index, fields: ()})


SAME_NAME = '''\
import plan_threads_sync


class Probe:
    plan_threads_sync.arrive(globals())
'''


def test_two_threads_loading_one_module_name_keep_their_own_module(tmp_path):
    """A class statement runs while its module is in sys.modules (dataclasses look it up
    there). Thread A's load waits inside its class statement while thread B loads a module
    of the same name: B must not see (or remove) A's module, nor A B's."""
    (tmp_path / "plan_same_name.py").write_text(SAME_NAME)
    a_inside, b_done = threading.Event(), threading.Event()
    sync = types.ModuleType("plan_threads_sync")
    seen = {}  # thread name -> whether sys.modules held its own module while its class statement ran

    def arrive(namespace):
        name = threading.current_thread().name
        if name == "a":  # let B start, and give it the chance to run meanwhile
            a_inside.set()
            b_done.wait(timeout=1.0)
        if name in ("a", "b"):
            module = sys.modules.get(namespace["__name__"])
            seen[name] = module is not None and module.__dict__ is namespace

    sync.arrive = arrive
    sys.modules["plan_threads_sync"] = sync
    destination = StdlibDestination(extra={"plan_threads_sync"})
    sys.path.insert(0, str(tmp_path))
    try:
        data = capture.dumps(importlib.import_module("plan_same_name").Probe, policy=destination)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("plan_same_name", None)

    def load_b():
        capture.loads(data, policy=destination)
        b_done.set()

    thread_a = threading.Thread(target=capture.loads, args=(data,), kwargs={"policy": destination}, name="a")
    thread_a.start()
    assert a_inside.wait(timeout=30)
    thread_b = threading.Thread(target=load_b, name="b")
    thread_b.start()
    thread_a.join(timeout=30)
    thread_b.join(timeout=30)
    sys.modules.pop("plan_threads_sync", None)
    assert seen == {"a": True, "b": True}
    assert "plan_same_name" not in sys.modules


def test_a_replay_registers_shipped_lines_again_after_they_were_released(stateful, tmp_path):
    import linecache

    data = capture.dumps(stateful.joined)
    (tmp_path / "plan_stateful.py").unlink()  # as on a worker: the file is not there
    path = str(tmp_path / "plan_stateful.py")
    linecache.checkcache(path)  # what capture read while dumping
    line = STATEFUL.splitlines().index("def joined(*parts):") + 1
    for _ in range(2):
        capture.release_lines()
        assert linecache.getline(path, line) == ""
        capture.loads(data)
        assert linecache.getline(path, line) == "def joined(*parts):\n"
    capture.release_lines()


def test_plans_are_bounded_by_the_header_bytes_they_hold(monkeypatch):
    """A plan keeps its header's values alive: one for a large header is not kept, and all
    plans together stay within their byte bound."""
    capture.clear_caches()
    monkeypatch.setattr(decoder, "MAX_PLAN_BYTES", 2000)
    monkeypatch.setattr(decoder, "MAX_PLANS_BYTES", 3000)
    large = capture.dumps(list(range(1000)))
    for _ in range(2):
        before = capture.plan_cache_info()
        assert capture.loads(large) == list(range(1000))
        assert capture.plan_cache_info().hits == before.hits  # never replayed: not kept
    for n in range(20):
        small = capture.dumps([n] * 100)  # a 256-byte header
        capture.loads(small)
        assert capture.loads(small) == [n] * 100
    assert 0 < capture.plan_cache_info().plans <= 3000 // 256
    capture.clear_caches()


def test_a_plan_made_under_one_sandbox_profile_is_not_used_under_a_stricter_one():
    import functools

    import sandbox

    permissive, strict = sandbox.Policy.load("default"), sandbox.Policy.load("ndif-allowlist")
    data = capture.dumps([functools.reduce], policy=permissive)
    for _ in range(2):
        assert capture.loads(data, policy=permissive) == [functools.reduce]
    for _ in range(2):
        with pytest.raises(ImportError, match="functools"):
            capture.loads(data, policy=strict)
