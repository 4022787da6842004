"""Corners found in review, each of which once broke dumps or changed data on load."""
import subprocess
import sys

import pytest
import torch

import capture
from capture_support.harness import CaseList, REPO_ROOT, UserCode, minimal_env, ship_and_load

USER_MODULES = ["corners"]
cases = CaseList()


def lazy_views():
    complex_values = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    return complex_values.conj(), torch._neg_view(torch.tensor([1.0, 2.0]))


@cases.case(build=lambda user: lazy_views())
def check_conjugate_and_negative_views_arrive_resolved(obj, expected):
    conjugate, negative = obj
    assert conjugate.tolist() == [1 - 2j, 3 + 4j]
    assert negative.tolist() == [-1.0, -2.0]


@cases.case(build=lambda user: user.corners)
def check_a_placeholder_does_not_shift_later_globals(obj, expected):
    assert obj.AFTER == "hello world" and obj.GREETING == "hello world"
    try:
        obj.UNSHIPPABLE()
    except RuntimeError as error:
        assert "not shipped" in str(error) and "corners.UNSHIPPABLE" in str(error)
    else:
        raise AssertionError("using a placeholder should raise")


@cases.case(build=lambda user: user.corners.Selfy)
def check_class_attribute_holding_its_own_instance(obj, expected):
    assert type(obj.DEFAULT) is obj and obj.DEFAULT.value == 42


@cases.case(build=lambda user: user.corners.Cached())
def check_cached_property_comes_from_the_class_statement(obj, expected):
    assert obj.answer == 42


@cases.case(build=lambda user: user.corners.Renamed.method)
def check_method_renamed_by_a_decorator(obj, expected):
    assert obj.__name__ == "pretty" and obj(None) == "method"


def counter_class_and_increment(user):
    counter_class, increment = user.corners.make_counter_class()
    increment()
    return counter_class, increment


@cases.case(build=counter_class_and_increment)
def check_class_defined_in_a_function_shares_cells_with_sibling_closures(obj, expected):
    counter_class, increment = obj
    assert counter_class().current() == 1
    assert increment() == 2
    assert counter_class().current() == 2, "the class's methods no longer share the closure cell"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    with UserCode(tmp_path_factory.mktemp("user"), USER_MODULES) as user:
        return ship_and_load(cases, user, tmp_path_factory.mktemp("load"))


@pytest.mark.parametrize("name", cases.names)
def test_corner_travels(loaded, name):
    loaded.result(name)


def test_a_set_of_tensors_travels():
    loaded = capture.loads(capture.dumps({torch.zeros(2), torch.ones(2)}))
    assert sorted(t.sum().item() for t in loaded) == [0.0, 2.0]


def test_sets_of_frozensets_give_the_same_bytes_under_any_hash_seed(tmp_path):
    program = "import capture, hashlib; print(hashlib.sha256(capture.dumps(" \
              "{frozenset({'a'}), frozenset({'b'}), frozenset({'c', 'd'}), ('x', 1)})).hexdigest())"
    digests = {
        subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, check=True,
                       env=minimal_env(PYTHONHASHSEED=str(seed), PYTHONPATH=str(REPO_ROOT))).stdout
        for seed in (1, 2, 3, 4)
    }
    assert len(digests) == 1


def test_a_state_setter_is_refused_clearly():
    class Six:
        def __reduce__(self):
            return (Six, (), {}, None, None, lambda obj, state: None)

    with pytest.raises(capture.CaptureError, match=r"obj \(.*Six\): its __reduce__ names a state setter"):
        capture.dumps(Six())


def test_inspect_describes_a_bundle_sent_by_digest(tmp_path):
    def helper():
        return 1

    known = set(capture.encode(helper).source_digests)
    path = tmp_path / "by-digest.bin"
    path.write_bytes(capture.encode(helper, known_sources=known).to_bytes())
    shown = subprocess.run([sys.executable, "-m", "capture", "inspect", str(path)], capture_output=True, text=True,
                           cwd=REPO_ROOT, check=True).stdout
    assert f"sent by digest {known.pop()}" in shown


def test_encoder_rollback_restores_every_table_and_refuses_an_unlisted_one():
    # The encoder's tables roll back as one object (a placeholder for a name that cannot
    # travel undoes what the attempt had encoded); a table it could not undo is refused.
    from capture.encoder import _Tables

    tables = _Tables()
    tables.nodes.append("kept")
    tables.memo[1] = "kept"
    tables.strings["text"] = False
    entries = tables.dict()
    mark = tables.checkpoint()
    tables.nodes.append("dropped")
    tables.memo[1] = "overwritten"
    tables.memo[2] = "added"
    tables.strings["text"] = "shared"
    entries["name"] = "added"
    tables.rollback(mark)
    assert tables.nodes == ["kept"]
    assert dict(tables.memo) == {1: "kept"} and dict(tables.strings) == {"text": False} and not entries
    with pytest.raises(TypeError, match="rollback can undo"):
        tables.memo.pop(1)
    tables.forgotten = set()
    with pytest.raises(TypeError, match="encoder table 'forgotten' is a set"):
        tables.checkpoint()
