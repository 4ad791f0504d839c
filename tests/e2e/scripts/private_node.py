"""A Ray worker node joining the cluster at GCS_ADDRESS, started from Python as
ray.cluster_utils does (`ray start --address` refuses a second node on loopback). Run it under
`unshare --mount` with a tmpfs over a folder, and the node sees its own, empty, version of that
folder: a cluster without a shared filesystem. Usage: private_node.py GCS_ADDRESS; prints NODE UP,
then runs until its stdin closes."""

import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray._private.node  # noqa: E402
import ray._private.parameter  # noqa: E402

params = ray._private.parameter.RayParams(
    gcs_address=sys.argv[1], redis_address=sys.argv[1], num_cpus=1, num_gpus=0,
    object_store_memory=150 * 2**20, min_worker_port=0, max_worker_port=0, node_ip_address="127.0.0.1",
    include_log_monitor=False, node_manager_port=0)
params.dashboard_agent_listen_port = None
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("NODE UP", flush=True)
sys.stdin.read()
