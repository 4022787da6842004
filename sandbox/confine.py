"""``sandbox.enter``: confine the worker process once, before any user code runs.

Layers, in the order they are applied:

* python: ``sys.path`` without user directories, editable-install finders
  removed, environment variables reduced to a safe set and scrubbed from the
  process's initial environment block, working directory and temp dir moved to
  the scratch directory. (Import policy for user code lives in
  :mod:`sandbox.guard`; it needs no set-up here.)
* rlimits: no core dumps, bounded open files, file size and tasks (threads)
  of the worker's user (no ``RLIMIT_AS``: CUDA reserves huge virtual address
  ranges).
* capabilities: a root worker becomes an unprivileged user (``uid``/``gid``,
  default nobody/nogroup) keeping only ``CAP_DAC_READ_SEARCH`` (read-only
  access to files Landlock grants, e.g. the interpreter under a mode-700
  /root); any other worker drops every capability.
* no_new_privs: no set-uid gain through exec; required by Landlock and seccomp.
* landlock: read-only access to the interpreter, site-packages, the modules
  already imported, shared libraries, ``/proc``, ``/sys``, a few ``/dev``
  entries and ``read_paths``; read-write to ``scratch`` and ``write_paths``;
  nothing else (shared memory is passed as memfd descriptors, never named). No TCP bind/connect, no abstract Unix sockets
  or signals outside the sandbox.
* seccomp: see :mod:`sandbox.seccomp_filter`.
* threads: Landlock, capabilities and no-new-privs are per-thread, so no
  thread but the caller may exist at ``enter``; afterwards every task in
  /proc/self/task is checked.
"""

from __future__ import annotations

import ctypes
import glob
import os
import posix
import resource
import site
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import landlock, seccomp_filter
from .errors import ConfinementUnavailable
from .paths import interpreter_roots, is_under
from .policy import Policy

CONFINE_MODES = ("required", "best-effort", "off")
OS_LAYERS = ("rlimits", "capabilities", "no_new_privs", "landlock", "seccomp", "threads")
LAYERS = ("python", *OS_LAYERS)

# Environment variables the worker keeps (plus every LC_*): locale, time zone,
# device selection and numeric-library threading. Everything else (tokens,
# credentials, proxy settings, PYTHONPATH) is dropped.
SAFE_ENVIRONMENT = frozenset(
    {
        "LANG", "LANGUAGE", "TZ", "TERM", "USER", "LOGNAME",
        "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES", "PYTORCH_CUDA_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG",
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
    }
)

MAX_OPEN_FILES = 8192
# Tasks (threads) the worker may add to its user's count (RLIMIT_NPROC counts every
# task of the real uid): room for torch's and CUDA's pools on a large machine.
MAX_TASKS = 1024
# Who a root worker becomes: nobody/nogroup unless the caller names another user.
UNPRIVILEGED_UID = 65534
UNPRIVILEGED_GID = 65534
# Large enough for result tensors written to memfds (ftruncate counts).
MAX_FILE_SIZE = 64 << 30

# Read-only system locations: shared libraries (CUDA's driver libraries live in
# the distribution's library directories; the toolkit sometimes in /usr/local/cuda)
# and the two /etc files the dynamic loader and the C library's time zone code read.
SYSTEM_READ_PATHS = (
    "/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/local/cuda",
    "/etc/ld.so.cache", "/etc/localtime", "/usr/share/zoneinfo",
    "/proc", "/sys",
)
DEVICE_PATTERNS = ("/dev/nvidia*", "/dev/nvidia-caps")
READ_WRITE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full")
READ_DEVICES = ("/dev/urandom", "/dev/random")

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522
_CAP_DAC_READ_SEARCH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_entered_lock = threading.Lock()
_entered_report: "Report | None" = None


@dataclass
class LayerStatus:
    """One layer's outcome: ``status`` is ``active``, ``unavailable`` or ``off``."""

    name: str
    status: str
    detail: str

    @property
    def active(self) -> bool:
        return self.status == "active"


@dataclass
class Report:
    """What :func:`enter` enforced, layer by layer."""

    policy: str
    confine: str
    scratch: str
    layers: dict[str, LayerStatus] = field(default_factory=dict)

    def active(self, layer: str) -> bool:
        """Is ``layer`` (one of :data:`LAYERS`) in force?"""
        return layer in self.layers and self.layers[layer].active

    @property
    def confined(self) -> bool:
        """True when every OS layer is active."""
        return all(self.active(layer) for layer in OS_LAYERS)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for JSON): policy, confine, scratch, layers."""
        return {
            "policy": self.policy,
            "confine": self.confine,
            "scratch": self.scratch,
            "layers": {name: {"status": s.status, "detail": s.detail} for name, s in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        report = cls(data["policy"], data["confine"], data["scratch"])
        for name, entry in data["layers"].items():
            report.layers[name] = LayerStatus(name, entry["status"], entry["detail"])
        return report

    def __str__(self) -> str:
        lines = []
        if self.confine == "off":
            lines.append(
                "WARNING: OS confinement is OFF (confine='off'): user code runs with this "
                "process's full file, process and network access. Use only for debugging."
            )
        elif not self.confined:
            missing = [name for name in OS_LAYERS if not self.active(name)]
            lines.append(f"WARNING: partial confinement, missing: {', '.join(missing)}")
        lines.append(f"sandbox: policy {self.policy!r}, confine={self.confine!r}, scratch {self.scratch}")
        for status in self.layers.values():
            lines.append(f"  {status.name:<13} {status.status:<12} {format_detail(status.detail, 29)}")
        return "\n".join(lines)


def format_detail(detail: str, indent: int) -> str:
    """A layer's detail, one clause (``; ``-separated) per line."""
    return ("\n" + " " * indent).join(detail.split("; "))


def enter(
    policy: "Policy | str",
    *,
    scratch: str | os.PathLike[str],
    read_paths: Iterable[str | os.PathLike[str]] = (),
    write_paths: Iterable[str | os.PathLike[str]] = (),
    confine: str = "best-effort",
    uid: int = UNPRIVILEGED_UID,
    gid: int = UNPRIVILEGED_GID,
    replaces: Iterable[int] = (),
) -> Report:
    """Confine this process for running user code under ``policy``. Call once.

    Call it after everything the worker needs is imported and while the
    calling thread is the process's only one: Landlock, capabilities and
    no-new-privs apply to the calling thread and the threads it starts later,
    so a thread that exists before would keep full rights. Load data (the
    model) afterwards, with its paths in ``read_paths``: the threads that the
    load starts (progress bars, OpenMP, CUDA) then inherit every layer.

    ``scratch``: the only directory user code can write (besides
    ``write_paths``); it becomes the working directory, HOME
    and TMPDIR. ``read_paths``: extra read-only paths (the model directory).
    ``confine``: ``"required"`` raises :class:`~sandbox.ConfinementUnavailable`
    if any OS layer cannot be applied or another thread exists (named in the
    error), ``"best-effort"`` applies what it can, ``"off"`` applies only the
    Python layer (the report says so loudly). ``uid``/``gid``: whom a root
    process becomes (scratch is handed to them; ``write_paths`` must be
    writable by them); ignored when not root. ``replaces``: pids of processes
    this one will take over from (a standby worker's serving worker): their
    tasks, which will be gone, are not counted in the task bound.
    """
    global _entered_report
    if confine not in CONFINE_MODES:
        raise ValueError(f"confine={confine!r} is not one of {', '.join(map(repr, CONFINE_MODES))}")
    policy = Policy.load(policy)
    scratch_path = Path(scratch)
    scratch_path.mkdir(parents=True, exist_ok=True)
    scratch_path = scratch_path.resolve()
    read_list = _existing_paths(read_paths, "read_paths")
    write_list = _existing_paths(write_paths, "write_paths")
    with _entered_lock:
        if _entered_report is not None:
            raise RuntimeError(
                f"sandbox.enter() was already called in process {os.getpid()}; confinement "
                f"can only be applied once per process (start a new worker to change it)"
            )
        report = Report(policy.name, confine, str(scratch_path))
        # Everything that needs files (the filter library, path lists) is
        # prepared before the first restriction takes effect.
        seccomp_plan, seccomp_error = _prepare_seccomp()
        ruleset = _landlock_ruleset(scratch_path, read_list, write_list)
        if confine == "required":
            _refuse_known_gaps(seccomp_error)
        earlier_threads = _other_threads()
        report.layers["python"] = LayerStatus("python", "active", _scrub_python(scratch_path))
        if confine == "off":
            for layer in OS_LAYERS:
                report.layers[layer] = LayerStatus(layer, "off", "not applied: confine='off'")
            _entered_report = report
            return report
        steps = (
            ("rlimits", lambda: _apply_rlimits(uid if os.geteuid() == 0 else os.getuid(), replaces)),
            ("capabilities", lambda: _drop_privileges(uid, gid, scratch_path)),
            ("no_new_privs", _set_no_new_privs),
            ("landlock", lambda: _apply_landlock(ruleset)),
            ("seccomp", lambda: _apply_seccomp(seccomp_plan, seccomp_error)),
            ("threads", lambda: _verify_tasks(earlier_threads)),
        )
        for layer, step in steps:
            try:
                detail = step()
            except _Unavailable as unavailable:
                report.layers[layer] = LayerStatus(layer, "unavailable", unavailable.reason)
                if confine == "required":
                    _entered_report = report
                    raise ConfinementUnavailable(layer, unavailable.reason) from None
            else:
                report.layers[layer] = LayerStatus(layer, "active", detail)
        _entered_report = report
        return report


def entered() -> "Report | None":
    """The report of this process's :func:`enter`, or ``None`` if it was not called."""
    return _entered_report


def _refuse_known_gaps(seccomp_error: str) -> None:
    """Fail closed before changing anything when a layer is known to be missing."""
    others = _other_threads()
    if others:
        raise ConfinementUnavailable("threads", _threads_problem(others))
    if seccomp_error:
        raise ConfinementUnavailable("seccomp", seccomp_error)
    try:
        landlock.abi_version()
    except landlock.LandlockError as error:
        raise ConfinementUnavailable("landlock", error.strerror or str(error)) from None


class _Unavailable(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _existing_paths(paths: Iterable[str | os.PathLike[str]], argument: str) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a list of paths, not a single path: wrap it as [{os.fspath(paths)!r}]")
    result = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{argument} entry {os.fspath(path)!r} does not exist")
        result.append(os.path.realpath(path))
    return result


# ----------------------------------------------------------------- python layer


def _is_editable_hook(obj: Any) -> bool:
    owner = getattr(obj, "__self__", obj)
    names = (getattr(obj, "__module__", None), getattr(owner, "__module__", None), getattr(type(owner), "__module__", None))
    return any(isinstance(name, str) and name.startswith("__editable__") for name in names)


def _scrub_python(scratch: Path) -> str:
    roots = interpreter_roots()
    user_site = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    kept, dropped = [], []
    for entry in sys.path:
        trusted = bool(entry) and os.path.isabs(entry) and is_under(entry, roots)
        if trusted and user_site and is_under(entry, [os.path.realpath(user_site)]):
            trusted = False
        (kept if trusted else dropped).append(entry)
    sys.path[:] = kept
    finders_before = len(sys.meta_path) + len(sys.path_hooks)
    sys.meta_path[:] = [finder for finder in sys.meta_path if not _is_editable_hook(finder)]
    sys.path_hooks[:] = [hook for hook in sys.path_hooks if not _is_editable_hook(hook)]
    finders_dropped = finders_before - len(sys.meta_path) - len(sys.path_hooks)
    sys.path_importer_cache.clear()
    site.ENABLE_USER_SITE = False
    sys.dont_write_bytecode = True

    kept_names = _scrub_environment(scratch)
    os.chdir(scratch)
    tempfile.tempdir = str(scratch)
    return (
        f"sys.path: kept {len(kept)} interpreter/site-packages entries, dropped {len(dropped)}"
        f"{' (' + ', '.join(repr(e) for e in dropped[:4]) + (' ...' if len(dropped) > 4 else '') + ')' if dropped else ''}"
        f"; editable-install finders dropped: {finders_dropped}"
        f"; environment reduced to {', '.join(sorted(kept_names))}"
        f"; cwd, HOME and TMPDIR = scratch"
    )


def _scrub_environment(scratch: Path) -> set[str]:
    kept = {
        name: value
        for name, value in os.environ.items()
        if name in SAFE_ENVIRONMENT or name.startswith("LC_")
    }
    kept.update({"HOME": str(scratch), "TMPDIR": str(scratch), "PATH": "/usr/bin:/bin"})
    os.environ.clear()
    os.environ.update(kept)
    # os.environ was built from posix.environ, which still holds the original.
    posix.environ.clear()
    posix.environ.update({key.encode(): value.encode() for key, value in kept.items()})
    _wipe_initial_environment(set(kept))
    return set(kept)


def _wipe_initial_environment(kept: set[str]) -> None:
    """Zero dropped variables in the block /proc/self/environ shows.

    unsetenv only unlinks a variable; its bytes stay in the process's initial
    environment block, readable through /proc/self/environ. Variables we keep
    stay intact: libraries may hold pointers into them.
    """
    with open(f"/proc/{os.getpid()}/stat", encoding="ascii", errors="replace") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # Fields 50 and 51 of proc(5) (env_start, env_end); fields[0] is field 3.
    start, end = int(fields[47]), int(fields[48])
    if not 0 < start < end:
        return
    block = ctypes.string_at(start, end - start)
    offset = 0
    for entry in block.split(b"\0"):
        name = entry.partition(b"=")[0].decode("utf-8", "replace")
        if entry and name not in kept:
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1


# --------------------------------------------------------------------- OS layers


def _apply_rlimits(task_owner: int, replaces: Iterable[int]) -> str:
    applied = [_limit_tasks(task_owner, replaces)]
    for name, soft_cap in (("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", MAX_OPEN_FILES), ("RLIMIT_FSIZE", MAX_FILE_SIZE)):
        limit = getattr(resource, name)
        soft, hard = resource.getrlimit(limit)
        new_hard = soft_cap if hard == resource.RLIM_INFINITY else min(hard, soft_cap)
        new_soft = new_hard if soft == resource.RLIM_INFINITY else min(soft, new_hard)
        try:
            resource.setrlimit(limit, (new_soft, new_hard))
        except (OSError, ValueError) as error:
            raise _Unavailable(f"setrlimit({name}) failed: {error}") from None
        applied.append(f"{name[7:].lower()}={new_hard}")
    return "hard limits " + ", ".join(applied) + " (no RLIMIT_AS: CUDA maps large address ranges)"


def _limit_tasks(owner: int, replaces: Iterable[int] = ()) -> str:
    """RLIMIT_NPROC: the kernel counts every task of the real uid ``owner`` (the user the
    worker runs as from the next layer on), so the bound is what that user has now plus
    :data:`MAX_TASKS`, not counting the processes this one ``replaces``. Not enforced
    while the process is still root."""
    existing = _tasks_of(owner, skip={str(pid) for pid in replaces})
    bound = existing + MAX_TASKS
    _, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if hard != resource.RLIM_INFINITY:
        bound = min(bound, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (bound, bound))
    except (OSError, ValueError) as error:
        raise _Unavailable(f"setrlimit(RLIMIT_NPROC) failed: {error}") from None
    return f"nproc={bound} (uid {owner} had {existing} tasks, this worker may add {bound - existing})"


def _tasks_of(uid: int, skip: set[str] = frozenset()) -> int:
    """How many tasks (threads) of processes whose real uid is ``uid`` exist now, but
    those of the processes in ``skip``."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry in skip:
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue  # gone meanwhile
        if int(fields["Uid"].split()[0]) == uid:
            count += int(fields["Threads"])
    return count


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _effective_capabilities() -> int:
    with open(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _drop_privileges(uid: int, gid: int, scratch: Path) -> str:
    held = _effective_capabilities()
    if os.geteuid() != 0:
        if not held:
            return f"none held; runs as uid {os.getuid()} (not root: no identity change)"
        _limit_capabilities(0)
        return f"dropped all capabilities (held {held:#x}); bounding and ambient sets cleared"
    os.chown(scratch, uid, gid)
    death_signal = ctypes.c_int(0)
    _libc.prctl(_PR_GET_PDEATHSIG, ctypes.byref(death_signal), 0, 0, 0)
    keep = 1 << _CAP_DAC_READ_SEARCH
    _drop_bounding_set(keep)  # needs CAP_SETPCAP: before the uid change
    # KEEPCAPS: the permitted set survives the uid change (the effective one is cleared).
    _libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # glibc applies it to every thread
    except OSError as error:
        raise _Unavailable(f"changing to uid {uid}, gid {gid}: {error}") from None
    _libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0)
    _limit_capabilities(keep)
    # The kernel clears the parent-death signal when the uid changes: whoever armed it
    # (the runner, to die with its supervisor) still needs it.
    if death_signal.value:
        _libc.prctl(_PR_SET_PDEATHSIG, death_signal.value, 0, 0, 0)
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3 or os.getgroups():
        raise _Unavailable(f"uid/gid are {os.getresuid()}/{os.getresgid()} after changing to {uid}/{gid}")
    return (
        f"root became uid {uid}, gid {gid}, no supplementary groups (scratch handed to them)"
        f"; capabilities: only CAP_DAC_READ_SEARCH kept (read-only DAC bypass, as the interpreter "
        f"may live under a mode-700 /root, on the paths Landlock grants), held {held:#x} before"
        f"; bounding and ambient sets cleared{'; parent-death signal re-armed' if death_signal.value else ''}"
    )


def _drop_bounding_set(keep: int) -> None:
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for capability in range(last_cap + 1):
        if not keep & (1 << capability) and _libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise _Unavailable(
                f"dropping capability {capability} from the bounding set: {os.strerror(ctypes.get_errno())}"
            )
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def _limit_capabilities(keep: int) -> None:
    """Effective and permitted sets become ``keep`` (a mask below 32), inheritable empty."""
    if not keep:
        _drop_bounding_set(0)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = keep
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise _Unavailable(f"capset: {os.strerror(ctypes.get_errno())}")
    if _effective_capabilities() != keep:
        raise _Unavailable(f"capabilities {_effective_capabilities():#x} in effect after capset to {keep:#x}")


def _other_threads() -> list[str]:
    """Every task of this process but the caller, as ``tid (comm[, Python thread name])``."""
    own = threading.get_native_id()
    python_names = {thread.native_id: thread.name for thread in threading.enumerate()}
    others = []
    for entry in sorted(os.listdir(f"/proc/{os.getpid()}/task"), key=int):
        tid = int(entry)
        if tid == own:
            continue
        try:
            comm = Path(f"/proc/{os.getpid()}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue  # it ended meanwhile
        name = f", Python thread {python_names[tid]!r}" if tid in python_names else ""
        others.append(f"{tid} ({comm!r}{name})")
    return others


def _threads_problem(others: list[str]) -> str:
    return (
        f"{len(others)} thread(s) besides the caller exist at enter(): {', '.join(others)}; Landlock, "
        f"capabilities and no-new-privs would not apply to them and user code could hijack them. "
        f"Start them after enter() (they then inherit every layer) or stop them before"
    )


def _verify_tasks(earlier: list[str]) -> str:
    """Check every task's status (Landlock is not shown per task: it holds for all
    because none but the caller existed at enter(), and threads inherit it)."""
    if earlier:
        raise _Unavailable(_threads_problem(earlier))
    expected = None
    tasks = sorted(os.listdir(f"/proc/{os.getpid()}/task"), key=int)
    for tid in tasks:
        with open(f"/proc/{os.getpid()}/task/{tid}/status", encoding="ascii") as status:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
        state = (fields["Seccomp"], fields["NoNewPrivs"], fields["CapEff"], fields["Uid"], fields["Gid"])
        expected = expected or state
        if state[:2] != ("2", "1") or state != expected:
            raise _Unavailable(f"task {tid} is not confined like the others: Seccomp, NoNewPrivs, CapEff, "
                               f"Uid, Gid = {state}")
    return (
        f"{len(tasks)} task(s), the caller alone at enter(); each: seccomp filter, no_new_privs, "
        f"CapEff {expected[2]}, uid {expected[3].split()[0]}; later threads inherit every layer"
    )


def _set_no_new_privs() -> str:
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise _Unavailable(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    if _libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise _Unavailable("PR_GET_NO_NEW_PRIVS does not report the flag after setting it")
    return "set: exec can never gain privileges (set-uid, file capabilities)"


def _imported_code_paths(roots: list[str]) -> list[str]:
    """Package directories (or module files) of imported modules outside ``roots``.

    The worker's own packages (the runner, capture, this package) may live in
    a source checkout; their lazily imported submodules and data files must
    stay readable. Only what was imported before enter() is granted.
    """
    paths = set()
    for name, module in list(sys.modules.items()):
        if "." in name or module is None:
            continue
        package_dirs = getattr(module, "__path__", None)
        if package_dirs is not None:
            candidates = [d for d in list(package_dirs) if isinstance(d, str) and os.path.isabs(d)]
        else:
            file = getattr(module, "__file__", None)
            candidates = [file] if isinstance(file, str) and os.path.isabs(file) else []
        for candidate in candidates:
            if os.path.exists(candidate) and not is_under(candidate, roots):
                paths.add(os.path.realpath(candidate))
    return sorted(paths)


def _landlock_ruleset(scratch: Path, read_paths: list[str], write_paths: list[str]) -> landlock.Ruleset:
    ruleset = landlock.Ruleset()
    roots = interpreter_roots()
    for path in [*roots, *_imported_code_paths(roots), *SYSTEM_READ_PATHS, *read_paths]:
        ruleset.allow(path, landlock.READ)
    for device in READ_DEVICES:
        ruleset.allow(device, landlock.READ_FILE)
    for device in READ_WRITE_DEVICES:
        ruleset.allow(device, landlock.READ_FILE | landlock.WRITE_FILE)
    for pattern in DEVICE_PATTERNS:
        for device in glob.glob(pattern):
            ruleset.allow(device, landlock.READ | landlock.DEVICE)
    for path in [str(scratch), *write_paths]:
        ruleset.allow(path, landlock.WRITE)
    return ruleset


def _apply_landlock(ruleset: landlock.Ruleset) -> str:
    try:
        applied = landlock.restrict_self(ruleset)
    except landlock.LandlockError as error:
        raise _Unavailable(error.strerror or str(error)) from None
    writable = [path for path, rights in applied.granted if landlock.describe_rights(rights) == "read-write"]
    return (
        f"ABI {applied.abi}: {len(applied.granted)} paths granted; writable: {', '.join(writable)}"
        f"; TCP bind/connect {'denied' if applied.network else 'not handled (ABI < 4)'}"
        f"; abstract Unix sockets and signals {'scoped to the sandbox' if applied.scoped else 'not scoped (ABI < 6)'}"
    )


def _prepare_seccomp() -> tuple[Any, str]:
    try:
        return seccomp_filter.build(os.getpid()), ""
    except ImportError as error:
        return None, f"the pyseccomp binding is not installed ({error}); pip install pyseccomp"
    except (OSError, RuntimeError) as error:
        return None, f"libseccomp is unavailable: {error}"


def _apply_seccomp(plan: Any, error: str) -> str:
    if plan is None:
        raise _Unavailable(error)
    try:
        seccomp_filter.load(plan)
    except OSError as load_error:
        raise _Unavailable(f"seccomp filter did not load: {load_error}") from None
    if seccomp_filter.active_mode() != 2:
        raise _Unavailable("the kernel does not report a seccomp filter after loading it")
    unknown = f"; unknown to libseccomp here: {', '.join(plan.unknown)}" if plan.unknown else ""
    return "filter loaded on all threads (TSYNC); " + "; ".join(plan.rules) + unknown
