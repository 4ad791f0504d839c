"""A cluster without a shared filesystem: a head without CPUs (the driver's node) and one worker
node in its own mount namespace with a private tmpfs over PRIVATE. Merges whose output, then whose
cp input, lies under PRIVATE must be refused before any work. Usage: node_view.py BASE CHAT CP
PRIVATE OUT2. Prints RESULT <json>: per case, the error's type and message."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rmv-", dir="/tmp")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import raymerge  # noqa: E402

base, chat, cp, private, out2 = sys.argv[1:6]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                         "node_ip_address": "127.0.0.1"})
script = os.path.join(os.path.dirname(__file__), "private_node.py")
node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                         f"mount -t tmpfs tmpfs {private} && exec {sys.executable} {script} {cluster.address}"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
results = {}
try:
    assert node.stdout.readline().strip() == "NODE UP", "the private node did not start"
    ray.init(address=cluster.address)
    deadline = time.monotonic() + 60
    while sum(n["Alive"] for n in ray.nodes()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    private_cp = os.path.join(private, "cp")
    shutil.copytree(cp, private_cp)  # the driver sees it; the worker node sees an empty tmpfs there
    cases = {"out": (cp, os.path.join(private, "out")), "input": (private_cp, out2)}
    for case, (cp_url, out) in cases.items():
        try:
            raymerge.merge(base, chat, cp_url, out, scale=0.5, workers=1, item_size="16KiB", shard_size="100KB")
            results[case] = ["ok", ""]
        except Exception as e:  # noqa: BLE001 - reported to the test
            results[case] = [type(e).__name__, str(e)]
        results[case].append(sorted(os.listdir(out)) if os.path.isdir(out) else None)
finally:
    print("RESULT " + json.dumps(results), flush=True)
    ray.shutdown()
    node.stdin.close()
    node.wait(timeout=60)
    cluster.shutdown()
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
