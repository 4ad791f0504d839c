"""Side-by-side benchmark on one synthetic trio, in one invocation:

  floor      plainly reading the three inputs and writing one output of the same size (2 threads,
             direct I/O for the output where the file system allows), and the float32 kernel
             alone over the same number of elements (2 threads): the machine's floor is the larger
  raymerge   on a running Ray cluster (`ray start --head`, then `raymerge merge --address`)
  recipe     the same head running mergekit's own file (`raymerge run mergekit.yml --address`), in
             mergekit's order of operations
  embedded   `raymerge merge` starting its own local Ray
  paper      the paper's own approach: load three whole models, cp += lam * (chat - base) in place
             in bf16, save
  mergekit   mergekit-yaml task_arithmetic (dtype float32, out_dtype bfloat16), when --mergekit
             points at its executable (install it in a venv of its own)
  merge2     a plain merge of two vectors on the same head, the baseline of `ties`:
             `raymerge merge --base B --chat CHAT --chat CP --cp B` (out = base + 0.7 (chat - base)
             + 0.5 (cp - base)): the same three reads and one write as `ties`
  ties       the same head running a mergekit ties file (`raymerge run ties.yml --address`): two
             vectors over base, chat (weight 0.7, density 0.3) and cp (weight 0.5, density 0.6)
  mergekit-ties  mergekit-yaml on the same ties file (dtype float32, out_dtype bfloat16)
  METHOD     with --method METHOD (repeatable: slerp, nuslerp, nuslerp-rows, multislerp, model_stock,
             model_stock-rows, karcher, karcher-default, nearswap, passthrough, passthrough-slices,
             breadcrumbs, breadcrumbs_ties, ram, ramplus_tl, sce, della, della_linear, arcee_fusion): `raymerge run` of
             that mergekit file (dtype bfloat16) on the same head, and `mergekit-METHOD`, mergekit-yaml
             on it; the table gives each one's wall time over merge2's, as the median of the rounds'
             ratios (each round runs both: a drift of the machine's speed between rounds cancels)

With --warm-head, every row run on a head is measured on one that has run the same command once
already (unmeasured); else on a fresh one. Every contender (and the floor) starts after a sync,
with the trio's files read into the page cache once more: what one contender held in memory does
not decide whether the next reads the disk.

Prints a table (wall, GB/s, peak RSS of the largest process, ratio to the floor), the peak RSS of
every process of the raymerge rows (driver, each worker), the ratio ties / merge2, checks that
raymerge (and the mergekit file run by raymerge) and mergekit agree bit for bit (ties: all but the
magnitudes tied at a vector's threshold, where each tool keeps its own choice; bf16 inputs have
many), writes results JSON and a PNG chart.

    python bench/make_synthetic.py /tmp/trio --params 750e6
    python bench/run.py /tmp/trio --mergekit /tmp/mkvenv/bin/mergekit-yaml --results bench/results [--repeat 3]
        [--skip paper --skip embedded ...]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from memwatch import watch  # noqa: E402

SCALE = 0.5
# ties and merge2: two vectors over base, (model, weight, density)
TIES = (("chat", 0.7, 0.3), ("cp", 0.5, 0.6))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trio", help="folder with base/, chat/, cp/ (bench/make_synthetic.py)")
    p.add_argument("--mergekit", help="path to mergekit-yaml (mergekit 0.1.5)")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--work", default="/tmp/raymerge-bench", help="scratch folder for outputs")
    p.add_argument("--skip", action="append", default=[], help="skip a contender (paper, embedded, ...)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every contender; the table shows medians")
    p.add_argument("--warm-head", action="store_true",
                   help="each head-run row (merge2, ties, recipe, METHOD) is measured on a head that has run "
                        "the same command once before (a fresh head otherwise)")
    p.add_argument("--method", action="append", default=[], choices=list(METHOD_FILES),
                   help="add a mergekit method's file, run by raymerge and by mergekit (repeatable)")
    args = p.parse_args()
    for method in args.method:
        RUNNERS[method] = _method_runner(method, raymerge=True)
        RUNNERS[f"mergekit-{method}"] = _method_runner(method, raymerge=False)
    os.makedirs(args.results, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    trio = {r: os.path.join(args.trio, r) for r in ("base", "chat", "cp")}
    out_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(trio["cp"], "*.safetensors")))
    unknown = set(args.skip) - set(RUNNERS)
    if unknown:
        p.error(f"--skip {', '.join(sorted(unknown))}: the contenders are {', '.join(RUNNERS)}")
    names = [n for n in RUNNERS if n not in args.skip and (not n.startswith("mergekit") or args.mergekit)]
    # Rounds interleave the contenders, so that a drift of the machine's speed reaches them all alike.
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        floor_io = io_floor(trio, os.path.join(args.work, "floor.bin"))
        runs.setdefault("floor: read 3 + write 1", []).append({"wall_s": floor_io})
        runs.setdefault("floor: float32 kernel", []).append({"wall_s": kernel_floor(out_bytes // 2)})
        for name in names:
            _settle(trio)
            out = os.path.join(args.work, name)
            shutil.rmtree(out, ignore_errors=True)
            runs.setdefault(name, []).append(RUNNERS[name](trio, out, args))
    rows = [{"name": name, **_median(done)} for name, done in runs.items()]
    if "merge2" in runs:  # each contender's ratio to merge2 in every round
        for row in (r for r in rows if r["name"] in names):
            row["x_merge2_runs"] = [r["wall_s"] / m["wall_s"] for r, m in zip(runs[row["name"]], runs["merge2"])]
    floor = max(rows[0]["wall_s"], rows[1]["wall_s"])
    for row in rows:
        row["gbps"] = out_bytes / row["wall_s"] / 1e9
        row["x_floor"] = row["wall_s"] / floor
    def agreement(ours: str, theirs: str) -> dict | None:
        if ours in names and theirs in names:
            return compare(os.path.join(args.work, ours), os.path.join(args.work, theirs))
        return None

    result = {"trio": args.trio, "output_bytes": out_bytes, "floor_s": floor, "warm_head": args.warm_head, "rows": rows,
              "methods": {m: agreement(m, f"mergekit-{m}") for m in args.method},
              "raymerge_equals_mergekit": agreement("raymerge", "mergekit"),
              "recipe_equals_mergekit": agreement("recipe", "mergekit"),
              "ties_equals_mergekit_ties": agreement("ties", "mergekit-ties")}
    print_table(result)
    with open(os.path.join(args.results, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    chart(result, os.path.join(args.results, "bench.png"))
    print(f"results: {args.results}/bench.json, {args.results}/bench.png")


def _median(done: list[dict]) -> dict:
    """The run of median wall time, with every run's wall time beside it."""
    middle = sorted(done, key=lambda r: r["wall_s"])[len(done) // 2]
    return {**middle, "runs_wall_s": [r["wall_s"] for r in done]}


def _settle(trio: dict | None = None) -> None:
    """Let the previous contender's dirty pages and discards drain: they slow the next one down.
    Given the trio, read its files once more, so that every contender starts with the inputs in
    the page cache, as the floor does (a contender that held gigabytes, mergekit's loads, can push
    them out, and the next one would read the disk while the others read memory)."""
    subprocess.run(["sync"])
    if trio is not None:
        buf = bytearray(32 << 20)
        for f in _input_files(trio):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    time.sleep(3)


def _input_files(trio: dict) -> list[str]:
    return [f for r in ("base", "chat", "cp") for f in sorted(glob.glob(os.path.join(trio[r], "*.safetensors")))]


def io_floor(trio: dict, out: str) -> float:
    files = _input_files(trio)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(trio["cp"], "*.safetensors")))
    block = 32 << 20
    flags = os.O_CREAT | os.O_WRONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd_out = os.open(out, flags)
    except OSError:
        fd_out = os.open(out, os.O_CREAT | os.O_WRONLY)
    os.ftruncate(fd_out, size)

    def worker(k: int) -> None:
        import mmap

        buf = mmap.mmap(-1, block)
        for f in files[k::2]:
            fd = os.open(f, os.O_RDONLY)
            pos = 0
            while (got := os.preadv(fd, [buf], pos)) > 0:
                pos += got
            os.close(fd)
        for off in range(k * block, size - size % 4096, 2 * block):
            n = min(block, (size - off) // 4096 * 4096)
            os.pwrite(fd_out, memoryview(buf)[:n], off)

    _settle(trio)
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    os.close(fd_out)
    os.remove(out)
    return wall


def kernel_floor(elements: int) -> float:
    """Seconds for `elements` of float32 cp + s * (chat - base), bf16 in and out, on 2 threads:
    measured on 64M elements per thread and scaled."""
    import torch

    torch.set_num_threads(1)
    per = 1 << 26
    data = [[torch.randn(per).bfloat16() for _ in range(4)] for _ in range(2)]

    def kernel(cp, chat, base, out):
        c = 1 << 16
        acc, x, y = torch.empty(c), torch.empty(c), torch.empty(c)
        for a, b, d, o in zip(cp.split(c), chat.split(c), base.split(c), out.split(c)):
            acc.copy_(a)
            x.copy_(b)
            y.copy_(d)
            x.sub_(y)
            x.mul_(SCALE)
            acc.add_(x)
            o.copy_(acc)

    for d in data:
        kernel(*d)  # warm up
    started = time.perf_counter()
    threads = [threading.Thread(target=kernel, args=tuple(d)) for d in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.perf_counter() - started) * elements / (2 * per)


def _cli(trio: dict, out: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "raymerge", "merge", "--base", trio["base"], "--chat", trio["chat"], "--cp",
            trio["cp"], "--out", out, "--scale", str(SCALE), *extra]


@contextlib.contextmanager
def ray_head(num_cpus: int, port: str = "6399") -> Iterator[str]:
    """A running Ray cluster on this machine (`ray start --head`), as users run raymerge; its address."""
    temp = tempfile.mkdtemp(prefix="rmb-", dir="/tmp")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
                             "--port", port, "--num-cpus", str(num_cpus), "--temp-dir", temp,
                             "--node-ip-address", "127.0.0.1", "--include-dashboard", "false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        time.sleep(8)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's whole process group, never `ray stop`
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def merge_on(address: str, trio: dict, out: str, work: str, extra: list[str] = ()) -> dict:
    """One `raymerge merge --address` run: whole-command wall time, execute phase, peak memory."""
    report = os.path.join(work, "report-cluster.json")
    m = watch(_cli(trio, out, ["--address", address, "--report", report, *extra]))
    return _head_row(m, report)


def _head_row(m: dict, report: str) -> dict:
    """A run on a running head: memwatch's figures for the driver (the command), the report's for
    the workers (which are the head's children, not the command's)."""
    if m["rc"] != 0:
        raise SystemExit(f"a raymerge run failed (rc {m['rc']})")
    r = json.load(open(report))
    driver = m["peak_rss"][0]["rss_mib"]
    workers = {w: v / 2**20 for w, v in r["peak_rss_per_worker"].items()}
    return {"wall_s": m["wall_s"], "execute_s": r["execute_seconds"], "steady_gbps": r["steady_gbps"],
            "peak_rss_mib": max([*workers.values(), driver]),
            "worker_peak_rss_mib": workers, "driver_peak_rss_mib": driver, "report": r}


def run_raymerge_cluster(trio: dict, out: str, args) -> dict:
    with ray_head(os.cpu_count()) as address:
        return merge_on(address, trio, out, args.work)


def run_raymerge_embedded(trio: dict, out: str, args) -> dict:
    report = os.path.join(args.work, "report-embedded.json")
    env_free = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    os.environ.clear()
    os.environ.update(env_free)
    m = watch(_cli(trio, out, ["--report", report]))
    r = json.load(open(report))
    return {"wall_s": m["wall_s"], "execute_s": r["execute_seconds"], "steady_gbps": r["steady_gbps"],
            "peak_rss_mib": m["peak_rss"][0]["rss_mib"], "top_processes": m["peak_rss"][:4]}


PAPER = """
import glob, os, sys, torch
from safetensors.torch import load_file, save_file
base, chat, cp, out, lam = sys.argv[1:6]
def load(d):
    t = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        t.update(load_file(f))
    return t
b, c, m = load(base), load(chat), load(cp)
for k in m:
    m[k] += float(lam) * (c[k] - b[k])   # bf16, in place, as the paper's code does
os.makedirs(out, exist_ok=True)
save_file(m, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
"""


def run_paper(trio: dict, out: str, args) -> dict:
    m = watch([sys.executable, "-c", PAPER, trio["base"], trio["chat"], trio["cp"], out, str(SCALE)])
    return {"wall_s": m["wall_s"], "peak_rss_mib": m["peak_rss"][0]["rss_mib"]}


def mergekit_config(trio: dict, work: str) -> str:
    """The chat vector as a mergekit file: task_arithmetic over base, cp at weight 1, chat at SCALE."""
    cfg = os.path.join(work, "mergekit.yml")
    with open(cfg, "w") as f:
        f.write(f"""merge_method: task_arithmetic
base_model: {trio['base']}
models:
  - model: {trio['cp']}
    parameters: {{weight: 1.0}}
  - model: {trio['chat']}
    parameters: {{weight: {SCALE}}}
parameters: {{normalize: false}}
dtype: float32
out_dtype: bfloat16
""")
    return cfg


def ties_config(trio: dict, work: str) -> str:
    """TIES of two vectors over base (TIES above), mergekit's defaults otherwise (normalize: true)."""
    cfg = os.path.join(work, "ties.yml")
    models = "".join(f"  - model: {trio[role]}\n    parameters: {{weight: {w}, density: {d}}}\n" for role, w, d in TIES)
    with open(cfg, "w") as f:
        f.write(f"merge_method: ties\nbase_model: {trio['base']}\nmodels:\n{models}dtype: float32\n"
                "out_dtype: bfloat16\n")
    return cfg


def _mergekit(cfg: str, out: str, args, log: str) -> dict:
    m = watch([args.mergekit, cfg, out], log=os.path.join(args.work, log))
    if m["rc"] != 0:
        raise SystemExit(f"mergekit failed (rc {m['rc']}): see {os.path.join(args.work, log)}")
    return {"wall_s": m["wall_s"], "peak_rss_mib": m["peak_rss"][0]["rss_mib"], "top_processes": m["peak_rss"][:4]}


def run_mergekit(trio: dict, out: str, args) -> dict:
    return _mergekit(mergekit_config(trio, args.work), out, args, "mergekit.log")


def run_mergekit_ties(trio: dict, out: str, args) -> dict:
    return _mergekit(ties_config(trio, args.work), out, args, "mergekit-ties.log")


def _run_on_head(recipe: str, trio: dict, out: str, args, name: str) -> dict:
    """`raymerge run FILE --address` on a running head."""
    return _head_run([sys.executable, "-m", "raymerge", "run", recipe, "--out", out], trio, out, args, name)


def _head_run(cmd: list[str], trio: dict, out: str, args, name: str) -> dict:
    """cmd on a head of its own, measured. With --warm-head the head first runs it once, unmeasured:
    a head that has served a job, whose object store's pages were touched then (on a fresh head the
    first passes that keep values touch them: karcher's mean and first iterations, seconds slower;
    README, Performance)."""
    report = os.path.join(args.work, f"report-{name}.json")
    with ray_head(os.cpu_count()) as address:
        if args.warm_head:
            subprocess.run(cmd + ["--address", address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=True)
            shutil.rmtree(out)
            _settle(trio)
        m = watch(cmd + ["--address", address, "--report", report])
    return _head_row(m, report)


def run_raymerge_recipe(trio: dict, out: str, args) -> dict:
    """`raymerge run mergekit.yml --address`: mergekit's own file, in mergekit's order, on a running head."""
    return _run_on_head(mergekit_config(trio, args.work), trio, out, args, "recipe")


def run_raymerge_ties(trio: dict, out: str, args) -> dict:
    """`raymerge run ties.yml --address`: mergekit's ties file on a running head."""
    return _run_on_head(ties_config(trio, args.work), trio, out, args, "ties")


def run_raymerge_merge2(trio: dict, out: str, args) -> dict:
    """The plain two-vector merge of the trio on a running head: base + 0.7 (chat - base) + 0.5 (cp - base)."""
    cmd = [sys.executable, "-m", "raymerge", "merge", "--base", trio["base"], "--cp", trio["base"], "--out", out]
    for role, w, _ in TIES:
        cmd += ["--chat", trio[role], "--scale", str(w)]
    return _head_run(cmd, trio, out, args, "merge2")


# The mergekit files of --method: the trio's roles in {braces}; every one computes in bfloat16.
METHOD_FILES = {
    "slerp": "base_model: {base}\nmodels:\n  - model: {base}\n  - model: {chat}\nparameters: {{t: 0.35}}\n",
    "nuslerp": "base_model: {base}\nmodels:\n  - model: {chat}\n    parameters: {{weight: 0.7}}\n"
               "  - model: {cp}\n    parameters: {{weight: 0.3}}\n",
    "multislerp": "base_model: {base}\nmodels:\n  - model: {chat}\n    parameters: {{weight: 0.6}}\n"
                  "  - model: {cp}\n    parameters: {{weight: 0.4}}\n",
    "model_stock": "base_model: {base}\nmodels:\n  - model: {chat}\n  - model: {cp}\n",
    # mergekit's test's karcher: the base joins the two models; 5 iterations, 17 statistics passes
    "karcher": "base_model: {base}\nmodels:\n  - model: {chat}\n  - model: {cp}\nparameters: {{max_iter: 5}}\n",
    # mergekit's defaults (max_iter 10): 32 statistics passes
    "karcher-default": "base_model: {base}\nmodels:\n  - model: {chat}\n  - model: {cp}\n",
    "nearswap": "base_model: {base}\nmodels:\n  - model: {base}\n  - model: {chat}\nparameters: {{t: 0.004}}\n",
    "passthrough": "models:\n  - model: {chat}\n    parameters: {{scale: 0.8}}\n",
    "breadcrumbs": "base_model: {base}\nmodels:\n  - model: {chat}\n    parameters: {{weight: 0.7, density: 0.3, gamma: 0.05}}\n"
                   "  - model: {cp}\n    parameters: {{weight: 0.5, density: 0.6}}\n",
    "ram": "base_model: {base}\nmodels:\n  - model: {chat}\n  - model: {cp}\nparameters: {{epsilon: 0.004}}\n",
    "sce": "base_model: {base}\nmodels:\n  - model: {chat}\n  - model: {cp}\nparameters: {{select_topk: 0.3}}\n",
}
# a frankenmerge: 20 layers stacked from chat's first 10 and cp's last 10 (of 16)
METHOD_FILES["passthrough-slices"] = ("slices:\n  - sources: [{{model: {chat}, layer_range: [0, 10]}}]\n"
                                      "  - sources: [{{model: {cp}, layer_range: [6, 16]}}]\n")
METHOD_FILES["nuslerp-rows"] = METHOD_FILES["nuslerp"] + "parameters: {{nuslerp_flatten: false}}\n"
METHOD_FILES["model_stock-rows"] = METHOD_FILES["model_stock"] + "parameters: {{filter_wise: true}}\n"
METHOD_FILES["breadcrumbs_ties"] = METHOD_FILES["breadcrumbs"] + "parameters: {{rescale: true}}\n"
METHOD_FILES["ramplus_tl"] = METHOD_FILES["ram"]
METHOD_FILES["della"] = METHOD_FILES["breadcrumbs"].replace("gamma: 0.05", "epsilon: 0.15")
METHOD_FILES["della_linear"] = METHOD_FILES["della"]
METHOD_FILES["arcee_fusion"] = "base_model: {base}\nmodels:\n  - model: {chat}\n"


def method_config(method: str, trio: dict, work: str) -> str:
    cfg = os.path.join(work, f"{method}.yml")
    with open(cfg, "w") as f:
        f.write(f"merge_method: {method.split('-')[0]}\n" + METHOD_FILES[method].format(**trio) + "dtype: bfloat16\n")
    return cfg


def _method_runner(method: str, raymerge: bool):
    def run(trio: dict, out: str, args) -> dict:
        cfg = method_config(method, trio, args.work)
        if raymerge:
            return _run_on_head(cfg, trio, out, args, method)
        return _mergekit(cfg, out, args, f"mergekit-{method}.log")
    return run


RUNNERS = {"raymerge": run_raymerge_cluster, "recipe": run_raymerge_recipe, "merge2": run_raymerge_merge2,
           "ties": run_raymerge_ties, "embedded": run_raymerge_embedded, "paper": run_paper,
           "mergekit": run_mergekit, "mergekit-ties": run_mergekit_ties}


def compare(a: str, b: str) -> dict:
    import torch
    from safetensors import safe_open

    def tensors(folder):
        for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    yield k, h.get_tensor(k)

    theirs = dict(tensors(b))
    differ = total = 0
    for k, t in tensors(a):
        differ += int((t.view(torch.int16) != theirs[k].view(torch.int16)).sum())
        total += t.numel()
    return {"elements": total, "differing": differ}


def print_table(result: dict) -> None:
    print(f"output {result['output_bytes'] / 1e9:.2f} GB; floor {result['floor_s']:.2f}s")
    print(f"{'contender':28s} {'wall s':>8s} {'GB/s':>7s} {'peak RSS MiB':>13s} {'x floor':>8s}")
    for r in result["rows"]:
        rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "-"
        spread = "  (runs: " + ", ".join(f"{w:.2f}" for w in r["runs_wall_s"]) + ")" if len(r["runs_wall_s"]) > 1 else ""
        print(f"{r['name']:28s} {r['wall_s']:8.2f} {r['gbps']:7.2f} {rss:>13s} {r['x_floor']:8.2f}{spread}")
        if "execute_s" in r:
            print(f"{'  (execute phase)':28s} {r['execute_s']:8.2f} {result['output_bytes'] / r['execute_s'] / 1e9:7.2f} "
                  f"{'':>13s} {r['execute_s'] / result['floor_s']:8.2f}")
            # The steady rate (10% to 90% of the bytes), as the seconds it would take for the whole output.
            steady_s = result["output_bytes"] / (r["steady_gbps"] * 1e9)
            print(f"{'  (steady state)':28s} {steady_s:8.2f} {r['steady_gbps']:7.2f} {'':>13s} "
                  f"{steady_s / result['floor_s']:8.2f}")
    for r in result["rows"]:
        if "worker_peak_rss_mib" in r:
            workers = ", ".join(f"{v:.0f}" for v in r["worker_peak_rss_mib"].values())
            print(f"{r['name']}: peak RSS MiB: driver {r['driver_peak_rss_mib']:.0f}, workers {workers}")
        elif "top_processes" in r:
            print(f"{r['name']}: peak RSS MiB: " + ", ".join(f"{p['rss_mib']:.0f} ({p['process'].strip()})"
                                                             for p in r["top_processes"]))
    for key, what in (("raymerge_equals_mergekit", "raymerge merge vs mergekit"),
                      ("recipe_equals_mergekit", "raymerge run mergekit.yml vs mergekit"),
                      ("ties_equals_mergekit_ties", "raymerge run ties.yml vs mergekit ties")):
        if result.get(key):
            c = result[key]
            print(f"{what}: {c['differing']} of {c['elements']} elements differ")
    walls = {r["name"]: r["wall_s"] for r in result["rows"]}
    rows = {r["name"]: r for r in result["rows"]}
    for name in ("raymerge", "embedded"):
        if name in walls and "mergekit" in walls:
            print(f"{name}: {walls['mergekit'] / walls[name]:.1f}x faster than mergekit, end to end")
    if "ties" in walls and "mergekit-ties" in walls:
        print(f"ties: {walls['mergekit-ties'] / walls['ties']:.1f}x faster than mergekit ties, end to end")
    for method, c in (result.get("methods") or {}).items():
        paired = rows[method].get("x_merge2_runs")
        ratio = f"{statistics.median(paired):.2f}x merge2" if paired else ""
        if paired and len(paired) > 1:
            ratio += " (rounds: " + ", ".join(f"{x:.2f}" for x in paired) + ")"
        mk = f", {walls[f'mergekit-{method}'] / walls[method]:.1f}x faster than mergekit" \
            if f"mergekit-{method}" in walls else ""
        agree = f"; {c['differing']} of {c['elements']} elements differ from mergekit's" if c else ""
        print(f"{method}: {ratio}{mk}{agree}")
    if "ties" in rows and "merge2" in rows:
        t, m = rows["ties"], rows["merge2"]
        passes = sum(t["report"].get("statistics_pass_seconds", {}).values())
        print(f"ties / merge2 (two vectors, same trio, same head): wall {t['wall_s'] / m['wall_s']:.2f}x, "
              f"execute {t['execute_s'] / m['execute_s']:.2f}x, statistics passes and execute "
              f"{(t['execute_s'] + passes) / m['execute_s']:.2f}x")


LABELS = {"raymerge": "raymerge --address (running cluster)", "embedded": "raymerge, embedded (own local Ray)",
          "paper": "paper's approach (3 whole models)", "mergekit": "mergekit 0.1.5 task_arithmetic",
          "recipe": "raymerge run mergekit.yml (task_arithmetic)", "merge2": "raymerge merge, two vectors",
          "ties": "raymerge run ties.yml (two vectors)", "mergekit-ties": "mergekit 0.1.5 ties (two vectors)"}


def chart(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh([LABELS.get(r["name"], r["name"]) for r in rows], [r["wall_s"] for r in rows], color="#4477aa")
    for i, r in enumerate(rows):
        ax.text(r["wall_s"], i, f" {r['wall_s']:.1f}s", va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12 * max(r["wall_s"] for r in rows))  # room for the labels
    ax.set_xlabel("wall seconds (lower is better)")
    ax.set_title(f"merges of a {result['output_bytes'] / 1e9:.2f} GB trio (bf16 out, float32 math)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
