"""The tokenizer process: where `transformers` runs for the planner, apart from the driver.

transformers brings torch (600 MB resident), which the driver never needs, and most of a tokenizer
build's seconds are that import. So the process is spawned for a build and kept for the next one
while builds follow one another (a Python session planning several merges, a sweep of scales, the
test suite): it ends `IDLE` seconds after its last build, or with the driver.

Each build runs under the driver's environment and directory of that moment, sent with it. The
libraries read some variables once, on import (the Hub's endpoint and caches, AWS credentials in a
cached filesystem): where one of those (`IMPORT_READ`) changed since the process was spawned, the
build gets a new process, as a fresh one would see them.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from raymerge.errors import ResolveError

IDLE = 30.0  # seconds a kept process waits for the next build
# Variables, by prefix, that storage backends and the tokenizer libraries may read once and keep:
# credentials and endpoints, the Hub's and transformers' settings, proxies and certificates.
IMPORT_READ = ("AWS_", "HF_", "HUGGING", "TRANSFORMERS_", "TOKENIZERS_", "GOOGLE_", "GCSFS_", "AZURE_", "FSSPEC_",
               "STORAGE_EMULATOR_HOST", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT",
               "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "XDG_", "HOME", "TMPDIR")

_lock = threading.Lock()  # one build at a time; guards _kept
_kept: dict[str, Any] = {"pool": None, "key": None, "generation": 0}


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in the tokenizer process: what it returns, or the exception it raised."""
    env = dict(os.environ)
    key = sorted((k, v) for k, v in env.items() if k.upper().startswith(IMPORT_READ))
    with _lock:
        _kept["generation"] += 1  # a timer armed before this build ends nothing
        if _kept["key"] != key:
            _end_locked()
            _kept["pool"] = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            _kept["key"] = key
        try:
            return _kept["pool"].submit(_call, env, os.getcwd(), fn, *args).result()
        except BrokenProcessPool as e:
            _end_locked()
            raise ResolveError(f"tokenizer: the process building it was killed ({e}), perhaps out of memory; "
                               "free memory and run the command again") from e
        finally:
            _arm_locked()


def end() -> None:
    """End the kept process now, if there is one."""
    with _lock:
        _kept["generation"] += 1
        _end_locked()


def _call(env: dict[str, str], cwd: str, fn: Callable[..., Any], *args: Any) -> Any:
    """In the process: the driver's environment and directory, then the build."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    return fn(*args)


def _arm_locked() -> None:
    if _kept["pool"] is None:  # ended: a killed process, nothing to wait for
        return
    generation = _kept["generation"]
    timer = threading.Timer(IDLE, _end_idle, args=(generation,))
    timer.daemon = True  # never holds the driver's exit
    timer.start()


def _end_idle(generation: int) -> None:
    with _lock:
        if _kept["generation"] == generation:
            _end_locked()


def _end_locked() -> None:
    pool, _kept["pool"], _kept["key"] = _kept["pool"], None, None
    if pool is not None:
        pool.shutdown(wait=False)
