"""Run a command and report its wall time and the peak resident memory of every process in its tree.

    python bench/memwatch.py -- raymerge merge ...
Ray's workers and daemons are children of the command (embedded mode), so all are seen.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil


def watch(cmd: list[str], interval: float = 0.1, log: str | None = None, env: dict | None = None) -> dict:
    """Run cmd (its output to `log` when given; in `env` when given) and sample its process tree's
    memory: each process's peak RSS, peak RSS less shared pages, and the kernel's high-water mark
    (VmHWM, which sees peaks between samples)."""
    peaks: dict[int, dict] = {}
    out = open(log, "w") if log else None
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env)
    root = psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    mem = p.memory_info()
                    name = " ".join(p.cmdline()[:3])[-60:] or p.name()  # read each time: a Ray worker renames itself
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                row = peaks.setdefault(p.pid, {"process": name, "rss": 0, "unshared": 0, "hwm": 0})
                if mem.rss > row["rss"]:
                    row.update(process=name, rss=mem.rss)
                row["unshared"] = max(row["unshared"], mem.rss - mem.shared)
                row["hwm"] = max(row["hwm"], _hwm(p.pid))
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    t.start()
    rc = proc.wait()
    wall = time.perf_counter() - started
    done.set()
    t.join()
    if out:
        out.close()
    top = sorted(peaks.values(), key=lambda x: -x["rss"])
    return {"rc": rc, "wall_s": wall, "peak_rss": [{"process": r["process"], "rss_mib": r["rss"] / 2**20,
                                                    "unshared_mib": r["unshared"] / 2**20, "hwm_mib": r["hwm"] / 2**20}
                                                   for r in top]}


def _hwm(pid: int) -> int:
    """The kernel's high-water mark of a process's resident memory (VmHWM), in bytes; 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    result = watch(args)
    print(f"wall {result['wall_s']:.2f}s rc {result['rc']}")
    for row in result["peak_rss"][:12]:
        print(f"  {row['rss_mib']:8.0f} MiB  {row['process']}")

