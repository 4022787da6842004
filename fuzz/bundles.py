"""Mutated bundles, decoded in child processes with time and memory limits.

Case ``i`` of a run is a pure function of (seed, i): the parent hands each child a range
of case numbers, the child builds the cases itself and reports one line per case, so a
crash or hang is pinned to one case number and the run goes on from the next one.

Outcomes: ``ok`` (decoded), ``refused`` (``BundleError``), ``policy`` (the policy's
``ImportError`` or ``PolicyKill``) are fine; ``wrong`` (any other exception), ``memory``
(``MemoryError`` under the child's memory limit), ``hang`` (over the time limit) and
``crash`` (the child died) are failures.
"""
from __future__ import annotations

import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

FINE = ("ok", "refused", "policy")
FAILURES = ("wrong", "memory", "hang", "crash")
POLICIES = ("default", "data-only", "profile")
#: The profile the restrictive runs decode under (a shipped server profile).
PROFILE = "ndif-allowlist"


# --- msgpack values of every type -----------------------------------------------------

@dataclass(frozen=True)
class Raw:
    """msgpack bytes written verbatim where a value goes (sizes no packer would write)."""
    data: bytes


def _nested(depth: int, kind: str) -> Raw:
    return Raw((b"\x91" if kind == "array" else b"\x81\xa1k") * depth + b"\xc0")


def sample_values() -> list[Any]:
    """One or more values of every msgpack type, edge sizes included."""
    import msgpack

    return [
        None, True, False, 0, 1, -1, 127, 128, -32, -33, 255, 2**16, 2**32, 2**63 - 1, -(2**63), 2**64 - 1,
        0.0, -1.5, float("nan"), float("inf"), Raw(b"\xca\x7f\xc0\x00\x00"),  # float32 NaN
        "", "x", "sourcebox.bundle", "y" * 300, "\u00e9" * 40, b"", b"\x00", b"\xff" * 70_000,
        [], [1], [None] * 20, [[[[]]]], {}, {"a": 1}, {1: 2}, {None: []}, {b"k": 1.5}, {2.5: 1},
        msgpack.ExtType(1, b"\x00\x00\x00\x00"), msgpack.ExtType(1, b"\xff\xff\xff\xff"),
        msgpack.ExtType(1, b"\x00"), msgpack.ExtType(2, b"\x00\x00\x00\x01"), Raw(b"\xd7\xff" + b"\x00" * 8),
        _nested(1_000, "array"), _nested(1_000, "map"), _nested(5_000, "array"), _nested(200_000, "array"),
        "__name__", "__dict__", "__bases__", "__class__",
        Raw(b"\xdd\xff\xff\xff\xff"), Raw(b"\xdf\xff\xff\xff\xff"), Raw(b"\xc6\xff\xff\xff\xff"),
        Raw(b"\xdb\xff\xff\xff\xff"), Raw(b"\xc9\xff\xff\xff\xff\x01"), Raw(b"\xc1"),
    ]


def pack(value: Any) -> bytes:
    """``value`` as msgpack, with ``Raw`` parts spliced in verbatim."""
    import msgpack

    raws: dict[str, bytes] = {}

    def swap(node: Any) -> Any:
        if isinstance(node, Raw):
            key = f"\0raw{len(raws)}\0"
            raws[key] = node.data
            return key
        if isinstance(node, dict):
            return {swap(k): swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    packed = msgpack.packb(swap(value), use_bin_type=True)
    for key, data in raws.items():
        packed = packed.replace(msgpack.packb(key), data, 1)
    return packed


# --- the corpus ---------------------------------------------------------------------------

@dataclass
class Base:
    name: str
    header: bytes
    frames: list[memoryview]
    tree: dict
    data: bytes = b""
    paths: list[tuple] = field(default_factory=list)


def corpus() -> list[Base]:
    import capture
    import msgpack

    from . import corpus as values

    bases = []
    for name, make in (("code", values.code_values), ("data", values.data_values), ("cycle", values.cyclic)):
        bundle = capture.encode(make())
        tree = msgpack.unpackb(bundle.header, raw=False, strict_map_key=False)
        frames = [memoryview(bytes(f)) for f in bundle.frames]
        bases.append(Base(name, bytes(bundle.header), frames, tree, bundle.to_bytes(), list(header_paths(tree))))
    return bases


def header_paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every position in a decoded header tree, parents before children."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from header_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from header_paths(value, prefix + (index,))


def replaced(tree: Any, path: tuple, value: Any) -> Any:
    """A copy of ``tree`` with the value at ``path`` replaced (the rest shared)."""
    if not path:
        return value
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    copy[path[0]] = replaced(tree[path[0]], path[1:], value)
    return copy


def _ref(index: int) -> Any:
    import msgpack

    return msgpack.ExtType(1, struct.pack(">I", index))


# --- nodes written by hand: what a hostile sender would send on purpose ----------------

def crafted_nodes(policy: str) -> list[list]:
    """Nodes that are well-formed but ask for a lot: sizes, iterations, special names.
    Each is appended to the node table and made the root. Constructor calls are crafted
    for ``data-only`` only: under a policy that runs code, naming a constructor is
    running code (docs/REMOTABLE.md), and its limits are the worker's."""
    def ref(module: str, name: str) -> list:
        return ["ref", module, name]

    huge, shape = 2**33, [2**20, 2**20]
    nodes: list[list] = [
        ["tensor", [0, "float32", shape, [0, 0], 0, False, False, "cpu"]],
        ["tensor", [0, "float32", [2**62], [1], 0, False, False, "cpu"]],
        ["tensor", [0, "float32", [-4, 4], [1, 1], 0, False, False, "cpu"]],
        ["tensor", [0, "float32", [4], [-1], 3, False, False, "cpu"]],
        ["tensor", [0, "complex128", [1] * 64, [0] * 64, 0, True, True, "cuda:0"]],
        ["tensor", [0, "float32", shape, [0, 0], 0, False, False, "meta"]],
        ["ndarray", 0, "<f4", [2**31, 2**31]], ["ndarray", 0, "V1099511627776", [1]],
        ["ndarray", 0, "O", [4]], ["ndarray", 0, "(65536,65536)f4", []],
        ["bigint", "9" * 100_001], ["bigint", "9" * 4000], ["bigint", "0x10"],
        ["bytearray", b"\x00" * 65536], ["bytesframe", 2**31], ["bytesframe", -1],
        ["list", [_ref(2**32 - 1)]], ["dict", [[_ref(0), 1]]], ["str", "x" * 1_000_000],
        ["surrogates", b"\xed\xa0\x80" * 1000], ["complex", 1.0], ["odict", [[1, 2]]],
    ]
    if policy == "data-only":
        nodes += [
            ["object", ref("builtins", "bytes"), [huge], None, None, None, None],
            ["object", ref("builtins", "bytearray"), [huge], None, None, None, None],
            ["object", ref("builtins", "str"), [b"x", "utf-32"], None, None, None, None],
            ["object", ref("builtins", "tuple"), ["range"], None, None, None, None],
            ["object", ref("builtins", "frozenset"), ["range"], None, None, None, None],
            ["object", ref("builtins", "list"), None, None, None, "range", None],
            ["object", ref("builtins", "dict"), None, None, None, None, "range"],
            ["object", ref("builtins", "list"), None, None, None, "count", None],
            ["object", ref("builtins", "int"), ["9" * 5000], None, None, None, None],
            ["object", ref("torch", "Tensor"), None, None, ["tensor-state"], None, None],
            ["reduce", ref("collections", "deque"), ["range"], None, None, None],
            ["reduce", ref("collections", "deque"), [[], 2**62], None, None, None],
            ["reduce", ref("collections", "Counter"), ["range"], None, None, None],
            ["reduce", ref("torch", "Size"), ["range"], None, None, None],
            ["reduce", ref("torch", "Size"), ["count"], None, None, None],
            ["reduce", ref("fractions", "Fraction"), ["1e999999999"], None, None, None],
            ["reduce", ref("fractions", "Fraction"), ["1/" + "7" * 5000], None, None, None],
            ["reduce", ref("decimal", "Decimal"), ["9e999999999"], None, None, None],
            ["reduce", ref("types", "SimpleNamespace"), ["range"], None, None, None],
            ["reduce", ref("numpy", "dtype"), [["f4", [2**31, 2**31]]], None, None, None],
            ["reduce", ref("numpy", "dtype"), ["V" + str(2**40)], None, None, None],
            ["reduce", ref("datetime", "timedelta"), [10**18], None, None, None],
        ]
    return nodes


def _with_node(tree: dict, node: list) -> dict:
    """The header with ``node`` (and the helpers it names) appended and made the root."""
    nodes = list(tree["nodes"])

    def add(entry: list) -> Any:
        nodes.append(entry)
        return _ref(len(nodes) - 1)

    def resolve(part: Any) -> Any:
        if isinstance(part, list) and len(part) == 3 and part[0] == "ref":
            return add(part)
        if part == "range":  # range(2**62): small to send, huge to iterate
            return add(["reduce", add(["ref", "builtins", "range"]), add(["tuple", [2**62]]), None, None, None])
        if part == "count":  # itertools.count(): never ends
            return add(["object", add(["ref", "itertools", "count"]), None, None, None, None, None])
        if part == ["tensor-state"]:  # Tensor.__setstate__'s legacy (storage, offset, size, stride)
            empty = add(["object", add(["ref", "torch", "Tensor"]), None, None, None, None, None])
            return add(["tuple", [empty, 0, add(["tuple", [2**31]]), add(["tuple", [1]])]])
        if isinstance(part, list):
            return add(["tuple", [resolve(p) for p in part]])
        return part

    tag, *fields = node
    if tag in ("object", "reduce"):
        fields = [resolve(f) if f is not None else None for f in fields]
    return {**tree, "nodes": nodes + [[tag, *fields]], "root": _ref(len(nodes))}


# --- cases --------------------------------------------------------------------------------

MUTATORS = ("bitflip", "overwrite", "truncate", "splice", "field", "rekey", "frameref", "crafted", "tablesize")


def systematic(bases: list[Base]) -> list[tuple[str, int, tuple, int]]:
    """Every top-level header field of every base with every sample value, under every
    policy; then every path of the smallest base with every sample value."""
    import capture.format as fmt

    count = len(sample_values())
    plan = [("field", b, (key,), v) for b in range(len(bases)) for key in fmt.HEADER_KEYS for v in range(count)]
    smallest = min(range(len(bases)), key=lambda b: len(bases[b].paths))
    plan += [("field", smallest, path, v) for path in bases[smallest].paths[1:] for v in range(count)]
    return plan


def make_case(seed: int, number: int, bases: list[Base], plan: list, values: list) -> tuple[str, str, bytes]:
    """(policy, mutator, bundle bytes) of case ``number``."""
    from capture import format as fmt

    rng = random.Random(f"{seed}:{number}")
    policy = POLICIES[number % len(POLICIES)]
    if number // len(POLICIES) < len(plan):
        mutator, b, path, v = plan[number // len(POLICIES)]
        base = bases[b]
        return policy, mutator, fmt.join(pack(replaced(base.tree, path, values[v])), base.frames)
    base = rng.choice(bases)
    data = base.data
    mutator = rng.choice(MUTATORS)
    header_end = len(base.header)
    if mutator == "bitflip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(header_end) if rng.random() < 0.85 else rng.randrange(len(out))
            out[position] ^= 1 << rng.randrange(8)
        return policy, mutator, bytes(out)
    if mutator == "overwrite":
        width = rng.choice((1, 2, 4, 8, 16))
        at = rng.randrange(max(1, header_end - width))
        fill = rng.choice((b"\xff" * width, b"\x00" * width, rng.randbytes(width)))
        return policy, mutator, data[:at] + fill + data[at + width:]
    if mutator == "truncate":
        return policy, mutator, data[:rng.randrange(len(data))]
    if mutator == "splice":
        other = rng.choice(bases).data
        if rng.random() < 0.5:
            return policy, mutator, data[:rng.randrange(len(data))] + other[rng.randrange(len(other)):]
        at = rng.randrange(header_end)
        chunk_at = rng.randrange(len(other))
        return policy, mutator, data[:at] + other[chunk_at:chunk_at + rng.randint(1, 64)] + data[at:]
    if mutator == "field":
        path = rng.choice(base.paths)
        return policy, mutator, fmt.join(pack(replaced(base.tree, path, rng.choice(values))), base.frames)
    if mutator == "rekey":  # a map's key renamed: non-str keys, special names (class attrs, globals)
        maps = [p for p in base.paths if isinstance(_at(base.tree, p), dict) and _at(base.tree, p)]
        path = rng.choice(maps)
        old = dict(_at(base.tree, path))
        key = rng.choice(list(old))
        new_key = rng.choice([v for v in values if isinstance(v, (type(None), bool, int, float, str, bytes))])
        renamed = {(new_key if k == key else k): v for k, v in old.items()}
        return policy, mutator, fmt.join(pack(replaced(base.tree, path, renamed)), base.frames)
    if mutator == "frameref":  # every integer field of a frame-naming node, out of range
        spots = [p for p in base.paths if len(p) >= 3 and p[0] == "nodes" and isinstance(_at(base.tree, p), int)]
        bad = rng.choice((-1, len(base.frames), 2**32 - 1, 2**63 - 1, -(2**63)))
        path = rng.choice(spots) if spots else ("frames",)
        return policy, mutator, fmt.join(pack(replaced(base.tree, path, bad)), base.frames)
    if mutator == "tablesize":  # frame table entries with huge or negative offsets and lengths
        table = [list(entry) for entry in base.tree["frames"]] or [[0, 0]]
        slot = rng.randrange(len(table))
        table[slot][rng.randrange(2)] = rng.choice((2**31, 2**32 - 1, 2**62, 2**64 - 1, -1))
        return policy, mutator, fmt.join(pack({**base.tree, "frames": table}), base.frames)
    node = rng.choice(crafted_nodes(policy))
    return policy, mutator, fmt.join(pack(_with_node(base.tree, node)), base.frames)


def _at(tree: Any, path: tuple) -> Any:
    for part in path:
        tree = tree[part]
    return tree


# --- the child ----------------------------------------------------------------------------

class _Hang(BaseException):
    """Raised by the child's alarm: the case ran past its time limit."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Hang()


def _policy(name: str) -> Any:
    import capture

    if name == "data-only":
        return capture.DATA_ONLY
    if name == "profile":
        import sandbox
        return sandbox.Policy.load(PROFILE)
    return capture.DEFAULT


def _classify(exc: BaseException) -> str:
    import capture

    if isinstance(exc, _Hang):
        return "hang"
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, capture.BundleError):
        return "refused"
    if isinstance(exc, ImportError) or type(exc).__name__ == "PolicyKill":
        return "policy"
    return "wrong"


def child(seed: int, start: int, stop: int, memory_mb: int, case_seconds: float) -> None:
    """Decode cases ``start..stop-1``, one JSON line each on stdout."""
    import capture
    import numpy  # noqa: F401 - loaded before the limits, as a worker has them
    import sandbox  # noqa: F401
    import torch  # noqa: F401

    bases = corpus()
    plan, values = systematic(bases), sample_values()
    policies = {name: _policy(name) for name in POLICIES}
    limit = _data_segment() + memory_mb * 2**20  # what it holds now, plus what one decode may add
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    signal.signal(signal.SIGALRM, _on_alarm)
    out = sys.stdout
    for number in range(start, stop):
        policy, mutator, data = make_case(seed, number, bases, plan, values)
        signal.setitimer(signal.ITIMER_REAL, case_seconds)
        try:
            capture.loads(data, policy=policies[policy])
            outcome, detail = "ok", ""
        except BaseException as exc:  # classified: the wrong kinds are what this looks for
            outcome = _classify(exc)
            detail = "" if outcome in FINE else f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        out.write(json.dumps([number, policy, mutator, outcome, detail]) + "\n")
        out.flush()


def _data_segment() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


# --- the parent ---------------------------------------------------------------------------

@dataclass
class Report:
    counts: dict = field(default_factory=dict)        # outcome -> n
    by_policy: dict = field(default_factory=dict)     # policy -> outcome -> n
    failures: list = field(default_factory=list)      # [number, policy, mutator, outcome, detail]
    cases: int = 0
    seconds: float = 0.0

    def add(self, number: int, policy: str, mutator: str, outcome: str, detail: str) -> None:
        self.cases += 1
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        per = self.by_policy.setdefault(policy, {})
        per[outcome] = per.get(outcome, 0) + 1
        if outcome in FAILURES:
            self.failures.append([number, policy, mutator, outcome, detail])

    @property
    def failed(self) -> int:
        return sum(self.counts.get(kind, 0) for kind in FAILURES)


def run(cases: int, *, first: int = 0, seed: int = 1, jobs: int = 2, memory_mb: int = 1024, case_seconds: float = 10.0,
        progress: Any = None) -> Report:
    """Decode ``cases`` mutated bundles in ``jobs`` child processes at a time."""
    report = Report()
    started = time.monotonic()
    chunks = [(first + begin, first + end) for begin, end in _split(cases, jobs)]
    children = [_Child(seed, begin, end, memory_mb, case_seconds) for begin, end in chunks]
    while any(not c.done for c in children):
        for c in children:
            for row in c.poll():
                report.add(*row)
        if progress is not None:
            progress(report)
    report.seconds = time.monotonic() - started
    return report


def _split(cases: int, jobs: int) -> list[tuple[int, int]]:
    size = -(-cases // jobs)
    return [(begin, min(cases, begin + size)) for begin in range(0, cases, size)]


class _Child:
    """One child process working through a range of cases, restarted after a crash or
    hang at the case after the one that took it down."""

    #: Seconds a fresh child may take to import torch and encode the corpus.
    SETUP_SECONDS = 120.0

    def __init__(self, seed: int, begin: int, end: int, memory_mb: int, case_seconds: float):
        self.args = (seed, memory_mb, case_seconds)
        self.next, self.end = begin, end
        self.done = begin >= end
        self.process: subprocess.Popen | None = None
        if not self.done:
            self._start()

    def _start(self) -> None:
        seed, memory_mb, case_seconds = self.args
        code = f"from fuzz.bundles import child; child({seed}, {self.next}, {self.end}, {memory_mb}, {case_seconds})"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                        stderr=self.stderr, env=env, cwd=_ROOT)
        os.set_blocking(self.process.stdout.fileno(), False)
        self.last_output, self.fresh, self.buffer = time.monotonic(), True, b""

    def poll(self) -> list[list]:
        if self.done:
            return []
        rows = []
        chunk = self.process.stdout.read()
        if chunk:
            self.buffer += chunk
            self.last_output, self.fresh = time.monotonic(), False
            *lines, self.buffer = self.buffer.split(b"\n")
            for line in lines:
                row = json.loads(line)
                rows.append(row)
                self.next = row[0] + 1
        if self.next >= self.end:
            self._close()
            self.done = True
            return rows
        limit = self.args[2] * 3 + (self.SETUP_SECONDS if self.fresh else 0.0)
        if self.process.poll() is not None and not chunk:
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace")[-600:]
            if self.fresh and self.process.returncode == 1:  # a Python error before the first case
                raise RuntimeError(f"the fuzzing child failed to start:\n{tail}")
            rows.append([self.next, "?", "?", "crash", f"exit {self.process.returncode}: {tail}"])
            self._skip()
        elif time.monotonic() - self.last_output > limit:
            rows.append([self.next, "?", "?", "hang", "no answer within the watchdog's limit"])
            self._skip()
        elif not chunk:
            time.sleep(0.02)
        return rows

    def _skip(self) -> None:
        """Go on from the case after the one that took the child down."""
        self._close()
        self.next += 1
        if self.next >= self.end:
            self.done = True
        else:
            self._start()

    def _close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.stderr.close()


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
