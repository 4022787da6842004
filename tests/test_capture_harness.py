"""The loading-side harness itself: it notices a leaked module, reports each case with its
own error at the check's real file and line, and catches unpickling. Without these the
other capture tests could pass while proving nothing."""
import pytest

from capture_support.harness import CaseList, ship_and_load

cases = CaseList()


@cases.case(build=lambda user: [1, 2])
def check_that_fails(obj, expected):
    assert obj == [1, 3]


@cases.case(build=lambda user: b"data")
def check_that_unpickles(obj, expected):
    import pickle

    pickle.loads(pickle.dumps(obj))


@cases.case(build=lambda user: "fine")
def check_that_passes(obj, expected):
    return obj.upper()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # json stands in for a user module that leaked onto the loading side's path.
    return ship_and_load(cases, None, tmp_path_factory.mktemp("load"), absent_modules=["json"])


def test_a_module_the_loading_side_must_not_see_is_reported(run):
    assert len(run.isolation) == 1 and "'json'" in run.isolation[0]
    with pytest.raises(pytest.fail.Exception, match="not isolated"):
        run.result("that_passes")


def test_each_case_reports_its_own_outcome_at_the_checks_line(run):
    failing = run.outcomes["that_fails"].load_result
    assert not failing["ok"]
    with open(__file__) as source:
        assert_line = next(number for number, line in enumerate(source, 1) if line.strip() == "assert obj == [1, 3]")
    assert f'File "{__file__}", line {assert_line}, in check_that_fails' in failing["error"]
    assert "assert [1, 2] == [1, 3]" in failing["error"]
    assert run.outcomes["that_passes"].load_result == {"ok": True, "value": "FINE"}


def test_unpickling_on_the_loading_side_is_caught(run):
    unpickling = run.outcomes["that_unpickles"].load_result
    assert not unpickling["ok"] and "GuardHit: pickle.loads was called" in unpickling["error"]
