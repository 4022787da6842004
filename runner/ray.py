"""sourcebox on a Ray cluster (docs/SCALE.md): Ray places, names and restarts; sourcebox
carries the code and keeps the boundary.

- ``SandboxActor``: one per model replica, named ``sourcebox/<model>/<i>``. It starts one
  ``python -m runner serve`` child (a socket in a private directory; the child stops when
  the actor's process is gone) and relays bundle frames to it over one authenticated
  connection per tenant. It never decodes user code and never runs it: user code runs
  only in the confined worker under that server.
- ``deploy`` / ``undeploy`` / ``replicas``, and ``python -m runner ray up|down|status``.
- ``RayExecutor``: a ``concurrent.futures.Executor`` that encodes calls here, routes them by
  model across the replicas, and decodes the outcomes here as data only.

Only uint8 numpy arrays (the bundle's header and frames), strings, numbers and plain maps
cross Ray: Ray's cloudpickle never sees a user function, class or module.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import getpass
import glob
import itertools
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Container, Sequence

import capture
import numpy
import ray
import ray.exceptions

from . import errors, shm
from .client import Worker
from .frames import (ERROR, MISS, REPLY, Outcome, decode_outcome, encode_call_frames, encode_payload, failure_outcome,
                     load_policy)
from .owned_server import listening

# Ray's tqdm support replaces builtins.print in a driver once Ray prints anything there; a
# researcher's function that prints would then name Ray's function, which the worker does
# not have. Read when Ray first prints, so setting it here (before any cluster) suffices.
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")

NAMESPACE = "sourcebox"
_PREFIX = "sourcebox/"
# Threads of one actor serving calls at once: enough for every tenant's queue to reach the
# server, whose per-client round robin is what makes tenants fair.
DEFAULT_MAX_CONCURRENCY = 64
# What tells a call failed because its replica went away (died, restarting, node lost),
# so it may run again elsewhere: never the worker's own failures, which come back as outcomes.
_REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


# Failures a server reports when it, or its worker, was ended from outside the call.
_SERVER_ENDINGS = (errors.CRASHED, errors.STOPPED)


class _DirectLinkLost(Exception):
    """A replica reached through its server's socket was lost (its actor died with it)."""


@dataclass(frozen=True)
class _SameNode:
    """A connection to a replica's server on this node, and the actor it was found through."""

    worker: Worker
    actor_pid: int


# How long a replica's path is decided with: its actor's ``info`` in time, or relay this call;
# a replica whose server could not be reached is looked at again after a while.
_INFO_SECONDS, _LOOK_AGAIN_SECONDS = 10.0, 5.0


def actor_name(model: str, index: int) -> str:
    return f"{_PREFIX}{model}/{index}"


def _as_array(frame: Any) -> numpy.ndarray:
    """A frame as a flat uint8 array over the same memory (Ray moves these without pickling
    their bytes, and reads them back zero-copy out of its object store)."""
    view = memoryview(frame)
    return numpy.frombuffer(view if view.format == "B" and view.ndim == 1 else view.cast("B"), dtype=numpy.uint8)


class SandboxActor:
    """One model replica: a worker server in a child process, relayed to by frames.

    Made by ``deploy`` (as a Ray actor class); ``worker_options`` go to ``runner.Worker``
    (``timeout``, ``memory_limit``, ``confine``, ``threads``, ``device``...). Ray's
    ``num_gpus`` sets ``CUDA_VISIBLE_DEVICES`` here, which the server and its worker inherit.
    """

    def __init__(self, model: str, policy: Any = None, worker_options: dict | None = None):
        self.model = model
        _sweep_orphan_dirs()
        # Mode 0700, named after this process so a later actor removes it once we are gone.
        self._dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        self._socket = os.path.join(self._dir, "worker.sock")
        # The owner connection starts the server (secret through a pipe, --owner this pid)
        # and restarts it should it die; tenants connect beside it.
        self._options = dict(model=model, policy=policy, **(worker_options or {}))
        self._owner = Worker(socket=self._socket, **self._options)
        self._tenants: dict[str, Worker] = {}
        self._lock = threading.Lock()
        self._requests = 0

    def _connection(self, tenant: str) -> Worker:
        with self._lock:
            worker = self._tenants.get(tenant)
            if worker is None:
                if not listening(self._socket):
                    self._revive()  # the owner starts the server again; tenants only connect
                # Same options as the owner's: should the server die in between, the one this
                # starts in its place is the same worker.
                worker = self._tenants[tenant] = Worker(socket=self._socket, **self._options)
            return worker

    def run(self, tenant: str, kind: str, header: numpy.ndarray, frames: list, timeout: float | None = None):
        """Relay one request; return the outcome as ``(kind, meta, frames)``, frames as arrays."""
        with self._lock:
            self._requests += 1
        try:
            outcome = self._connection(str(tenant)).run_frames(header, frames, kind, timeout=timeout)
        except Exception as exc:  # the connection, not the request: report it, recover for the next
            outcome = failure_outcome(exc)
            if isinstance(exc, errors.WorkerCrashed):
                self._revive()
        return outcome.kind, outcome.meta, [_as_array(frame) for frame in outcome.frames]

    def _revive(self) -> None:
        """After a lost connection: the owner restarts the server if it died, so tenants
        reconnect on their next call."""
        try:
            self._owner.ping()
        except errors.RunnerError:
            pass  # the next call reports what is wrong

    def info(self) -> dict:
        """Who and where this replica is, and its server's state."""
        status = self._owner.status()
        return {"model": self.model, "actor_pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "socket": self._socket,
                "server_pid": status.get("server_pid"), "worker_pid": status.get("worker_pid"),
                "policy": self._owner.info.get("policy"), "requests": self._requests, "served": status.get("served"),
                "tenants": sorted(self._tenants), "restarts": status.get("restarts"), "queued": status.get("queued")}

    def modules(self) -> list[str]:
        """The names of the modules this actor process has imported (user code never is one)."""
        return sorted(sys.modules)


_DIR_PREFIX = "sourcebox-ray-"


def _sweep_orphan_dirs() -> None:
    """Remove socket directories of actors that were killed (as the supervisor sweeps the
    scratch directories of killed servers)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), _DIR_PREFIX + "*")):
        pid = os.path.basename(path)[len(_DIR_PREFIX):].partition("-")[0]
        if pid.isdigit() and not shm.alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _connect(address: str | None = None) -> None:
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)


def replicas(model: str, *, namespace: str = NAMESPACE, address: str | None = None) -> list[str]:
    """Names of the deployed replicas of ``model`` (``sourcebox/<model>/<i>``), in index order."""
    _connect(address)
    return _names(model, namespace)


def _names(model: str, namespace: str) -> list[str]:
    prefix = f"{_PREFIX}{model}/"
    names = [entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
             if entry["namespace"] == namespace and entry["name"].startswith(prefix)
             and entry["name"][len(prefix):].isdigit()]
    return sorted(names, key=lambda name: int(name[len(prefix):]))


def deploy(model: str, *, replicas: int = 1, num_gpus: float = 0, resources: dict | None = None,
           policy: Any = None, detached: bool = False, namespace: str = NAMESPACE, address: str | None = None,
           worker_options: dict | None = None, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
           **actor_options: Any) -> list[str]:
    """Make ``replicas`` actors for ``model`` (more are stopped, existing ones kept) and wait
    until each one's worker is ready; return their names.

    ``num_gpus``/``resources``: what each replica holds (Ray picks the node and sets
    ``CUDA_VISIBLE_DEVICES``). ``policy``: the worker's policy (a profile name or file).
    ``detached``: the replicas outlive this driver (``python -m runner ray up`` uses it).
    ``actor_options``: more Ray actor options (``scheduling_strategy``...). Replicas restart
    without limit (``max_restarts=-1``); a restarted one starts a fresh server.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    _connect(address)
    cls = ray.remote(SandboxActor)
    handles = []
    for index in range(replicas):
        # No CPU reserved by default: the worker's threads are set by worker_options' threads.
        options = {"num_cpus": 0, **actor_options, "name": actor_name(model, index), "namespace": namespace,
                   "get_if_exists": True, "max_restarts": -1, "max_task_retries": 0,
                   "max_concurrency": max_concurrency, "num_gpus": num_gpus, "resources": resources or {}}
        if detached:
            options["lifetime"] = "detached"
        handles.append(cls.options(**options).remote(model, policy, worker_options))
    ray.get([handle.info.remote() for handle in handles])  # each replica's worker is ready
    names = [actor_name(model, index) for index in range(replicas)]
    if not detached:  # Ray stops an attached actor once no handle to it is left
        _held.update({(namespace, name): handle for name, handle in zip(names, handles)})
    for name in _names(model, namespace)[replicas:]:
        _stop(name, namespace)
    return names


# Handles of the attached replicas this driver deployed: they live as long as it does.
_held: dict[tuple[str, str], Any] = {}


def _stop(name: str, namespace: str) -> None:
    _held.pop((namespace, name), None)
    try:
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    except ValueError:
        pass  # gone meanwhile


def undeploy(model: str, *, namespace: str = NAMESPACE, address: str | None = None) -> int:
    """Stop every replica of ``model``; return how many there were. Their servers stop with them."""
    names = replicas(model, namespace=namespace, address=address)
    for name in names:
        _stop(name, namespace)
    return len(names)


def _default_tenant() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid (a container)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class RayExecutor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose work runs in sourcebox replicas on Ray.

    ``model``: which deployment (``deploy``) to use; calls go to the replica with the fewest
    of this executor's calls in flight. ``tenant``: whose calls these are (default
    ``user@host``); each tenant gets its own connection inside each actor, so the server's
    per-client round robin is fair between researchers. ``max_in_flight``: calls this
    executor has at the replicas at once (the rest wait here, where ``cancel()`` works).
    ``retries``: how often a call runs again when its replica died or became unreachable
    before answering: delivery is at least once, so a call may run twice (make calls with
    side effects outside the worker idempotent). A call is never retried when the worker
    itself failed on it (``WorkerCrashed``, ``RequestTimeout``, ``MemoryLimitExceeded``): a
    poison request must not take down every replica. ``timeout``: seconds a call may run.
    ``same_node``: a replica on this driver's node is reached through its server's socket
    directly (request frames in shared memory, as ``Worker.call``: no copy through Ray's
    object store), Ray still placing, naming and restarting it; ``False`` relays every call
    through the actor.
    """

    def __init__(self, model: str = "tiny-gpt2", *, tenant: str | None = None, max_in_flight: int = 8,
                 retries: int = 2, address: str | None = None, namespace: str = NAMESPACE,
                 timeout: float | None = None, same_node: bool = True):
        if max_in_flight < 1 or retries < 0:
            raise ValueError("max_in_flight must be at least 1 and retries at least 0")
        _connect(address)
        self.model, self.namespace, self.retries, self.timeout = model, namespace, retries, timeout
        self.tenant = tenant if tenant is not None else _default_tenant()
        self._lock = threading.Lock()
        self._handles: dict[str, Any] = {}
        self._in_flight: dict[str, int] = {}
        self._known: dict[str, tuple[str | None, set]] = {}  # replica -> (store id, digests it holds)
        # replica -> a connection to its server (it runs on this node), or until when it is
        # relayed through its actor before the next look (forever: it runs on another node)
        self._paths: dict[str, _SameNode | float] = {}
        self._deciding: dict[str, threading.Lock] = {}  # replica -> held by the thread deciding its path
        self._node = ray.get_runtime_context().get_node_id() if same_node else None
        self._turn = itertools.count()
        self._refresh()
        info = ray.get(self._handles[next(iter(self._handles))].info.remote())
        #: The replicas' policy: what travels as source (``runner.nnsight.install`` reads it).
        self.policy = load_policy(info.get("policy"))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_in_flight, thread_name_prefix="ray-executor")

    def _refresh(self) -> None:
        names = _names(self.model, self.namespace)
        if not names:
            raise errors.RunnerError(
                f"no replicas of model {self.model!r} are deployed in Ray namespace {self.namespace!r}; "
                f"deploy some first: runner.ray.deploy({self.model!r}) or python -m runner ray up {self.model}")
        with self._lock:
            for name in names:
                if name not in self._handles:
                    self._handles[name] = ray.get_actor(name, namespace=self.namespace)
                    self._in_flight.setdefault(name, 0)
            gone = set(self._handles) - set(names)
            for name in gone:
                del self._handles[name]
        for name in gone:
            self._forget_path(name)

    # -- the Executor interface ---------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` in a replica's worker; a Future of its result."""
        def encode(known: Container[str]) -> capture.Bundle:
            return encode_call_frames(fn, args, kwargs, policy=self.policy, known_sources=known)

        return self._pool.submit(self._run, "call", encode, self.timeout)

    def request(self, kind: str, payload: Any = None, *, timeout: float | None = None,
                build: Callable[[Container[str]], tuple[Any, Sequence[str]]] | None = None) -> Any:
        """Send ``payload`` (or what ``build(known)`` makes) to the handler of request ``kind``
        and return its result (as ``Worker.request``; ``runner.nnsight.install(executor)``
        sends traces this way)."""
        def encode(known: Container[str]) -> capture.Bundle:
            return encode_payload(payload, known, policy=self.policy, build=build)

        return self._pool.submit(self._run, kind, encode, self.timeout if timeout is None else timeout).result()

    def run_frames(self, header: Any, frames: Any = (), kind: str = "call", *, timeout: float | None = None) -> Outcome:
        """Relay a request encoded elsewhere (``encode_call_frames``, or ``capture`` on a
        client without ``runner``) and return the ``Outcome`` undecoded, as
        ``Worker.run_frames`` does. Retried on a lost replica like ``submit``; a ``miss`` is
        handed back (bytes from elsewhere cannot be encoded again here)."""
        bundle = capture.Bundle(bytes(header), [memoryview(frame) for frame in frames])
        return self._pool.submit(self._run, kind, lambda known: bundle, timeout, False).result()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        with self._lock:
            links, self._paths = [path for path in self._paths.values() if isinstance(path, _SameNode)], {}
        for link in links:
            link.worker.close()

    # -- one call -------------------------------------------------------------------------
    def _run(self, kind: str, encode: Callable[[Container[str]], capture.Bundle], timeout: float | None,
             decode: bool = True) -> Any:
        failures, resent = 0, False
        while True:
            name = self._pick()
            try:
                outcome = self._send(name, kind, encode, timeout, full=resent)
            except (*_REPLICA_LOST, _DirectLinkLost) as exc:
                failures += 1
                if failures > self.retries:
                    raise errors.WorkerCrashed(
                        f"replica {name} was lost {failures} time(s) running this call "
                        f"({type(exc).__name__}); gave up after {self.retries} retries") from exc
                self._forget(name)
                self._forget_path(name)
                time.sleep(min(0.25 * 2 ** failures, 4.0))  # give Ray time to restart or reschedule it
                self._refresh()
                continue
            finally:
                with self._lock:
                    self._in_flight[name] = self._in_flight.get(name, 1) - 1
            if outcome.kind == MISS and decode and not resent:
                resent = True  # a restarted replica remembers nothing: send every text again
                continue
            return decode_outcome(outcome) if decode else outcome

    def _pick(self) -> str:
        with self._lock:
            turn = next(self._turn)
            names = sorted(self._handles)
            name = min(names, key=lambda n: (self._in_flight[n], (names.index(n) - turn) % len(names)))
            self._in_flight[name] += 1
            return name

    def _send(self, name: str, kind: str, encode: Callable, timeout: float | None, *, full: bool) -> Outcome:
        with self._lock:
            store, known = self._known.get(name, (None, set()))
            known = () if full else set(known)
        bundle = encode(known)
        path = self._same_node(name)
        if path is not None:
            outcome = self._send_same_node(name, path, kind, bundle, timeout)
        else:
            header, frames = _as_array(bundle.header), [_as_array(frame) for frame in bundle.frames]
            outcome = Outcome(*ray.get(self._handles[name].run.remote(self.tenant, kind, header, frames, timeout)))
        if outcome.kind == REPLY:
            self._note(name, outcome.meta.get("sources"), bundle.source_digests)
        elif outcome.kind == MISS:
            self._forget(name)
        return outcome

    def _send_same_node(self, name: str, path: "_SameNode", kind: str, bundle: capture.Bundle,
                        timeout: float | None) -> Outcome:
        """One call over a same-node link. A failure that says the server or its worker was
        ended from outside (the connection lost, a crash or stop reported) is the replica's
        loss, retried, when Ray no longer runs the actor the link was made through (Ray ends
        an actor's children with it); else it stands, as the same failure relayed would."""
        connection_lost = False
        try:
            outcome = path.worker.run_frames(bundle.header, bundle.frames, kind, timeout=timeout)
        except (errors.WorkerCrashed, errors.WorkerStopped) as exc:  # the connection, not the worker
            outcome, connection_lost = failure_outcome(exc), True
        error = (outcome.meta.get("error") or {}) if outcome.kind == ERROR else {}
        if not connection_lost and error.get("category") not in _SERVER_ENDINGS:
            return outcome
        if not self._still_there(name, path):
            self._drop_path(name, path)
            raise _DirectLinkLost(f"replica {name} ended while running this call: {error.get('message')}")
        if connection_lost:
            self._drop_path(name, path)  # its server alone went: the next call links again
        return outcome

    def _same_node(self, name: str) -> "_SameNode | None":
        """The link to replica ``name``'s server when it runs on this node and its socket
        answers here (not, say, across a container boundary); ``None``: relay this call."""
        if self._node is None:
            return None
        with self._lock:
            deciding = self._deciding.setdefault(name, threading.Lock())
            handle = self._handles[name]
        # Calls wait for a decision under way rather than relay meanwhile: a tenant whose
        # first calls went both ways would be two clients at the server, twice its share.
        if not deciding.acquire(timeout=_INFO_SECONDS):
            return None
        try:
            with self._lock:
                path = self._paths.get(name)
            if isinstance(path, _SameNode):
                return path
            if path is not None and time.monotonic() < path:
                return None
            path, look_again = None, time.monotonic() + _LOOK_AGAIN_SECONDS
            try:
                info = ray.get(handle.info.remote(), timeout=_INFO_SECONDS)
            except ray.exceptions.GetTimeoutError:
                info = {}  # busy or restarting: relayed, and looked at again soon
            if info and info.get("node_id") != self._node:
                look_again = float("inf")
            elif info:
                try:
                    # Never a server of our own in its place, and no waiting for a gone one:
                    # a lost replica is retried through Ray, which restarts it.
                    path = _SameNode(Worker(socket=info["socket"], start_server=False, reconnect=0,
                                            timeout=self.timeout), info["actor_pid"])
                except (OSError, errors.RunnerError):
                    pass  # its server is restarting, or its socket is out of reach from here
            with self._lock:
                self._paths[name] = path if path is not None else look_again
            return path
        finally:
            deciding.release()

    def _still_there(self, name: str, path: "_SameNode") -> bool:
        """Whether Ray still runs the actor ``path`` was made through (when it cannot tell in
        time, yes: a failure is then reported as it came)."""
        try:
            info = ray.get(self._handles[name].info.remote(), timeout=_INFO_SECONDS)
        except _REPLICA_LOST:
            return False
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError):
            return True
        return info.get("actor_pid") == path.actor_pid

    def _note(self, name: str, sources: Any, digests: list) -> None:
        store_id = sources.get("id") if isinstance(sources, dict) else None
        with self._lock:
            store, known = self._known.get(name, (None, set()))
            if store_id != store:
                known = set()
            self._known[name] = (store_id, known | set(digests))

    def _forget(self, name: str) -> None:
        with self._lock:
            self._known.pop(name, None)

    def _drop_path(self, name: str, path: "_SameNode") -> None:
        """Close a link that failed, unless another thread already put a new one in its place."""
        with self._lock:
            if self._paths.get(name) is path:
                del self._paths[name]
        path.worker.close()

    def _forget_path(self, name: str) -> None:
        """After a replica was lost or undeployed: decide again how to reach it. A link stays
        (one made since to a restarted actor is fine; a dead one fails on its own)."""
        with self._lock:
            path, undeployed = self._paths.get(name), name not in self._handles
            if undeployed or not isinstance(path, _SameNode):
                self._paths.pop(name, None)
        if undeployed and isinstance(path, _SameNode):
            path.worker.close()

    def __repr__(self) -> str:
        return f"<runner.RayExecutor model {self.model!r} tenant {self.tenant!r} replicas {sorted(self._handles)}>"


# -- python -m runner ray up|down|status ---------------------------------------------------
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner ray", description="sourcebox replicas on a Ray cluster")
    parser.add_argument("--address", default="auto",
                        help="the Ray cluster to join (default: auto, the RAY_ADDRESS variable or the cluster "
                             "`ray start` began on this machine)")
    parser.add_argument("--namespace", default=NAMESPACE, help=f"Ray namespace of the replicas (default {NAMESPACE})")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="deploy detached replicas of a model and wait until they are ready")
    up.add_argument("model", help="tiny-gpt2, a Hugging Face directory on the nodes, or 'none'")
    up.add_argument("--replicas", type=int, default=1)
    up.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica")
    up.add_argument("--policy", default=None, help="the workers' policy: a profile name or policy file")
    down = commands.add_parser("down", help="stop every replica of a model")
    down.add_argument("model")
    status = commands.add_parser("status", help="print the replicas of a model (or of every model) and their servers")
    status.add_argument("model", nargs="?", default=None)
    status.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    _connect(args.address)
    if args.command == "up":
        names = deploy(args.model, replicas=args.replicas, num_gpus=args.num_gpus, policy=args.policy,
                       detached=True, namespace=args.namespace)
        print(f"{len(names)} replica(s) of {args.model} ready: {', '.join(names)}")
        return 0
    if args.command == "down":
        print(f"stopped {undeploy(args.model, namespace=args.namespace)} replica(s) of {args.model}")
        return 0
    names = replicas(args.model, namespace=args.namespace) if args.model else sorted(
        entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == args.namespace and entry["name"].startswith(_PREFIX))
    found = {name: ray.get(ray.get_actor(name, namespace=args.namespace).info.remote()) for name in names}
    if args.json:
        print(json.dumps(found, indent=2, default=str))
    else:
        for name, info in found.items():
            print(f"{name}: node {info['node_ip']} actor pid {info['actor_pid']} server pid {info['server_pid']} "
                  f"worker pid {info['worker_pid']} requests {info['requests']}")
        if not found:
            print("no sourcebox replicas deployed", file=sys.stderr)
    return 0
