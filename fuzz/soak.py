"""``python -m fuzz soak`` (``make soak``): client processes x requests on one live server,
with a worker kill and a client kill in the middle.

Every request carries a tag (client, number) that its answer must carry back: an empty
call returns the tag, a tensor call returns its 1 MiB argument doubled plus the number,
a raising call raises ``ValueError`` naming the tag. A request whose attempt is ended by
the worker kill is retried once (what a caller does with ``WorkerCrashed``). Counted:
lost (no right answer after that), duplicated (an answer seen twice), wrong (an answer
for another tag, or a wrong value), latencies, and what is left in /dev/shm and the
temporary directory afterwards. The killed client's requests end with it.

The worker's thread budget: ``OMP_NUM_THREADS=1`` for the server and its worker. Each
request's tensor work is a few microseconds, and torch's default of one thread per core
makes every one of them wake a pool that the 8 client processes are competing for on a
machine with few cores (the same load ran 4x slower without it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

KINDS = ("empty", "tensor", "raise")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `python -m fuzz` is found
ELEMENTS = 1 << 18  # float32: 1 MiB


def empty(tag: str) -> str:
    return tag


def tensor(values, number: int):
    return values * 2 + number


def fail(tag: str) -> None:
    raise ValueError(f"soak failure {tag}")


# --- one client process ---------------------------------------------------------------

def client(socket_path: str, client_id: int, requests: int, out_path: str) -> int:
    import torch

    import runner

    torch.set_num_threads(1)
    with open(out_path, "w", buffering=1) as out, runner.Worker(socket=socket_path) as worker:
        for number in range(requests):
            kind = KINDS[number % len(KINDS)]
            tag = f"{client_id}:{number}"
            attempts, outcome = 0, None
            started = time.perf_counter()
            while outcome is None or (outcome == "killed" and attempts < 2):
                attempts += 1
                outcome = _one(worker, kind, tag, number, torch)
            out.write(json.dumps([number, kind, outcome, attempts, time.perf_counter() - started]) + "\n")
    return 0


def _one(worker, kind: str, tag: str, number: int, torch) -> str:
    import runner

    try:
        if kind == "empty":
            return "right" if worker.call(empty, tag) == tag else "wrong"
        if kind == "tensor":
            values = torch.full((ELEMENTS,), float(number % 97), dtype=torch.float32)
            result = worker.call(tensor, values, number)
            expected = float(number % 97) * 2 + number
            return "right" if result.shape == values.shape and bool((result == expected).all()) else "wrong"
        worker.call(fail, tag)
        return "wrong"  # it should have raised
    except ValueError as exc:
        return "right" if kind == "raise" and str(exc) == f"soak failure {tag}" else "wrong"
    except runner.WorkerCrashed:
        return "killed"


# --- the parent ---------------------------------------------------------------------

#: What sourcebox or torch would leave in /dev/shm (shared with other users of the machine).
_SHM_PREFIXES = ("sourcebox", "sbx", "torch", "psm_")


def _leftovers(tmp: str) -> set[str]:
    """/dev/shm entries of ours, and everything in the soak's own temporary directory
    (the server, its worker and the clients get it as TMPDIR)."""
    found = {f"/dev/shm/{name}" for name in os.listdir("/dev/shm") if name.startswith(_SHM_PREFIXES)} \
        if os.path.isdir("/dev/shm") else set()
    return found | {os.path.join(tmp, name) for name in os.listdir(tmp)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz soak")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000, help="per client")
    parser.add_argument("--no-kills", action="store_true", help="skip the worker kill and the client kill")
    parser.add_argument("--worker-threads", default="1",
                        help="OMP_NUM_THREADS of the server and its worker (default 1; 'torch' leaves torch's own "
                             "default of one thread per core, for comparison)")
    parser.add_argument("--client", nargs=3, metavar=("SOCKET", "ID", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return client(args.client[0], int(args.client[1]), args.requests, args.client[2])
    summary = soak(args.clients, args.requests, kills=not args.no_kills, worker_threads=args.worker_threads)
    print(format_summary(summary))
    return 0 if summary["passed"] else 1


def soak(clients: int, requests: int, *, kills: bool = True, worker_threads: str = "1") -> dict:
    """Run the soak; the process's environment and temporary directory are as before after it."""
    saved = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "TMPDIR")}, tempfile.tempdir
    scratch = tempfile.mkdtemp(prefix="soak-")
    try:
        # Inherited by the server and its worker: see the module docstring.
        if worker_threads == "torch":
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = worker_threads
        tmp = os.environ["TMPDIR"] = tempfile.tempdir = os.path.join(scratch, "tmp")
        os.mkdir(tmp)
        return _soak(clients, requests, kills, scratch, tmp)
    finally:
        for key, value in saved[0].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = saved[1]
        shutil.rmtree(scratch, ignore_errors=True)


def _soak(clients: int, requests: int, kills: bool, scratch: str, tmp: str) -> dict:
    import runner

    before = _leftovers(tmp)
    started = time.monotonic()
    owner = runner.Worker(model="none", confine="best-effort", timeout=120)
    procs, outs = [], []
    kill_log: list[str] = []
    try:
        for client_id in range(clients):
            out = os.path.join(scratch, f"client{client_id}.jsonl")
            outs.append(out)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fuzz", "soak", "--requests", str(requests), "--client",
                 owner.socket_path, str(client_id), out], env=dict(os.environ), cwd=_ROOT))
        total = clients * requests
        worker_killed = client_killed = not kills
        victim = clients - 1
        while any(p.poll() is None for p in procs):
            done = sum(_count_lines(o) for o in outs)
            if not worker_killed and done >= total * 0.3:
                pid = owner.status()["worker_pid"]
                os.kill(pid, signal.SIGKILL)
                kill_log.append(f"worker {pid} killed after {done} answers")
                worker_killed = True
            if not client_killed and done >= total * 0.6:
                procs[victim].kill()
                kill_log.append(f"client {victim} killed after {_count_lines(outs[victim])} of its answers")
                client_killed = True
            time.sleep(0.2)
        seconds = time.monotonic() - started
        served_after = owner.call(empty, "after") == "after"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        owner.close()
    time.sleep(0.5)
    rows = {client_id: _rows(out) for client_id, out in enumerate(outs)}
    left = sorted(_leftovers(tmp) - before)
    return _summarize(rows, procs, requests, kills, seconds, served_after, kill_log, left)


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as handle:
            return handle.read().count(b"\n")
    except OSError:
        return 0


def _rows(path: str) -> list[list]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.endswith("\n")]


def _summarize(rows: dict, procs: list, requests: int, kills: bool, seconds: float, served_after: bool,
               kill_log: list[str], leftovers: list[str]) -> dict:
    victim = len(procs) - 1 if kills else None
    latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
    lost = duplicated = wrong = killed_attempts = 0
    crashed_clients = []
    for client_id, answers in rows.items():
        numbers = [row[0] for row in answers]
        duplicated += len(numbers) - len(set(numbers))
        if client_id != victim:
            lost += requests - len(set(numbers))
            if procs[client_id].returncode != 0:
                crashed_clients.append(client_id)
        for _number, kind, outcome, attempts, latency in answers:
            wrong += outcome == "wrong"
            lost += outcome == "killed"  # killed on both attempts
            killed_attempts += attempts - 1
            latencies[kind].append(latency)
    every = sorted(x for values in latencies.values() for x in values)
    summary = {
        "clients": len(procs), "requests_per_client": requests, "answers": len(every), "seconds": round(seconds, 1),
        "lost": lost, "duplicated": duplicated, "wrong": wrong, "retried_after_worker_kill": killed_attempts,
        "kills": kill_log, "served_after": served_after, "clients_failed": crashed_clients, "leftovers": leftovers,
        "latency_ms": {kind: _percentiles(values) for kind, values in [("all", every), *latencies.items()]},
    }
    summary["passed"] = (not lost and not duplicated and not wrong and served_after and not crashed_clients
                         and not leftovers and (not kills or len(kill_log) == 2))
    return summary


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    pick = lambda q: round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "max": round(values[-1] * 1000, 1), "n": len(values)}


def format_summary(summary: dict) -> str:
    lines = [f"soak: {summary['clients']} clients x {summary['requests_per_client']} requests, "
             f"{summary['answers']} answers in {summary['seconds']} s",
             f"  lost {summary['lost']}, duplicated {summary['duplicated']}, wrong {summary['wrong']}; "
             f"{summary['retried_after_worker_kill']} attempt(s) ended by the worker kill and retried",
             *(f"  {event}" for event in summary["kills"])]
    for kind, stats in summary["latency_ms"].items():
        if stats:
            lines.append(f"  latency {kind:7} p50 {stats['p50']} ms  p99 {stats['p99']} ms  max {stats['max']} ms "
                         f"(n={stats['n']})")
    lines.append(f"  served after the run: {summary['served_after']}; clients that failed: "
                 f"{summary['clients_failed'] or 'none'}")
    lines.append(f"  leftovers in /dev/shm and the soak's TMPDIR: {summary['leftovers'] or 'none'}")
    lines.append("soak: " + ("passed" if summary["passed"] else "FAILED"))
    return "\n".join(lines)
