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


def watch(cmd: list[str], interval: float = 0.1, log: str | None = None) -> dict:
    """Run cmd (its output to `log` when given) and sample its process tree's memory."""
    peaks: dict[int, tuple[str, int]] = {}
    out = open(log, "w") if log else None
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None)
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
                    rss = p.memory_info().rss
                    name = " ".join(p.cmdline()[:3])[-60:] or p.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if rss > peaks.get(p.pid, ("", 0))[1]:
                    peaks[p.pid] = (name, rss)
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
    top = sorted(peaks.values(), key=lambda x: -x[1])
    return {"rc": rc, "wall_s": wall, "peak_rss": [{"process": n, "rss_mib": r / 2**20} for n, r in top]}


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    result = watch(args)
    print(f"wall {result['wall_s']:.2f}s rc {result['rc']}")
    for row in result["peak_rss"][:12]:
        print(f"  {row['rss_mib']:8.0f} MiB  {row['process']}")

