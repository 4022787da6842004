"""pytest plugin: one sourcebox worker per test session, and ``remote='local'`` routed to it.

Registered as the ``sourcebox`` pytest11 entry point, so an installed sourcebox offers:

- the session-scoped ``sourcebox_worker`` fixture (a started ``runner.Worker``);
- ``--sourcebox`` (or ``SOURCEBOX=1``): ``remote='local'`` in every test runs through
  that worker (``runner.nnsight.install``), undone when the session ends.

``--sourcebox-model`` / ``SOURCEBOX_MODEL`` picks the worker's model (default
``tiny-gpt2``), ``--sourcebox-policy`` / ``SOURCEBOX_POLICY`` its policy (a profile name
or a TOML file), ``--sourcebox-socket`` / ``SOURCEBOX_SOCKET`` an already running worker
to connect to instead of starting one. Nothing heavy is imported until a worker is used.
"""

from __future__ import annotations

import os

import pytest

_TRUE = {"1", "true", "yes", "on"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sourcebox", "sourcebox worker for nnsight remote='local'")
    group.addoption(
        "--sourcebox",
        action="store_true",
        default=None,
        help="run remote='local' traces through one sourcebox worker for the session (also: SOURCEBOX=1)",
    )
    group.addoption("--sourcebox-model", default=None, help="model spec the worker hosts (default: tiny-gpt2)")
    group.addoption("--sourcebox-policy", default=None, help="policy profile name or TOML file for the worker")
    group.addoption("--sourcebox-socket", default=None, help="socket of a running worker to use instead of starting one")


def _setting(config: pytest.Config, option: str, variable: str, default: str | None = None) -> str | None:
    value = config.getoption(option)
    return value if value is not None else os.environ.get(variable, default)


def _enabled(config: pytest.Config) -> bool:
    if config.getoption("--sourcebox"):
        return True
    return os.environ.get("SOURCEBOX", "").strip().lower() in _TRUE


@pytest.fixture(scope="session")
def sourcebox_worker(request: pytest.FixtureRequest):
    """A ``runner.Worker`` hosting the session's model, started once and stopped at the end."""
    from runner import Worker

    config = request.config
    options = {"model": _setting(config, "--sourcebox-model", "SOURCEBOX_MODEL", "tiny-gpt2")}
    policy = _setting(config, "--sourcebox-policy", "SOURCEBOX_POLICY")
    if policy is not None:
        options["policy"] = policy
    socket = _setting(config, "--sourcebox-socket", "SOURCEBOX_SOCKET")
    if socket is not None:
        options["socket"] = socket
    with Worker(**options) as worker:
        yield worker


@pytest.fixture(scope="session", autouse=True)
def _sourcebox_remote_local(request: pytest.FixtureRequest):
    """With ``--sourcebox``/``SOURCEBOX=1``, route ``remote='local'`` to the session worker."""
    if not _enabled(request.config):
        yield None
        return
    from runner import nnsight as sourcebox_nnsight

    worker = request.getfixturevalue("sourcebox_worker")
    sourcebox_nnsight.install(worker)
    try:
        yield worker
    finally:
        sourcebox_nnsight.uninstall()
