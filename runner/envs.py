"""Worker environments on other Python versions (``python -m runner env create``).

A server may run another Python than the researcher's (NDIF's server package needs 3.12 or
newer). User code travels as source, so a worker on that interpreter runs it as the
server would; the worker only needs its own few packages installed there. This module
finds interpreters (pyenv's, or a path), builds a venv for one with what the worker needs
for a model, and says which interpreter a simulation profile (a policy made from an
environment snapshot, such as ``ndif-env``) calls for.

sourcebox itself is not installed into these environments: the server always hands its
worker its own code (``worker_pythonpath``), so both ends speak the same protocol even
when the checkout changes after the environment was built.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from .defaults import PACKAGE_ROOT
from .errors import RunnerError

#: What a worker without a model imports (msgpack: bundles and frames; psutil: the runner;
#: pyseccomp: the seccomp layer; numpy: arrays, which most research code sends; tomli:
#: TOML policies before Python 3.11's tomllib).
WORKER_PACKAGES = ("msgpack", "psutil", "pyseccomp", "numpy", 'tomli; python_version < "3.11"')
#: What a worker holding a model adds. torch for another interpreter is a download of
#: several GB (with CUDA libraries unless a CPU-only index is given); only model workers need it.
MODEL_PACKAGES = ("torch", "transformers", "tokenizers", "nnsight")
#: Written last into a finished environment: what it was built from.
MARKER = "sourcebox-env.json"
# Bumped when what an environment holds changes meaning (cache keys include it).
_LAYOUT = 1
_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")


class EnvError(RunnerError):
    """A worker environment or interpreter is missing or could not be built."""


def pyenv_root() -> Path:
    """Where pyenv keeps its interpreters: ``pyenv root``, else $PYENV_ROOT, else ~/.pyenv."""
    pyenv = shutil.which("pyenv")
    if pyenv:
        found = subprocess.run([pyenv, "root"], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip():
            return Path(found.stdout.strip())
    return Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))


def interpreter_for(version: str) -> Path | None:
    """The newest pyenv-installed ``python3`` of ``version`` ("3.12" or "3.12.1"), if any."""
    candidates = [path for path in (pyenv_root() / "versions").glob(f"{version}*")
                  if (path.name == version or path.name.startswith(version + "."))
                  and (path / "bin" / "python3").exists()]
    candidates.sort(key=lambda path: [int(part) if part.isdigit() else -1 for part in path.name.split(".")])
    return candidates[-1] / "bin" / "python3" if candidates else None


def find_python(spec: str | os.PathLike[str]) -> Path:
    """The interpreter ``spec`` names: a version ("3.12": pyenv's newest 3.12.*, else
    ``python3.12`` on PATH) or a path to a ``python`` executable."""
    text = os.fspath(spec)
    if _VERSION.match(text):
        found = interpreter_for(text) or (shutil.which(f"python{text}") and Path(shutil.which(f"python{text}")))
        if not found:
            raise EnvError(f"no Python {text} found: looked for {pyenv_root() / 'versions' / (text + '.*')}"
                           f"/bin/python3 and python{text} on PATH; install it (pyenv install {text}) "
                           "or pass the interpreter's path")
        return Path(found)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "bin" / "python").exists():
        path = path / "bin" / "python"  # an environment's directory names its python
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise EnvError(f"--python {text!r} is neither a version such as 3.12 nor an executable Python "
                       "(nor an environment directory with bin/python)")
    return path.absolute()  # not resolved: a venv's python is a symlink that must stay one


def python_version(python: str | os.PathLike[str]) -> str:
    """``platform.python_version()`` of ``python`` ("3.12.1")."""
    found = subprocess.run([os.fspath(python), "-I", "-c", "import platform; print(platform.python_version())"],
                           capture_output=True, text=True, timeout=60)
    if found.returncode != 0:
        raise EnvError(f"{python} does not run: {found.stderr.strip()[-500:]}")
    return found.stdout.strip()


def requirements(model: str = "none") -> list[str]:
    """What a worker for ``model`` imports ("none": a plain-function worker)."""
    return [*WORKER_PACKAGES, *(() if model == "none" else MODEL_PACKAGES)]


def clean_env() -> dict[str, str]:
    """Our environment without PYTHON* variables: nothing of this interpreter's paths."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None


def create(directory: str | os.PathLike[str], python: str | os.PathLike[str], packages: list[str] | tuple[str, ...],
           *, log=None) -> Path:
    """A venv of ``python`` at ``directory`` holding ``packages``; its python.

    A directory already built from the same interpreter and packages is reused. Builds
    hold a lock, so two test sessions do not build one environment at once. Raises
    ``EnvError`` (with pip's output) when the environment cannot be built.
    """
    directory = Path(directory).expanduser().absolute()
    base = find_python(python)
    version = python_version(base)
    wanted = {"layout": _LAYOUT, "python": str(base), "version": version, "packages": sorted(packages),
              # A copy of sourcebox (installed, no checkout) is refreshed when sourcebox changes.
              "sourcebox": None if _is_checkout(PACKAGE_ROOT) else _code_digest()}
    env_python = directory / "bin" / "python"
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists():
        _check_private(directory)
    lock_fd = os.open(directory.parent / f".{directory.name}.lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with open(lock_fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = _read_marker(directory)
        if isinstance(built, dict) and env_python.exists() and \
                {**built, "sourcebox": None} == {**wanted, "sourcebox": None}:
            if built.get("sourcebox") != wanted["sourcebox"] and wanted["sourcebox"] is not None:
                _copy_packages(directory, env_python)  # sourcebox changed since: refresh its copy
                (directory / MARKER).write_text(json.dumps(wanted, indent=1))
            return env_python
        if directory.exists() and not (directory / "pyvenv.cfg").exists() and any(directory.iterdir()):
            raise EnvError(f"{directory} exists and is not an environment; pick an empty or new directory")
        _say(log, f"creating a Python {version} environment at {directory}" + (
            f" (replacing its Python {built.get('version')} environment)" if isinstance(built, dict) else ""))
        steps = [[str(base), "-m", "venv", "--clear", str(directory)]]
        if packages:
            steps.append([str(env_python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          *packages])
        for step in steps:
            if step[1:3] == ["-m", "pip"]:
                _say(log, f"installing {' '.join(packages)}")
            try:
                done = subprocess.run(step, capture_output=True, text=True, env=clean_env(), timeout=3600)
                failure = None if done.returncode == 0 else \
                    f"exit status {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"
            except (OSError, subprocess.TimeoutExpired) as error:
                failure = str(error)
            if failure is not None:
                raise EnvError(f"building the worker environment {directory} failed at `{' '.join(step)}` "
                               f"(is the package index reachable?): {failure}")
        if wanted["sourcebox"] is not None:
            _copy_packages(directory, env_python)
        (directory / MARKER).write_text(json.dumps(wanted, indent=1))
    return env_python


def cached(python: str | os.PathLike[str], packages: list[str] | tuple[str, ...], *, log=None) -> Path:
    """``create`` in the shared cache (``~/.cache/sourcebox/envs/<version>-<hash>``): the
    environment for an interpreter and a set of packages is built once per machine."""
    base = find_python(python)
    version = python_version(base)
    key = json.dumps([_LAYOUT, str(base), version, sorted(packages), _is_checkout(PACKAGE_ROOT)])
    name = f"{version}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    root = cache_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(root)
    return create(root / name, base, packages, log=log)


def _check_private(path: Path) -> None:
    """Refuse a directory another user could have put an interpreter or a ``.pth`` file in:
    the server runs what it holds as its own user, before the worker is confined."""
    info = path.lstat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022 or not stat.S_ISDIR(info.st_mode):
        raise EnvError(f"{path} is not a directory of this user ({os.geteuid()}) that no one else can write "
                       f"(owner {info.st_uid}, mode {stat.filemode(info.st_mode)}); the worker's environment runs "
                       f"as this user: use a private directory (mode 700), or remove it and build again")


def cache_root() -> Path:
    """Where environments are kept by default: ``$XDG_CACHE_HOME/sourcebox/envs``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sourcebox" / "envs"


def check(python: str | os.PathLike[str]) -> str:
    """Import the worker's modules under ``python`` as the server would start it (its code
    on the path), so a bare interpreter is refused before a server starts. Returns the
    interpreter's version."""
    done = subprocess.run([os.fspath(python), "-c", "import platform, pyseccomp, runner.worker; "
                                                    "print(platform.python_version())"],
                          capture_output=True, text=True, timeout=300,
                          env={**clean_env(), **worker_pythonpath()}, cwd="/")
    if done.returncode != 0:
        missing = re.search(r"No module named '([^']+)'", done.stderr)
        raise EnvError(
            f"a worker cannot run on {python}: "
            + (f"it lacks the package {missing.group(1)!r}" if missing else f"its imports fail:\n{done.stderr[-3000:]}")
            + f". Build an environment for it once: python -m runner env create DIR --python {python} "
              "(then pass DIR/bin/python)")
    return done.stdout.strip()


# --- the server's side ---------------------------------------------------------------

def worker_pythonpath() -> dict[str, str]:
    """The environment variables that give a worker on another interpreter this server's
    own code, and nothing else of this interpreter's (its PYTHONPATH could name
    packages built for this Python)."""
    return {"PYTHONPATH": PACKAGE_ROOT} if _is_checkout(PACKAGE_ROOT) else {}


def _is_checkout(root: str) -> bool:
    """Is ``root`` sourcebox's source tree? Anything else (site-packages, a pip --target
    directory) may also hold packages compiled for this interpreter."""
    return os.path.isfile(os.path.join(root, "setup.cfg")) and os.path.isdir(os.path.join(root, "runner"))


def _code_digest() -> str:
    """A digest of sourcebox's own files (what ``_copy_packages`` copies)."""
    digest = hashlib.sha256()
    for package in ("capture", "sandbox", "runner"):
        for path in sorted((Path(PACKAGE_ROOT) / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _copy_packages(directory: Path, env_python: Path) -> None:
    """sourcebox installed as a package (no checkout to hand over): copy its packages into
    the environment, as a non-editable install would."""
    found = subprocess.run([str(env_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True)
    target = Path(found.stdout.strip())
    for package in ("capture", "sandbox", "runner"):
        shutil.rmtree(target / package, ignore_errors=True)
        shutil.copytree(Path(PACKAGE_ROOT) / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))


# --- simulation profiles -------------------------------------------------------------

def profile_python(profile: str) -> str | None:
    """The Python version a profile's environment snapshot names ("3.12"), if any."""
    import sandbox

    path = sandbox.policy.PROFILE_DIR / f"{profile}.json"
    if not path.is_file():
        return None
    return str(json.loads(path.read_text())["python_version"])


def profile_env(profile: str) -> Path:
    """Where ``env create --profile PROFILE`` puts a profile's environment by default."""
    return cache_root() / profile


def simulation(profile: str, python: str | os.PathLike[str] | None = None) -> Path:
    """The interpreter a worker simulating ``profile``'s server runs on: ``python`` if
    given (checked against the profile's version), else the profile's environment.
    ``EnvError`` naming the command that creates it when it is missing."""
    version = profile_python(profile)
    if version is None:
        raise EnvError(f"{profile!r} is not a simulation profile (a shipped environment snapshot with a Python "
                       f"version); pass policy={profile!r} alone, or one of: {', '.join(simulation_profiles())}")
    if python is None:
        found = profile_env(profile) / "bin" / "python"
        if not found.exists():
            raise EnvError(
                f"the {profile} simulation runs the worker on Python {version}, the server's, in the environment "
                f"{profile_env(profile)}, which does not exist. Create it once with:\n"
                f"    python -m runner env create {profile_env(profile)} --profile {profile}\n"
                f"(it needs a Python {version}: pyenv install {version}), or pass python= an interpreter "
                f"of that version")
        python = found
    path = find_python(python)
    actual = python_version(path)
    if actual.split(".")[:2] != version.split(".")[:2]:
        raise EnvError(f"the {profile} server runs Python {version}, but {path} is Python {actual}; create "
                       f"its environment with: python -m runner env create DIR --profile {profile}")
    return path


def simulation_profiles() -> list[str]:
    """Shipped profiles made from an environment snapshot (they name a Python version)."""
    import sandbox

    return [name for name in sandbox.profiles() if profile_python(name) is not None]


def _say(log, text: str) -> None:
    if log is not None:
        print(text, file=log, flush=True)


# --- python -m runner env create ------------------------------------------------------

def main(args) -> int:
    """``python -m runner env create DIR [--python VERSION_OR_PATH] [--profile P] [--model M]``."""
    python = args.python
    if args.profile is not None:
        version = profile_python(args.profile)
        if version is None:
            raise EnvError(f"{args.profile!r} is not a simulation profile; choose one of: "
                           f"{', '.join(simulation_profiles())}")
        if python is not None:
            actual = python_version(find_python(python))
            if actual.split(".")[:2] != version.split(".")[:2]:
                raise EnvError(f"the {args.profile} server runs Python {version}, but --python {python} is "
                               f"Python {actual}; leave --python out to use a {version}")
        python = python or version
    if python is None:
        raise EnvError("name the interpreter: --python 3.12 (or a path), or --profile ndif-env")
    env_python = create(args.directory, python, requirements(args.model), log=sys.stderr)
    version = check(env_python)
    print(f"worker environment for Python {version} ready; use:\n    --python {env_python}", file=sys.stderr)
    print(env_python)
    return 0
