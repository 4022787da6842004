"""A replica outlives its node: two loopback Ray nodes (127.0.0.2 and 127.0.0.3, which Ray
uses as given), the replica's node removed, the next call served on the other one."""
import pytest

from ray_support import inet_addresses, stop_descendants  # first: the test clusters' environment

ray = pytest.importorskip("ray")

import psutil  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

import runner  # noqa: E402
from runner import ray as sourcebox_ray  # noqa: E402

NAMESPACE = "sourcebox-nodes"
# A lost node is noticed within a few seconds rather than Ray's default half minute.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_failure_threshold": 3}


def node_of_replica():
    return ray.get(ray.get_actor(sourcebox_ray.actor_name("none", 0), namespace=NAMESPACE).info.remote())["node_ip"]


def add(a, b):
    return a + b


def test_a_replica_moves_to_the_other_node_when_its_node_is_removed():
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "node_ip_address": "127.0.0.2", "num_cpus": 1, "resources": {"replica": 1}, "include_dashboard": False,
        "_system_config": FAST_HEALTH_CHECKS})
    try:
        other = cluster.add_node(node_ip_address="127.0.0.3", num_cpus=1, resources={"replica": 1})
        ray.init(address=cluster.address, _node_ip_address="127.0.0.2", namespace=NAMESPACE, log_to_driver=False)
        # Placed on 127.0.0.3 first, free to move (soft affinity) when it is gone.
        sourcebox_ray.deploy("none", namespace=NAMESPACE, resources={"replica": 1},
                             scheduling_strategy=NodeAffinitySchedulingStrategy(other.node_id, soft=True))
        with runner.RayExecutor("none", namespace=NAMESPACE, retries=5) as pool:
            assert pool.submit(add, 40, 2).result() == 42
            assert node_of_replica() == "127.0.0.3"
            seen, outside = inet_addresses(listening=False)
            assert seen > 10 and outside == []  # every connection, on both nodes, on loopback
            cluster.remove_node(other)
            assert pool.submit(add, 1, 2).result(timeout=30) == 3
            assert node_of_replica() == "127.0.0.2"
    finally:
        ours = psutil.Process().children(recursive=True)
        ray.shutdown()
        cluster.shutdown()
        stop_descendants(ours)
