"""Bytes that are not a good bundle (truncated, garbage, another format version, hostile)
raise BundleError: never a bare KeyError or IndexError, never a crash, never a hang."""
import json
import pickle
import random

import msgpack
import numpy as np
import pytest

import capture
from capture_support.harness import REPO_ROOT, SUPPORT_DIR, UserCode, run_python

pytestmark = pytest.mark.timeout(120)

SENTINEL = "__hostile_value_goes_here__"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A bundle with code, data and frames, as bytes and as header + frames."""
    with UserCode(tmp_path_factory.mktemp("user"), ["mymethods", "myclasses"]) as user:
        shipped = {
            "counter": user.mymethods.make_counter(1), "config": user.myclasses.TrainConfig(),
            "array": np.arange(64, dtype=np.float32), "blob": bytes(range(256)) * 512, "words": {"a", "b"},
        }
        data = capture.dumps(shipped)
        bundle = capture.encode(shipped)
        return data, bundle.header, [bytes(frame) for frame in bundle.frames]


def test_every_truncation_is_refused(good):
    data, header, _ = good
    lengths = set(range(0, min(len(data), len(header) + 256)))
    lengths.update(range(len(header), len(data), max(1, (len(data) - len(header)) // 200)))
    lengths.add(len(data) - 1)
    for length in sorted(lengths):
        with pytest.raises(capture.BundleError):
            capture.loads(data[:length])


def garbage_inputs():
    rng = random.Random(20240229)
    samples = [b"", b"\x00", b"\xff" * 100, b"PK\x03\x04" + bytes(60), b'{"format": "sourcebox.bundle"}',
               msgpack.packb(None), msgpack.packb([]), msgpack.packb({}), msgpack.packb("sourcebox.bundle"),
               msgpack.packb({"format": "someone.else", "version": 1}), msgpack.packb([1, 2, 3]) + b"tail"]
    samples += [bytes(rng.getrandbits(8) for _ in range(size)) for size in (1, 2, 7, 64, 500, 4096) for _ in range(3)]
    return samples


@pytest.mark.parametrize("garbage", garbage_inputs(), ids=lambda data: f"{len(data)}B-{data[:6].hex()}")
def test_garbage_is_refused(garbage):
    with pytest.raises(capture.BundleError):
        capture.loads(garbage)


class TouchOnUnpickle:
    """Pickles to a call that creates a file: a pickle-based reader would run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_is_refused_without_being_run(tmp_path):
    marker = tmp_path / "unpickled"
    hostile = pickle.dumps(TouchOnUnpickle(marker))
    with pytest.raises(capture.BundleError):
        capture.loads(hostile)
    assert not marker.exists()


def header_with_field(header: bytes, key: str, value) -> bytes:
    fields = msgpack.unpackb(header, raw=False, strict_map_key=False)
    assert key in fields, f"the header has no {key!r} field: {sorted(fields)}"
    fields[key] = value
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize("version", [2**31, -1, "1", None, [1]])
def test_another_format_version_is_refused_by_name(good, version):
    _, header, frames = good
    with pytest.raises(capture.BundleError, match="version"):
        capture.decode(header_with_field(header, "version", version), frames)


def test_another_format_name_is_refused(good):
    _, header, frames = good
    with pytest.raises(capture.BundleError):
        capture.decode(header_with_field(header, "format", "pickle"), frames)


def test_the_producers_python_version_is_information_only(good):
    _, header, frames = good
    fields = msgpack.unpackb(header, raw=False, strict_map_key=False)
    python_keys = [key for key in fields if "python" in str(key).lower()]
    assert python_keys, f"the header does not record the producer's Python version: {sorted(fields)}"
    for key in python_keys:
        fields[key] = "3.99.0 (from the future)"
    loaded = capture.decode(msgpack.packb(fields, use_bin_type=True), frames)
    assert loaded["counter"]() == 2


def with_raw_value(header: bytes, raw: bytes) -> bytes:
    """The header with one more field whose msgpack bytes are ``raw``, verbatim."""
    fields = msgpack.unpackb(header, raw=False, strict_map_key=False)
    fields["extra"] = SENTINEL
    packed = msgpack.packb(fields, use_bin_type=True)
    return packed.replace(msgpack.packb(SENTINEL), raw)


HOSTILE_VALUES = {
    "array_claiming_4g_items": b"\xdd\xff\xff\xff\xff",
    "map_claiming_4g_pairs": b"\xdf\xff\xff\xff\xff",
    "bin_claiming_4gb": b"\xc6\xff\xff\xff\xff",
    "str_claiming_4gb": b"\xdb\xff\xff\xff\xff",
    "ext_claiming_4gb": b"\xc9\xff\xff\xff\xff\x01",
    "arrays_nested_100k_deep": b"\x91" * 100_000 + b"\xc0",
    "maps_nested_100k_deep": b"\x81\xa1k" * 100_000 + b"\xc0",
}


@pytest.mark.parametrize("name", HOSTILE_VALUES)
def test_hostile_msgpack_inside_a_header_is_refused(good, name):
    _, header, frames = good
    hostile = with_raw_value(header, HOSTILE_VALUES[name])
    with pytest.raises(capture.BundleError):
        capture.decode(hostile, frames)
    with pytest.raises(capture.BundleError):
        capture.loads(hostile + b"".join(frames))


@pytest.mark.parametrize("name", HOSTILE_VALUES)
def test_hostile_msgpack_alone_is_refused(name):
    with pytest.raises(capture.BundleError):
        capture.loads(HOSTILE_VALUES[name])


def test_absurd_lengths_anywhere_in_the_first_bytes_are_refused_or_harmless(good):
    """Overwrite each 4- and 8-byte window near the start (where lengths and counts live)
    with 0xff bytes: loading must fail cleanly or succeed, never run out of memory or hang."""
    data, _, _ = good
    for width in (4, 8):
        for start in range(0, 96):
            mangled = data[:start] + b"\xff" * width + data[start + width:]
            try:
                capture.loads(mangled)
            except capture.BundleError:
                pass


def test_missing_and_short_frames_are_refused(good):
    _, header, frames = good
    with pytest.raises(capture.BundleError):
        capture.decode(header, [])
    with pytest.raises(capture.BundleError):
        capture.decode(header, frames[:-1])
    with pytest.raises(capture.BundleError):
        capture.decode(header, [frame[: len(frame) // 2] for frame in frames])


@pytest.mark.parametrize("not_bytes", ["a string", None, 12, ["list"]], ids=repr)
def test_loads_names_a_wrong_argument_type(not_bytes):
    with pytest.raises((capture.BundleError, TypeError), match=type(not_bytes).__name__):
        capture.loads(not_bytes)


def test_loads_accepts_bytearray_and_memoryview(good):
    data, _, _ = good
    for form in (bytearray(data), memoryview(data)):
        assert capture.loads(form)["counter"]() == 2


@pytest.mark.timeout(240)
def test_wrong_types_in_every_header_field_raise_only_bundle_errors(tmp_path):
    """Every header value replaced, one at a time, by a wrong type or absurd size; run in a
    separate process so that a crash shows up as a failure here."""
    pytest.importorskip("torch", reason="the fuzzed bundle holds a tensor")
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    with UserCode(user_dir, ["mymethods", "myclasses"]):
        pass  # the fuzzer imports its own copies
    report = tmp_path / "report.json"
    fuzzed = run_python([str(SUPPORT_DIR / "fuzz_header.py"), str(REPO_ROOT), str(user_dir), str(report)],
                        cwd=tmp_path, timeout=200)
    assert fuzzed.returncode == 0, f"the fuzzing process died:\n{fuzzed.stderr[-6000:]}"
    outcome = json.loads(report.read_text())
    assert outcome["mutations"] > 500
    failures = outcome["failures"]
    listing = "\n".join(f"{path} := {value}: {error}" for path, value, error in failures[:40])
    assert not failures, f"{len(failures)} of {outcome['mutations']} mutated headers raised something else:\n{listing}"
