"""``python -m runner``: serve a worker, ask one for its status, stop one."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from . import auth
from .defaults import DEFAULT_POLICY
from .errors import RunnerError
from .protocol import DEFAULT_SHM_THRESHOLD, ERROR, STATUS, STOP
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"512M"``, ``"2GiB"``, ``"1073741824"`` -> bytes (powers of 1024)."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (write e.g. 1073741824, 512M or 2G)")
    unit = (match.group(2) or "").upper()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def parse_seconds(text: str) -> float:
    """A finite positive number of seconds (NaN, infinities, zero and negatives refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from .supervisor import (DEFAULT_HANDSHAKE_SECONDS, DEFAULT_MAX_CLIENTS, DEFAULT_MAX_QUEUED_BYTES,
                             DEFAULT_SEND_SECONDS, DEFAULT_TIMEOUT)

    parser = argparse.ArgumentParser(prog="python -m runner", description="the sourcebox worker")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start a worker server on a Unix socket (runs until stopped)")
    serve.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
    serve.add_argument("--model", default="tiny-gpt2",
                       help="tiny-gpt2, tiny-gpt2-<N>l, a local Hugging Face directory, or 'none' (no model)")
    serve.add_argument("--policy", default=DEFAULT_POLICY, help="a sandbox profile name or policy file")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    serve.add_argument("--confine", default="best-effort", choices=("best-effort", "required", "off"),
                       help="OS confinement: apply what this kernel offers, demand all of it, or none")
    serve.add_argument("--timeout", type=parse_seconds, default=DEFAULT_TIMEOUT,
                       help=f"the most seconds a request may run; a client may ask for less, never more "
                            f"(default {DEFAULT_TIMEOUT:g})")
    serve.add_argument("--memory-limit", type=parse_size, default=None,
                       help="RSS (and CUDA memory) past which the worker is restarted, e.g. 4G")
    serve.add_argument("--shm-threshold", type=parse_size, default=DEFAULT_SHM_THRESHOLD,
                       help="frames at least this large travel through shared memory")
    serve.add_argument("--handlers", default="", help="comma-separated modules that register request kinds")
    serve.add_argument("--start-timeout", type=parse_seconds, default=600.0,
                       help="seconds the worker may take to start")
    serve.add_argument("--threads", type=_positive_int, default=None,
                       help="threads the worker's torch (OpenMP, MKL) pools may use (default: half the CPUs "
                            "this process may run on, at least 1)")
    serve.add_argument("--max-clients", type=_positive_int, default=DEFAULT_MAX_CLIENTS,
                       help=f"connections served at once; more are refused as busy (default {DEFAULT_MAX_CLIENTS})")
    serve.add_argument("--max-queued-bytes", type=parse_size, default=DEFAULT_MAX_QUEUED_BYTES,
                       help="bytes one client's queued requests may hold in the server, and its largest "
                            f"message; more is refused as busy (default {DEFAULT_MAX_QUEUED_BYTES >> 20}M)")
    serve.add_argument("--handshake-timeout", type=parse_seconds, default=DEFAULT_HANDSHAKE_SECONDS,
                       help=f"seconds a new connection has for its greeting and hello "
                            f"(default {DEFAULT_HANDSHAKE_SECONDS:g})")
    serve.add_argument("--send-timeout", type=parse_seconds, default=DEFAULT_SEND_SECONDS,
                       help=f"seconds a send to a client (or the worker) may wait for it to read; then it is "
                            f"dropped (default {DEFAULT_SEND_SECONDS:g})")
    serve.add_argument("--owner", type=int, default=None, help="stop when this process exits")
    serve.add_argument("--secret-fd", type=int, default=None,
                       help="read the server's secret from this inherited pipe (how runner.Worker starts "
                            "a server); without it the server makes one and writes it to SOCKET.secret")
    serve.add_argument("--isolate-clients", action="store_true",
                       help="a fresh worker whenever the next request is of another client than the last "
                            "(for mutually distrusting tenants; costs a worker start per switch)")
    serve.add_argument("--verbose", action="store_true",
                       help="log the worker's full sandbox report at each start, not only the one-line summary "
                            "(the report is also in `python -m runner status`)")
    serve.add_argument("--no-standby", action="store_true",
                       help="keep no standby worker (imported and confined ahead, so that a restart after a "
                            "crash or retirement only loads the model): saves its memory, restarts take longer")
    serve.add_argument("--test-only-trust-worker-channel", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--python", default=None,
                       help="run the worker on this interpreter: a version (3.12, from pyenv) or the python of "
                            "an environment made by `python -m runner env create`")
    serve.add_argument("--profile", default=None,
                       help="simulate a server from its environment snapshot (ndif-env): its policy, and a "
                            "worker on its Python version (from --python, or the profile's environment)")
    env = commands.add_parser("env", help="worker environments for other Python versions")
    env_create = env.add_subparsers(dest="env_command", required=True).add_parser(
        "create", help="build a venv a worker can run in on another interpreter; prints its --python")
    env_create.add_argument("directory", help="where to create the environment")
    env_create.add_argument("--python", default=None,
                            help="the interpreter: a version (3.12: pyenv's newest 3.12.*) or a path")
    env_create.add_argument("--profile", default=None,
                            help="a simulation profile (ndif-env): its server's Python version, unless --python")
    env_create.add_argument("--model", default="none",
                            help="none (msgpack, psutil, pyseccomp, numpy) or a model spec, which adds torch, "
                                 "transformers and nnsight (torch is a download of several GB)")
    # Ray is an optional extra: its subcommands are parsed by runner.ray (docs/SCALE.md).
    ray = commands.add_parser("ray", help="replicas on a Ray cluster: up|down|status (python -m runner ray --help)",
                              add_help=False)
    ray.add_argument("arguments", nargs=argparse.REMAINDER)
    for name, text in (("status", "print a worker server's status"), ("stop", "stop a worker server")):
        command = commands.add_parser(name, help=text)
        command.add_argument("socket", help="the server's socket path")
        if name == "status":
            command.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .supervisor import Supervisor

    secret = None
    if args.secret_fd is not None:
        with os.fdopen(args.secret_fd, "rb") as pipe:
            secret = pipe.read(auth.SECRET_BYTES + 1)
        if len(secret) != auth.SECRET_BYTES:
            raise RuntimeError(f"--secret-fd {args.secret_fd} gave {len(secret)} bytes, not a "
                               f"{auth.SECRET_BYTES}-byte secret")
    from . import envs

    policy, python = args.policy, args.python and str(envs.find_python(args.python))
    if args.profile is not None:
        python = str(envs.simulation(args.profile, python))
        policy = args.profile if policy == DEFAULT_POLICY else policy
    if python is not None:
        envs.check(python)
    supervisor = Supervisor(
        args.socket, model=args.model, device=args.device, policy=policy, confine=args.confine, python=python,
        timeout=args.timeout, memory_limit=args.memory_limit, shm_threshold=args.shm_threshold,
        handlers=tuple(name for name in args.handlers.split(",") if name), start_timeout=args.start_timeout,
        owner_pid=args.owner, secret=secret, threads=args.threads, max_clients=args.max_clients,
        max_queued_bytes=args.max_queued_bytes, handshake_timeout=args.handshake_timeout,
        send_timeout=args.send_timeout, trust_worker_channel=args.test_only_trust_worker_channel,
        isolate_clients=args.isolate_clients, verbose=args.verbose, standby=not args.no_standby,
    )
    return supervisor.serve()


def _ask(path: str, kind: str) -> dict:
    """One control message to the server at ``path``: its answer's metadata. The server is
    checked first, as ``runner.Worker`` checks it (its secret file, else uid and directory)."""
    path = os.path.abspath(path)
    try:
        conn, _, _ = auth.handshake(path)
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        raise SystemExit(f"no worker server at {path}: {exc}") from None
    try:
        conn.send(kind, 1)
        answer = conn.recv()
        answer.close()
        if answer.kind == ERROR:
            error = answer.meta.get("error")
            raise RunnerError(error.get("message") if isinstance(error, dict) else f"{kind} was refused")
        return answer.meta
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ray"]:  # its options are runner.ray's own (argparse would claim them here)
        from .ray import main as ray_main

        return ray_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "env":
            from . import envs

            return envs.main(args)
        if args.command == "status":
            status = _ask(args.socket, STATUS)
            if args.json:
                print(json.dumps(status, indent=2, default=str))
            else:
                for key, value in status.items():
                    print(f"{key:>14}: {value}")
            return 0
        _ask(args.socket, STOP)
        deadline = time.monotonic() + 60
        while os.path.exists(args.socket) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"stopped the worker server at {args.socket}")
        return 0
    except (RunnerError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
