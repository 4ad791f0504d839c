"""Run a merge on a simulated 3-node cluster (head without CPUs, two 1-CPU nodes) and remove
one worker node mid-run. Usage: node_loss.py BASE CHAT CP OUT. Prints RESULT <json>."""

import json
import os
import sys
import tempfile
import threading
import time

# A private, short temp dir: Cluster writes its address file under RAY_TMPDIR, not the machine's /tmp/ray.
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rmc-", dir="/tmp")
os.environ["RAYMERGE_TEST_ITEM_DELAY"] = "0.3"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import raymerge  # noqa: E402

base, chat, cp, out = sys.argv[1:5]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                         "node_ip_address": "127.0.0.1"})
nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
errors, result = [], {}


def go():
    try:
        r = raymerge.merge(base, chat, cp, out, scale=0.5, workers=2, item_size="4KiB", shard_size="100KB")
        result["peak"] = r.peak_rss
    except BaseException as e:  # noqa: BLE001
        errors.append(repr(e))


t = threading.Thread(target=go)
t.start()
staging = os.path.join(out, ".raymerge-staging")
deadline = time.monotonic() + 120
while time.monotonic() < deadline and not (os.path.isdir(staging) and
                                            any(n.startswith("journal-0") for n in os.listdir(staging))):
    time.sleep(0.1)
cluster.remove_node(nodes[1])
t.join(timeout=300)
print("RESULT " + json.dumps({"errors": errors, "workers": sorted(result.get("peak", {}))}), flush=True)
ray.shutdown()
cluster.shutdown()
import shutil  # noqa: E402

shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
