"""The torch process: where the methods' `reduce` computes mergekit's scalars (steps.in_torch).

torch's acos, sin and cos give mergekit's bits, numpy's may not; but the driver never imports
torch (470 MiB resident). So one child process of the driver imports it, spawned when a run whose
methods need it starts its workers (`start`), and computes each call sent down a pipe: a round
trip of tens of microseconds, where a Ray actor's took a millisecond of the driver's and the
actor's CPU each (a karcher run makes thousands: 1.5 s of a 24 s run on two cores). It ends with
the driver (its end of the pipe closes). A process that died is spawned again at the next call.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()  # one call at a time on the pipe; guards _kept
_kept: dict[str, Any] = {"process": None, "pipe": None}


def start() -> None:
    """Spawn the process now (it imports torch while the caller goes on), if none runs."""
    with _lock:
        _pipe_locked()


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in the process (fn a module-level function): what it returns, or the exception it
    raised. A process that died is spawned again and the call sent once more."""
    with _lock:
        for attempt in range(2):
            pipe = _pipe_locked()
            try:
                pipe.send((fn, args))
                ok, value = pipe.recv()
                break
            except (EOFError, OSError):  # the process died (killed, out of memory)
                _end_locked()
                if attempt:
                    raise
    if ok:
        return value
    raise value


def _pipe_locked() -> Any:
    process = _kept["process"]
    if process is None or not process.is_alive():
        _end_locked()
        ctx = multiprocessing.get_context("spawn")  # no fork of a driver that runs Ray's threads
        mine, theirs = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(theirs,), daemon=True, name="raymerge-torch")
        process.start()
        theirs.close()
        _kept.update(process=process, pipe=mine)
    return _kept["pipe"]


def _end_locked() -> None:
    process, pipe = _kept["process"], _kept["pipe"]
    _kept.update(process=None, pipe=None)
    if pipe is not None:
        pipe.close()  # the process reads the end of its pipe and exits
    if process is not None and process.is_alive():
        process.join(timeout=1)


def _serve(pipe: Any) -> None:
    """In the process: import torch, then answer calls until the driver's end closes (a Ctrl-C at
    the terminal is the driver's to handle: it ends this process by closing the pipe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch  # noqa: F401  (imported now: the first call does not wait for it)

    while True:
        try:
            fn, args = pipe.recv()
        except (EOFError, OSError):
            return
        try:
            reply = (True, fn(*args))
        except Exception as e:  # the caller raises it
            reply = (False, e)
        pipe.send(reply)
