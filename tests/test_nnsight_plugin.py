"""The user's view: a project's own test suite, run with the sourcebox pytest plugin switched on.

The project is a temporary directory with a helper module and the test from issue 5,
unchanged; pytest runs in a subprocess with ``--sourcebox`` or ``SOURCEBOX=1``.
"""

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

USER_FILES = {
    "mymethods.py": '''\
        def normalize(x, dim=-1, eps=1e-8):
            return x / (x.norm(dim=dim, keepdim=True) + eps)
        ''',
    "conftest.py": '''\
        import pytest
        from nnsight import LanguageModel
        from runner import models


        @pytest.fixture(scope="session")
        def model():
            return LanguageModel(models.path("tiny-gpt2"))
        ''',
    "test_user.py": '''\
        import pytest
        import torch
        from mymethods import normalize

        import runner.nnsight


        def test_imported_function(model):
            with model.trace("Hello", remote='local'):
                hidden = model.transformer.h[0].output
                result = normalize(hidden).save()
            assert torch.allclose(result.norm(dim=-1), torch.ones_like(result.norm(dim=-1)), atol=1e-5)


        def test_remote_local_goes_to_the_session_worker(sourcebox_worker):
            assert runner.nnsight.installed_worker() is sourcebox_worker


        def test_the_worker_cannot_import_the_helper_module(sourcebox_worker):
            import importlib

            with pytest.raises(Exception, match="'mymethods' is refused"):
                sourcebox_worker.call(importlib.import_module, "mymethods")
        ''',
}


def _plugin_arguments() -> list[str]:
    installed = any(entry.value == "runner.pytest_plugin" for entry in entry_points(group="pytest11"))
    return [] if installed else ["-p", "runner.pytest_plugin"]


@pytest.mark.parametrize("switch", ["option", "environment"])
def test_the_users_own_suite_runs_through_the_worker(tmp_path, switch):
    for name, text in USER_FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    environment.pop("SOURCEBOX", None)
    arguments = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_plugin_arguments()]
    if switch == "option":
        arguments.append("--sourcebox")
    else:
        environment["SOURCEBOX"] = "1"
    finished = subprocess.run(
        arguments, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=240
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "3 passed" in finished.stdout
