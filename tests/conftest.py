import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# An installed sourcebox registers its pytest plugin as an entry point; a bare checkout
# loads it from here instead (never both: pytest refuses a plugin registered twice).
if not any(entry.value == "runner.pytest_plugin" for entry in entry_points(group="pytest11")):
    pytest_plugins = ["runner.pytest_plugin"]


class InstalledCopy:
    """sourcebox installed from this checkout into ``site``, not editable, as a user installs it.

    ``run`` and ``start`` run this interpreter from a user's project directory with
    ``site`` alone on ``PYTHONPATH``, so ``capture``, ``sandbox`` and ``runner`` (and the
    worker a client starts) come from the installed copy while torch, nnsight and the
    rest come from the running environment.
    """

    # Switches of the pytest plugin: a user's run decides them itself.
    _PLUGIN_SETTINGS = ("SOURCEBOX", "SOURCEBOX_MODEL", "SOURCEBOX_POLICY", "SOURCEBOX_SOCKET")

    def __init__(self, site: Path):
        self.site = site

    def environment(self) -> dict:
        environment = {key: value for key, value in os.environ.items() if key not in self._PLUGIN_SETTINGS}
        environment["PYTHONPATH"] = str(self.site)
        return environment

    def run(self, arguments: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *map(str, arguments)], cwd=cwd, env=self.environment(),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, arguments: list, cwd: Path, log: Path) -> subprocess.Popen:
        with open(log, "w") as output:
            return subprocess.Popen([sys.executable, *map(str, arguments)], cwd=cwd, env=self.environment(),
                                    stdout=output, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def installed_sourcebox(tmp_path_factory) -> InstalledCopy:
    """This checkout built and installed (not editable, no dependencies) once per session."""
    root = tmp_path_factory.mktemp("installed")
    source, site = root / "checkout", root / "site"
    # Built from a copy, so the build leaves nothing (build/, *.egg-info) in the checkout.
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".cache"))
    finished = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, f"pip could not install the checkout:\n{finished.stdout}{finished.stderr}"
    return InstalledCopy(site)
