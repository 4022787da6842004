"""The runner's exceptions, and how a failure on the worker is rebuilt in the client.

Everything the runner raises on its own account derives from ``RunnerError``. A user
exception raised inside the worker comes back as its original type when the client
has already loaded that type (see ``rebuild``), else as ``RemoteError``; either way its
``__cause__`` is a ``RemoteTraceback`` whose text is the worker-side traceback, pointing
at the user's own files and lines.
"""
from __future__ import annotations

import traceback
from typing import Any

import capture


class RunnerError(Exception):
    """Base class of the errors the runner raises itself."""


class ProtocolError(RunnerError):
    """The byte stream broke the protocol; the connection cannot continue."""


class BadMessage(ProtocolError):
    """One message was malformed but fully read: that request fails, the connection lives on.

    ``request_id`` is the id the message carried when it could be read, else ``None``.
    """

    def __init__(self, text: str, request_id: int | None = None):
        super().__init__(text)
        self.request_id = request_id


class ProtocolVersionError(ProtocolError):
    """The two sides speak different protocol versions."""


class PeerAuthError(ProtocolError):
    """The process on the socket is not a server this client may trust (docs/RUNNER.md,
    "Authentication"); nothing of a request was sent to it."""


class WorkerStartError(RunnerError):
    """The worker could not be started (bad model spec, policy, device, confinement...)."""


class WorkerStopped(RunnerError):
    """The worker server stopped before this request ran."""


class ServerBusy(RunnerError):
    """The server is at one of its limits (connections, or bytes and descriptors queued
    for this client): nothing was run; try again later or wait for replies first."""


class WorkerCrashed(RunnerError):
    """The worker process died while running this request.

    ``returncode`` is the exit status (negative: killed by signal ``-returncode``),
    ``stderr_tail`` the worker's last lines of output, ``reason`` what the supervisor saw.
    The supervisor has restarted the worker; the requests queued behind this one run.
    """

    def __init__(self, reason: str, returncode: int | None = None, stderr_tail: str = ""):
        self.reason = reason
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        text = reason
        if returncode is not None:
            text += f" ({describe_exit(returncode)})"
        if stderr_tail:
            text += "\nlast lines of the worker's output:\n" + stderr_tail
        super().__init__(text)


class RequestTimeout(WorkerCrashed, TimeoutError):
    """The request ran past its time limit; the worker was killed and restarted."""


class MemoryLimitExceeded(WorkerCrashed, MemoryError):
    """The worker's memory went past its limit; it was killed and restarted."""


class RemoteTraceback(Exception):
    """Carries the worker-side traceback text as the ``__cause__`` of a rebuilt error."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text


class RemoteError(RunnerError):
    """A user exception whose type does not exist in the client.

    ``type_name`` is the remote type's ``module.qualname``, ``message`` its ``str()``.
    """

    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message


def describe_exit(returncode: int) -> str:
    """``exit code 3`` or ``killed by signal 9 (SIGKILL)``."""
    if returncode >= 0:
        return f"exit code {returncode}"
    import signal

    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "unknown signal"
    return f"killed by signal {number} ({name})"


# Failures the worker sends back carry a category so the client rebuilds the right type.
USER, CRASHED, TIMEOUT, MEMORY, STOPPED, START, RUNNER, BUSY = (
    "user", "crashed", "timeout", "memory", "stopped", "start", "runner", "busy")
# Texts a failure carries (messages, traceback lines, output tails) are cut to this many
# characters, so a failure's reply always fits a message header (docs/RUNNER.md, "Limits").
MAX_TEXT_CHARS = 64 << 10
_MAX_FRAMES = 200
_INT64 = (-(1 << 63), (1 << 64) - 1)  # what msgpack can carry
_CATEGORY_TYPES = {
    CRASHED: WorkerCrashed, TIMEOUT: RequestTimeout, MEMORY: MemoryLimitExceeded,
}


def describe(exc: BaseException, *, skip_dirs: tuple[str, ...] = ()) -> dict:
    """The wire form of a user exception: type, text, plain args and attributes, traceback.

    Frames from files under ``skip_dirs`` (the worker's own machinery: runner, capture,
    sandbox) are dropped, so the traceback shows the user's code and the libraries it
    called.
    """
    frames = [
        [cut(frame.filename, 4096), frame.lineno, cut(frame.name, 4096), cut(frame.line or "", 4096)]
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith(skip_dirs)
    ]
    if len(frames) > _MAX_FRAMES:  # deep recursion: the first and the last frames tell
        frames = frames[:_MAX_FRAMES // 2] + [["...", 0, f"{len(frames) - _MAX_FRAMES} frames cut", ""]] + \
            frames[-_MAX_FRAMES // 2:]
    cls = type(exc)
    # Only values that travel as they are, and short: anything else (an int past 64 bits,
    # a 20 MiB string) would make the reply itself fail to encode or exceed its limit.
    args = list(exc.args) if len(exc.args) <= 64 and all(_plain(a) for a in exc.args) else None
    attributes = {k: v for k, v in list(vars(exc).items())[:64] if isinstance(k, str) and len(k) <= 256 and _plain(v)}
    return {
        "category": USER,
        "module": cut(cls.__module__ if isinstance(cls.__module__, str) else "?", 1024),
        "qualname": cut(cls.__qualname__, 1024),
        "message": cut(_safe_str(exc)),
        "args": args,
        "attributes": attributes,
        "traceback": frames,
        "text": cut(_safe_text(cls, exc)),
    }


def cut(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` cut to at most about ``limit`` characters, with a marker saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}[... {len(text) - limit} more characters cut]"


def failure(category: str, message: str, **extra: Any) -> dict:
    """The wire form of a failure the runner itself reports (crash, timeout, stop...)."""
    return {"category": category, "message": message, **extra}


def rebuild(info: Any) -> BaseException:
    """Turn a wire failure back into an exception to raise in the client; never raises
    (a malformed failure from a broken or hostile peer becomes a ``RemoteError`` saying so).

    A user exception keeps its type when that type is an exception class the client has
    already loaded (a builtin, torch's, the user's own module's): it is looked up in
    ``sys.modules`` without importing anything (``capture.DATA_ONLY``'s lookup), so a
    reply cannot make the client import a module. Otherwise it becomes ``RemoteError``.
    The type's constructor gets only the plain values the reply carried.
    """
    if not isinstance(info, dict):
        return RemoteError("<malformed>", f"the worker server sent a failure that is not a map: {type(info).__name__}")
    try:
        return _rebuild(info)
    except Exception as exc:  # a reply is the peer's data: nothing in it may break the client
        return RemoteError("<malformed>", f"the worker server sent a failure this client cannot read ({exc!r})")


def _rebuild(info: dict) -> BaseException:
    category = info.get("category")
    message = str(info.get("message", ""))
    if category in _CATEGORY_TYPES:
        return _CATEGORY_TYPES[category](message, info.get("returncode"), info.get("stderr_tail", ""))
    if category == STOPPED:
        return WorkerStopped(message)
    if category == START:
        return WorkerStartError(message)
    if category == RUNNER:
        return RunnerError(message)
    if category == BUSY:
        return ServerBusy(message)
    exc = _original_type_instance(info) or RemoteError(
        f"{info.get('module')}.{info.get('qualname')}", message)
    frames = [frame for frame in info.get("traceback") or () if _frame_like(frame)]
    text = "Traceback (most recent call last) on the worker:\n" + "".join(
        traceback.format_list([tuple(frame) for frame in frames])) + str(info.get("text", message))
    exc.__cause__ = RemoteTraceback(text)
    exc.remote_traceback = [tuple(frame) for frame in frames]
    return exc


def _original_type_instance(info: dict) -> BaseException | None:
    module, qualname = info.get("module"), info.get("qualname")
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    try:
        cls = capture.DATA_ONLY.loaded(module, qualname)
    except ImportError:
        return None
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        return None
    args = info.get("args")
    args = tuple(args) if isinstance(args, list) and all(map(_plain, args)) else (str(info.get("message", "")),)
    try:
        exc = cls(*args)
    except Exception:
        # A constructor with its own signature (keyword-only details, say): build the
        # instance without it, then restore what the worker's instance carried.
        try:
            exc = cls.__new__(cls, *args)
            exc.args = args
        except Exception:
            return None
    attributes = info.get("attributes")
    if isinstance(attributes, dict):
        for name, value in attributes.items():
            if not (isinstance(name, str) and _plain(value)):
                continue
            try:
                setattr(exc, name, value)
            except (AttributeError, TypeError):
                pass  # a read-only attribute: the constructor set its own
    return exc


def _frame_like(frame: Any) -> bool:
    """A traceback entry as ``describe`` sends it: file, line, function, source line."""
    return (isinstance(frame, (list, tuple)) and len(frame) == 4 and isinstance(frame[0], str)
            and isinstance(frame[1], (int, type(None))) and isinstance(frame[2], str) and isinstance(frame[3], (str, type(None))))


def _plain(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return _INT64[0] <= value <= _INT64[1]
    if isinstance(value, (str, bytes)):
        return len(value) <= 4096
    return value is None or isinstance(value, (float, bool))


def _safe_text(cls: type, exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception_only(cls, exc)).strip()
    except Exception as inner:
        return f"{cls.__qualname__}: <formatting failed: {type(inner).__name__}>"


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as inner:  # a broken __str__ must not hide the original failure
        return f"<str() failed: {type(inner).__name__}: {inner}>"
