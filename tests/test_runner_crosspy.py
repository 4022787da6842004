"""A client on this Python (3.11) drives workers on 3.10, 3.12 and 3.13 (issue 14).

Each worker runs in an environment built once per machine by ``runner.envs.cached`` (a
venv of pyenv's interpreter with msgpack, psutil, pyseccomp and numpy, under
``~/.cache/sourcebox/envs``), confined with every layer (``confine="required"``). The
user's module lives in a temporary directory only the client can import: it travels as
source. Skipped only where pyenv has no such interpreter; an environment that cannot be
built fails the test, saying why.
"""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import capture
import runner
from runner import envs
from runner_support import environment, user_modules

OTHER_MINORS = ["3.10", "3.12", "3.13"]
ARRAY_ITEMS = 1 << 20  # 8 MiB of float64: far past the 128 KiB shared-memory threshold

USER_MODULE = '''\
import numpy as np


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def apply(self, array):
        return array * self.factor


def make_counter(start):
    count = start

    def bump():
        nonlocal count
        count += 1
        return count

    def peek():
        return count

    return bump, peek


def run_counter(bump, peek, times):
    return [bump() for _ in range(times)], peek()


def scaled(array, factor):
    return Scaler(factor).apply(array), Scaler(factor)


def version():
    import sys
    return list(sys.version_info[:3])


def fail(value):
    limit = value * 2
    raise KeyError(f"no entry {limit}")  # line 41


def write_outside(path):
    try:
        with open(path, "w") as handle:
            handle.write("escaped")
    except OSError as error:
        return type(error).__name__
    return "written"


def load(name):
    return __import__(name).__name__
'''
FAIL_LINE = 41

# Exception groups' except* is Python 3.11 syntax: this client parses it, a 3.10 worker cannot.
NEWER_SYNTAX = '''\
def first_of_group(values):
    try:
        raise ExceptionGroup("several", [ValueError(value) for value in values])
    except* ValueError as group:  # line 4
        caught = sorted(str(error) for error in group.exceptions)
    return caught
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's modules, importable here only (the worker gets them as source)."""
    with user_modules(tmp_path_factory.mktemp("crosspy-user"), xvuser=USER_MODULE, xvnewer=NEWER_SYNTAX) as modules:
        yield modules


def worker_environment(minor: str):
    """The cached worker environment's python for pyenv's ``minor``: skip where the
    interpreter is absent, fail (with pip's output) where it exists but the environment
    cannot be built."""
    interpreter = envs.interpreter_for(minor)
    if interpreter is None:
        pytest.skip(f"no Python {minor} found: looked for {envs.pyenv_root() / 'versions' / (minor + '.*')}")
    try:
        return envs.cached(interpreter, envs.requirements("none"))
    except envs.EnvError as error:
        pytest.fail(f"Python {minor} is installed ({interpreter}) but its worker environment could not be "
                    f"built:\n{error}", pytrace=False)


@pytest.fixture(scope="module", params=OTHER_MINORS)
def worker(request):
    python = worker_environment(request.param)
    with runner.Worker(model="none", python=python, confine="required") as worker:
        worker.minor = request.param
        yield worker


def test_handshake_reports_both_versions(worker):
    assert worker.versions["client"] == platform.python_version()
    assert worker.versions["worker"].rsplit(".", 1)[0] == worker.minor
    assert worker.versions["server"] == platform.python_version()  # the server runs the client's Python
    assert worker.status()["python"] == worker.versions["worker"]
    with open(f"/proc/{worker.status()['worker_pid']}/maps") as maps:  # model none: no torch loaded
        assert not any("libtorch" in line for line in maps)


def test_user_functions_and_classes_from_a_module_the_worker_cannot_import(worker, user):
    xvuser, _ = user
    assert worker.call(xvuser.version)[:2] == [int(part) for part in worker.minor.split(".")]
    array = np.arange(8.0)
    result, scaler = worker.call(xvuser.scaled, array, 3)
    assert np.array_equal(result, array * 3)
    # An instance of the user's class comes back as the client's own class.
    assert type(scaler) is xvuser.Scaler and scaler.factor == 3


def test_closures_keep_their_state(worker, user):
    xvuser, _ = user
    bump, peek = xvuser.make_counter(10)
    bump()
    # Two closures over one cell: what one changes, the other sees, on the worker too.
    assert worker.call(xvuser.run_counter, bump, peek, 3) == ([12, 13, 14], 14)
    assert peek() == 11  # the client's closures are untouched


def test_numpy_arrays_travel_through_shared_memory_both_ways(worker, user):
    xvuser, _ = user
    array = np.random.default_rng(7).standard_normal(ARRAY_ITEMS)
    result, _ = worker.call(xvuser.scaled, array, 2)
    assert result.dtype == np.float64 and np.array_equal(result, array * 2)
    with open("/proc/self/maps") as maps:  # the result is the worker's sealed memfd, mapped here
        assert any("/memfd:sourcebox-result" in line for line in maps)
    descriptors = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}")]
    assert any(link.startswith("/memfd:sourcebox-request") for link in descriptors)  # the request's


def test_an_exception_comes_back_as_its_type_at_the_users_file_and_line(worker, user):
    xvuser, _ = user
    with pytest.raises(KeyError, match="no entry 10") as caught:
        worker.call(xvuser.fail, 5)
    file, line, function, text = caught.value.remote_traceback[-1]
    assert (file, line, function) == (xvuser.__file__, FAIL_LINE, "fail")
    assert "raise KeyError" in text
    assert f'File "{xvuser.__file__}", line {FAIL_LINE}' in str(caught.value.__cause__)


def test_syntax_newer_than_the_worker_is_refused_clearly(worker, user):
    _, xvnewer = user
    if worker.minor == "3.10":
        with pytest.raises(capture.BundleError) as caught:
            worker.call(xvnewer.first_of_group, ["a", "b"])
        message = str(caught.value)
        assert f"{xvnewer.__file__}:4" in message and "Python 3.10" in message
        assert "newer syntax" in message
    else:
        assert worker.call(xvnewer.first_of_group, ["b", "a"]) == ["a", "b"]


def test_every_confinement_layer_is_active(worker, user, tmp_path):
    xvuser, _ = user
    pid = worker.status()["worker_pid"]
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    assert fields["Seccomp"].strip() == "2" and fields["NoNewPrivs"].strip() == "1"
    if os.getuid() == 0:  # a root server's worker drops to nobody
        assert fields["Uid"].split()[:2] == ["65534", "65534"]
    # Landlock, by effect: a directory anyone may write is not the worker's to write.
    outside = tmp_path / "open"
    outside.mkdir(mode=0o777)
    outside.chmod(0o777)
    assert worker.call(xvuser.write_outside, str(outside / "escaped")) == "PermissionError"
    assert not (outside / "escaped").exists()
    report = worker.status()["sandbox"]
    for layer in ("seccomp", "landlock", "no_new_privs"):
        assert layer in report


def test_control_without_confinement_the_same_write_lands(user, tmp_path):
    xvuser, _ = user
    outside = tmp_path / "open"
    outside.mkdir()
    outside.chmod(0o777)
    with runner.Worker(model="none", python=worker_environment("3.12"), confine="off") as worker:
        assert worker.call(xvuser.write_outside, str(outside / "escaped")) == "written"
    assert (outside / "escaped").read_text() == "escaped"


def test_a_bare_interpreter_is_refused_with_the_command_that_builds_an_environment():
    interpreter = envs.interpreter_for("3.12")
    if interpreter is None:
        pytest.skip("no Python 3.12 from pyenv")
    with pytest.raises(envs.EnvError, match=r"python -m runner env create DIR --python .*3\.12"):
        runner.Worker(model="none", python=interpreter)


def test_the_ndif_env_profile_runs_its_policy_on_the_servers_python(tmp_path, user):
    xvuser, _ = user
    with environment(XDG_CACHE_HOME=str(tmp_path)):  # no environment made for the profile
        with pytest.raises(envs.EnvError, match="python -m runner env create .*ndif-env --profile ndif-env"):
            runner.Worker(model="none", profile="ndif-env")
    python = worker_environment("3.12")
    older = worker_environment("3.10")
    with pytest.raises(envs.EnvError, match="the ndif-env server runs Python 3.12, but .* is Python 3.10"):
        runner.Worker(model="none", profile="ndif-env", python=older)
    with runner.Worker(model="none", profile="ndif-env", python=python) as worker:
        assert worker.versions["worker"].startswith("3.12.") and worker.status()["policy"] == "ndif-env"
        assert worker.call(np.sum, np.ones(4)) == 4.0
        assert worker.call(xvuser.load, "json") == "json"  # the stdlib of the server's Python
        # Not in ndif-env's snapshot: refused by the policy, as the server would.
        with pytest.raises(ImportError, match="sklearn"):
            worker.call(xvuser.load, "sklearn")


def test_env_create_reuses_a_built_environment_and_prints_its_python():
    python = worker_environment("3.12")
    directory = python.parent.parent
    done = subprocess.run([sys.executable, "-m", "runner", "env", "create", str(directory), "--python", "3.12"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": envs.PACKAGE_ROOT})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(python)
    assert f"--python {python}" in done.stderr


def test_serve_with_a_profile_whose_environment_is_missing_says_how_to_make_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "runner", "serve", "--socket", str(tmp_path / "s.sock"),
                           "--model", "none", "--profile", "ndif-env"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": envs.PACKAGE_ROOT, "XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 2
    assert f"python -m runner env create {tmp_path}/sourcebox/envs/ndif-env --profile ndif-env" in done.stderr
    assert not (tmp_path / "s.sock").exists()


PEP_695 = '''\
type Pair[T] = tuple[T, T]


def first[T](items: list[T]) -> T:  # line 4
    return items[0]
'''

CLIENT_ON_3_12 = '''\
import sys
import capture, runner

sys.path.insert(0, sys.argv[1])
import newest

with runner.Worker(model="none", python=sys.argv[2], confine="off") as worker:
    print(worker.versions["client"], worker.versions["worker"])
    try:
        worker.call(newest.first, [1, 2])
    except capture.BundleError as error:
        print(error)
'''


def test_a_312_client_sending_pep_695_generics_to_a_311_worker_is_told_why(tmp_path):
    """The other direction: the client on the newer Python (an environment of pyenv's 3.12
    runs the client and its server), the worker on this one (3.11, with torch)."""
    client_python = worker_environment("3.12")
    (tmp_path / "newest.py").write_text(PEP_695)
    (tmp_path / "client.py").write_text(CLIENT_ON_3_12)
    done = subprocess.run([str(client_python), str(tmp_path / "client.py"), str(tmp_path), sys.executable],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**envs.clean_env(), "PYTHONPATH": envs.PACKAGE_ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    versions, message = done.stdout.splitlines()[:2]
    assert versions.startswith("3.12.") and versions.split()[1] == platform.python_version()
    assert f"{tmp_path / 'newest.py'}:4 ('def first[T](items: list[T]) -> T:" in message
    assert f"does not compile on this Python {platform.python_version()}" in message


def test_env_create_refuses_a_python_the_profiles_server_does_not_run_before_building(tmp_path):
    if envs.interpreter_for("3.10") is None:
        pytest.skip("no Python 3.10 from pyenv")
    done = subprocess.run([sys.executable, "-m", "runner", "env", "create", str(tmp_path / "env"),
                           "--profile", "ndif-env", "--python", "3.10"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": envs.PACKAGE_ROOT})
    assert done.returncode == 2
    assert "the ndif-env server runs Python 3.12, but --python 3.10 is Python 3.10" in done.stderr
    assert not (tmp_path / "env").exists()


INSTALLED_CLIENT = '''\
import sys
import runner
from runner import envs

sys.path.insert(0, sys.argv[1])
import xvuser

python = envs.cached(envs.interpreter_for("3.12"), envs.requirements("none"))
with runner.Worker(model="none", python=python, confine="required") as worker:
    print(runner.__file__)
    print(worker.status()["worker_pid"], worker.call(xvuser.version), flush=True)
    with open(f"/proc/{worker.status()['worker_pid']}/environ", "rb") as environ:
        print([entry.decode() for entry in environ.read().split(b"\\\\0") if entry.startswith(b"PYTHON")])
'''


def test_an_installed_sourcebox_gives_the_worker_its_own_copy_not_its_site_packages(installed_sourcebox, user,
                                                                                    tmp_path):
    """sourcebox installed as a package (pip --target here): its directory may hold packages
    built for the client's Python, so the worker on 3.12 gets a copy of sourcebox in its
    environment instead of that directory on its path."""
    worker_environment("3.12")  # skips where there is no 3.12
    xvuser, _ = user
    (tmp_path / "client.py").write_text(INSTALLED_CLIENT)
    done = installed_sourcebox.run([tmp_path / "client.py", os.path.dirname(xvuser.__file__)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    module, call, environ = done.stdout.splitlines()[:3]
    assert module.startswith(str(installed_sourcebox.site))
    assert call.split(" ", 1)[1].startswith("[3, 12, ")  # the user's function ran on 3.12
    assert environ == "[]"  # no PYTHONPATH: the environment's own copy served the worker


def test_an_environment_directory_others_can_write_is_refused_before_anything_runs(tmp_path):
    # The server runs the environment's interpreter (and its .pth files) as its own user.
    shared = tmp_path / "shared-env"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(envs.EnvError, match="that no one else can write .*mode drwxrwxrwx"):
        envs.create(shared, sys.executable, [])
    assert list(shared.iterdir()) == []  # nothing was built or run there
