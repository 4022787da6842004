"""runner: a long-lived, sandboxed model worker and the client API to use it.

    with runner.Worker(model="tiny-gpt2") as worker:
        logits = worker.call(my_function, runner.MODEL, prompt)

``runner.models`` (the models a worker can host) is imported on first use.
See docs/RUNNER.md for the protocol, the lifecycle and the numbers behind the design.
"""
from .client import SandboxExecutor, Worker, decode_result, encode_call
from .frames import Outcome, decode_outcome, encode_call_frames
from .errors import (MemoryLimitExceeded, PeerAuthError, ProtocolError, ProtocolVersionError, RemoteError,
                     RemoteTraceback, RequestTimeout, RunnerError, ServerBusy, WorkerCrashed, WorkerStartError, WorkerStopped)
from .handlers import MODEL, Context, register
from .protocol import PROTOCOL_VERSION

__all__ = [
    "Worker", "SandboxExecutor", "MODEL", "encode_call", "decode_result", "register", "Context",
    "RunnerError", "ProtocolError", "ProtocolVersionError", "PeerAuthError", "RemoteError", "RemoteTraceback",
    "ServerBusy", "WorkerCrashed", "RequestTimeout", "MemoryLimitExceeded", "WorkerStartError", "WorkerStopped",
    "PROTOCOL_VERSION", "encode_call_frames", "decode_outcome", "Outcome",
]


def __getattr__(name: str):
    # runner.models brings in transformers' pipeline machinery (seconds): imported on first
    # use of `runner.models`, so a client that never opens a model does not pay for it.
    if name == "RayExecutor":  # Ray is an optional extra, imported only when asked for
        from .ray import RayExecutor

        return RayExecutor
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
