"""Golden bundles: bundles written by an earlier state of the code, committed under
tests/golden/v<version>/ (made by scripts/make_goldens.py from tests/golden/cases.py).

Bundles outlive the code that wrote them (a source store, a file on disk, a worker of
another release), so the format may change only with its version number. These tests
notice a change in either direction: the reader no longer loads a golden of its own
version as it did, or the writer no longer writes what the golden holds.
"""
from pathlib import Path

import pytest

import capture
from capture import format as fmt
from golden.cases import CASES, persistent_id, persistent_load

GOLDEN = Path(__file__).resolve().parent / "golden"
CURRENT = GOLDEN / f"v{fmt.FORMAT_VERSION}"
ALL_GOLDENS = sorted(GOLDEN.glob("v*/*.bundle"))


def format_changed(what: str) -> str:
    version = fmt.FORMAT_VERSION
    return (
        f"{what}.\nThe bundle format changed. If a reader of version {version} would misread what the "
        f"code now writes, or this code cannot read version-{version} bundles any more: bump FORMAT_VERSION "
        f"in capture/format.py, describe the change in docs/FORMAT.md, and write goldens for the new "
        f"version with `python scripts/make_goldens.py` (keep the old ones). If old and new readers both "
        f"read both, regenerate the version-{version} goldens with the same script and say why in the commit."
    )


def test_every_case_has_a_golden_of_this_version():
    missing = [name for name in CASES if not (CURRENT / f"{name}.bundle").is_file()]
    assert not missing, (f"no golden bundle of format version {fmt.FORMAT_VERSION} for {missing}: run "
                         "`python scripts/make_goldens.py` and commit tests/golden/")


@pytest.mark.parametrize("path", ALL_GOLDENS, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_a_golden_loads_as_it_did_or_is_refused_by_version(path):
    data = path.read_bytes()
    version = int(path.parent.name[1:])
    if version != fmt.FORMAT_VERSION:  # readers refuse other versions rather than guess
        with pytest.raises(capture.BundleError, match=f"version {version} is not readable"):
            capture.loads(data)
        return
    try:
        value = capture.loads(data, persistent_load=persistent_load)
        CASES[path.stem][1](value)
    except Exception as error:
        raise AssertionError(format_changed(f"the golden {path.parent.name}/{path.name} no longer loads as it "
                                            f"did: {type(error).__name__}: {error}")) from error


def _first_difference(old, new, where="header"):
    if type(old) is not type(new) or not isinstance(old, (list, dict)):
        return None if old == new else f"{where}: {fmt.describe(old)} became {fmt.describe(new)}"
    if isinstance(old, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(key), new.get(key), f"{where}[{key!r}]")
            if found:
                return found
        return None
    for index, (a, b) in enumerate(zip(old, new)):
        found = _first_difference(a, b, f"{where}[{index}]")
        if found:
            return found
    return None if len(old) == len(new) else f"{where}: {len(old)} items became {len(new)}"


@pytest.mark.parametrize("name", CASES)
def test_the_encoder_still_writes_the_golden_of_this_version(name):
    golden = (CURRENT / f"{name}.bundle").read_bytes()
    written = capture.encode(CASES[name][0](), persistent_id=persistent_id).to_bytes()
    (old, old_start), (new, new_start) = fmt.unpack_header(golden), fmt.unpack_header(written)
    old.pop("python"), new.pop("python")  # the producer's Python, information only
    difference = _first_difference(old, new)
    assert difference is None, format_changed(f"encoding case {name!r} now differs from its golden at {difference}")
    old_frames = [bytes(f) for f in fmt.split_frames(memoryview(golden), old_start, old["frames"])]
    new_frames = [bytes(f) for f in fmt.split_frames(memoryview(written), new_start, new["frames"])]
    assert old_frames == new_frames, format_changed(f"encoding case {name!r} now writes other frame bytes")


def test_the_goldens_use_every_node_tag():
    used = set()
    for path in CURRENT.glob("*.bundle"):
        used.update(node[0] for node in fmt.unpack_header(path.read_bytes())[0]["nodes"])
    assert not fmt.TAGS - used, (f"no golden bundle holds a node tagged {sorted(fmt.TAGS - used)}: add a case "
                                 "to tests/golden/cases.py and run `python scripts/make_goldens.py`")
