"""Shared by the Ray tests: importing this first sets the environment of the loopback test
clusters, which Ray reads when it is itself imported.

Only for these test clusters: Ray on 127.0.0.1 rather than the host's interface address
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), no authentication, no usage reporting. They hold
for this test process and the Ray processes it starts.
"""
import ipaddress
import os

import psutil

RAY_TEST_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(RAY_TEST_ENV)

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def inet_addresses(*, listening: bool = True) -> tuple[int, list]:
    """How many inet addresses this process's descendants (the Ray processes it started,
    and theirs) use, and those outside 127.0.0.0/8 (IPv4-mapped IPv6 read as IPv4).
    ``listening``: count the local addresses of listening sockets too."""
    seen, outside = 0, []
    for process in psutil.Process().children(recursive=True):
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except psutil.Error:
            continue
        for connection in connections:
            addresses = [connection.raddr]
            if listening or connection.status != psutil.CONN_LISTEN:
                addresses.append(connection.laddr)
            for address in filter(None, addresses):
                seen += 1
                ip = ipaddress.ip_address(address.ip)
                ip = getattr(ip, "ipv4_mapped", None) or ip
                if not (ip.version == 4 and ip in LOOPBACK):
                    outside.append((name, connection))
    return seen, outside


def stop_descendants(processes: list, timeout: float = 30) -> None:
    """Wait for processes a test cluster started to exit after its shutdown; kill stragglers;
    then remove the socket directories their actors left (``runner.ray`` sweeps those of dead
    actors when the next one starts; after the last test there is none)."""
    from runner import ray as sourcebox_ray

    psutil.wait_procs(processes, timeout=timeout)
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=5)
    sourcebox_ray._sweep_orphan_dirs()
