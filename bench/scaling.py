"""Check the scaling model of README.md ("Scaling model") with runs at 1, 2 and 4 workers.

    python bench/scaling.py /tmp/trio            # a trio from bench/make_synthetic.py

The model: the execute phase takes O / (min(workers, cores) * k) when compute binds, where O is
the output bytes and k the output bytes per second that one worker's item pipeline (read,
float32 arithmetic, write, checksum) makes on one core: a worker is one CPU (--cpus-per-worker
1); its second item in flight hides storage latency, it adds no core. k is measured here by one
run with one worker and one item in flight; the runs at 1, 2 and 4 workers (two items in flight
each, on a head with 4 CPUs, so 4 workers oversubscribe the 2 cores) are then predicted and
measured. The same k gives the 70B prediction for a cluster whose nodes have --cores cores
(workers) and --node-gbps of storage bandwidth each, printed last.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run import _settle, merge_on, ray_head  # noqa: E402

LLAMA2_70B_BYTES = 137.96e9  # bf16 output of a Llama-2-70B merge; it reads three times as much


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trio", help="folder with base/, chat/, cp/ (bench/make_synthetic.py)")
    p.add_argument("--work", default="/tmp/raymerge-scaling", help="scratch folder for outputs")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--cores", type=int, default=16, help="cores per node, for the 70B prediction")
    p.add_argument("--node-gbps", type=float, default=3.1, help="storage GB/s per node (25 Gbit/s: 3.1)")
    args = p.parse_args()
    trio = {r: os.path.join(args.trio, r) for r in ("base", "chat", "cp")}
    out_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(trio["cp"], "*.safetensors")))
    cores = os.cpu_count()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    os.makedirs(args.results, exist_ok=True)

    runs = []
    with ray_head(4) as address:
        for workers, in_flight in ((1, 1), (1, 2), (2, 2), (4, 2)):
            _settle()
            out = os.path.join(args.work, f"out-{workers}x{in_flight}")
            r = merge_on(address, trio, out, args.work, ["--workers", str(workers), "--in-flight", str(in_flight)])
            runs.append({"workers": workers, "in_flight": in_flight, "execute_s": r["execute_s"], "wall_s": r["wall_s"]})
            shutil.rmtree(out, ignore_errors=True)
    k = out_bytes / runs[0]["execute_s"]
    print(f"output {out_bytes / 1e9:.2f} GB on {cores} cores; one worker's pipeline: k = {k / 1e9:.3f} GB/s per core")
    print(f"{'workers':>7s} {'in flight':>9s} {'predicted s':>11s} {'measured s':>10s}")
    for r in runs:
        r["predicted_s"] = out_bytes / (min(r["workers"], cores) * k)
        print(f"{r['workers']:7d} {r['in_flight']:9d} {r['predicted_s']:11.2f} {r['execute_s']:10.2f}")
    print(f"70B ({LLAMA2_70B_BYTES / 1e9:.0f} GB out, {3 * LLAMA2_70B_BYTES / 1e9:.0f} GB read), nodes of "
          f"{args.cores} cores and {args.node_gbps} GB/s:")
    for n in (1, 4, 8, 16):
        t = LLAMA2_70B_BYTES * max(3 / (n * args.node_gbps * 1e9), 1 / (n * args.cores * k))
        print(f"  {n:2d} nodes: {t:6.0f} s of execute")
    with open(os.path.join(args.results, "scaling.json"), "w") as f:
        json.dump({"trio": args.trio, "output_bytes": out_bytes, "cores": cores, "k_bytes_per_s": k, "runs": runs}, f,
                  indent=1)


if __name__ == "__main__":
    main()
