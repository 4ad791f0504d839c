"""The lease on an output: one run owns `--out` at a time.

Built once on the output's staging store (storage.store), whatever the backend:
  1. `Lease.acquire(output, takeover)` creates the lease object in staging only if absent
     (`put_if_absent`; local: O_CREAT|O_EXCL; S3: a conditional PutObject, If-None-Match: *). It
     holds the run id, the host, the pid and a heartbeat. When another run's lease is there, the
     run is refused (LeaseError, exit 2) naming the holder and its age, unless that holder is gone:
     its process no longer exists on this machine, or its heartbeat is older than `stale` seconds.
     A gone holder's lease is taken over, with --resume or --overwrite only, by a compare-and-swap
     on the version read (`put_if_match`; S3: If-Match on its ETag; local: checked and renamed
     over under the staging folder's lock), so of two runs taking over at once only one wins, and
     the lease never disappears meanwhile.
  2. A daemon thread refreshes the heartbeat every `interval` seconds, again by `put_if_match`:
     a lease that someone else replaced means this run was taken over, and `check()` then stops
     the run before it commits.
  3. `release()` stops the thread and deletes the lease if it is still ours (`delete_if_match`).
`RAYMERGE_LEASE_STALE` (seconds, default 300) sets when a silent holder counts as gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from raymerge.errors import LeaseError, OutputError, RaymergeError, StorageError
from raymerge.storage import urls
from raymerge.storage.store import Conflict, Stored
from raymerge.storage.writers import LEASE, Output
from raymerge.untrusted import UntrustedJSON, is_text, parse_json

log = logging.getLogger("raymerge")

DEFAULT_STALE = 300.0
PID_MAX = 4194304  # Linux's largest pid_max: a pid beyond it, or below 1, names no single process
MAX_TEXT = 1024  # a run id, host or machine read from a lease: longer is not what raymerge writes
MAX_TIME = 1e12  # seconds (wall clock, or clock ticks since boot): far past any real value
_HELD: set[str] = set()  # run ids of the leases this process holds now


def stale_after() -> float:
    try:
        return max(1.0, float(os.environ.get("RAYMERGE_LEASE_STALE", DEFAULT_STALE)))
    except ValueError:
        return DEFAULT_STALE


@dataclass(frozen=True)
class Holder:
    """Who holds a lease. `machine` tells whether its pid can be checked from here."""

    run_id: str
    host: str
    pid: int
    machine: str  # host name, boot id and pid namespace: same value, same process table
    started: float  # the process's start time in clock ticks since boot (/proc/PID/stat), to tell a reused pid
    heartbeat: float  # wall clock time of the last refresh, for messages

    def to_json(self) -> bytes:
        return json.dumps({"raymerge_lease": 1, **asdict(self)}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Holder | None:
        """The holder a lease names, or None where any field is not what `to_json` writes: such a
        holder cannot be judged (its pid may not be signalled, its names may not be shown), so it
        is judged by the lease's age alone, like an unreadable lease."""
        try:
            obj = parse_json(raw, max_bytes=65536)
        except UntrustedJSON:
            return None
        if not (isinstance(obj, dict) and all(_text(obj.get(k)) for k in ("run_id", "host", "machine"))
                and _pid(obj.get("pid")) and all(_time(obj.get(k)) for k in ("started", "heartbeat"))):
            return None
        return cls(obj["run_id"], obj["host"], obj["pid"], obj["machine"], float(obj["started"]),
                   float(obj["heartbeat"]))

    def is_gone(self) -> bool:
        """True when this holder ran on this machine and its process no longer exists."""
        if self.machine != this_machine():
            return False
        if self.pid == os.getpid():  # this very process: gone unless one of its runs holds it now
            return self.run_id not in _HELD
        try:
            os.kill(self.pid, 0)  # from_json let only 1 <= pid <= PID_MAX through: never a process group
        except ProcessLookupError:
            return True
        except OSError:
            return False  # alive and someone else's (PermissionError), or it cannot be told
        return _process_start(self.pid) not in (None, self.started)  # the pid was reused


class Lease:
    def __init__(self, output: Output, holder: Holder, version: str, interval: float) -> None:
        self._output = output
        self.holder = holder
        self._version = version  # of the lease as this run last wrote it
        self._interval = interval
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="raymerge-lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, output: Output, takeover: bool, run_id: str | None = None,
                advice: Callable[[], str] | None = None) -> Lease:
        """`advice()` says how to go on from a gone holder's unfinished run (what --resume or
        --overwrite would do there)."""
        stale = stale_after()
        holder = _me(run_id or uuid.uuid4().hex[:12])
        _HELD.add(holder.run_id)  # before it exists: another thread must never judge it gone
        try:
            try:
                version = _create(output, holder)
            except Conflict:
                version = cls._take_over(output, holder, takeover, stale, advice)
        except BaseException:
            _HELD.discard(holder.run_id)
            raise
        return cls(output, holder, version, interval=min(30.0, stale / 5))

    @staticmethod
    def _take_over(output: Output, me: Holder, takeover: bool, stale: float,
                   advice: Callable[[], str] | None) -> str:
        shown = urls.redact(output.url)
        record = output.staging.get(LEASE)
        if record is None:  # released between our create and our read: try once more
            try:
                return _create(output, me)
            except Conflict:
                record = output.staging.get(LEASE)
        if record is None:
            raise LeaseError(f"--out {shown}: another run took the lease just now; try again")
        other = Holder.from_json(record.data)
        who = _describe(other, record)
        if not (other is not None and other.is_gone() or record.age > stale):
            raise LeaseError(f"--out {shown}: another raymerge run is writing it ({who}); wait for it to finish "
                             f"or stop it. A lease with no heartbeat for {stale:.0f}s, or whose process has "
                             "ended on this machine, can be taken over with --resume or --overwrite")
        if not takeover:
            what = advice() if advice else "pass --resume to continue its work, or --overwrite to start over"
            raise LeaseError(f"--out {shown}: an earlier run that is gone holds its lease ({who}); {what}")
        try:
            version = output.staging.put_if_match(LEASE, me.to_json(), record.version)
        except Conflict:
            raise LeaseError(f"--out {shown}: another run took over the lease of {who} just now; "
                             "wait for it to finish") from None
        log.warning("lease: took over the lease of a run that is gone (%s)", who)
        return version

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
            try:
                self._version = self._output.staging.put_if_match(LEASE, holder.to_json(), self._version)
            except Conflict:
                self._lost = "another run replaced this run's lease (it judged this run gone)"
                log.error("lease: %s; this run will stop before it commits", self._lost)
                return
            except (RaymergeError, OSError) as e:
                log.warning("lease: could not refresh the heartbeat (%s); will try again", e)

    def check(self) -> None:
        """Raise if this run no longer owns the output: it must not commit over another run."""
        if self._lost:
            raise LeaseError(f"--out {urls.redact(self._output.url)}: {self._lost}; nothing was committed. "
                             "Let the other run finish")

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        _HELD.discard(self.holder.run_id)
        if not self._lost:
            try:
                self._output.staging.delete_if_match(LEASE, self._version)
            except RaymergeError:
                pass  # left behind, it goes stale: never a reason to fail a run that is over


def _create(output: Output, holder: Holder) -> str:
    """The lease, if there is none (else Conflict): the run's first write, so a failure here means
    the location cannot be written (a bad path or bucket, permissions, credentials, endpoint)."""
    try:
        return output.staging.put_if_absent(LEASE, holder.to_json())
    except StorageError as e:
        raise OutputError(f"--out {urls.redact(output.url)}: cannot write there ({e}); check the path or bucket, "
                          "its permissions and the credentials") from e


def _describe(holder: Holder | None, record: Stored) -> str:
    if holder is None:
        return f"an unreadable lease, last written {record.age:.0f}s ago"
    return f"run {holder.run_id} on {holder.host}, pid {holder.pid}, last heartbeat {record.age:.0f}s ago"


def _me(run_id: str) -> Holder:
    pid = os.getpid()
    now = time.time()
    return Holder(run_id, socket.gethostname(), pid, this_machine(), _process_start(pid) or 0.0, now)


def this_machine() -> str:
    """What makes two pids comparable: the same host, boot and pid namespace."""
    def read(path: str, link: bool = False) -> str:
        try:
            if link:
                return os.readlink(path)
            with open(path, "rb") as f:
                return f.read(256).decode("ascii", "replace").strip()
        except OSError:
            return ""
    return "|".join((socket.gethostname(), read("/proc/sys/kernel/random/boot_id"), read("/proc/self/ns/pid", True)))


def _process_start(pid: int) -> float | None:
    """A process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        # Bytes: the command name in parentheses may be anything, ")" and non-UTF-8 included.
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read(4096).rsplit(b")", 1)[1].split()
        return float(int(fields[19]))  # field 22 of stat, counted after the command name
    except (OSError, IndexError, ValueError):
        return None


def _text(x: object) -> bool:
    # Printable: a holder's names go into one-line messages.
    return is_text(x, MAX_TEXT) and x.isprintable()


def _pid(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= PID_MAX


def _time(x: object) -> bool:
    # JSON numbers only: parse_json has already refused NaN and infinities, and a string is refused
    # here, so float("nan") or int("١٢") never turn one into a number.
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < MAX_TIME
