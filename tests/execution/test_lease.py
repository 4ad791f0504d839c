"""The output lease on a local folder and on a real S3 server (moto): one owner at a time, a gone
owner taken over only when asked, a run that was taken over stops before it commits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from raymerge.errors import LeaseError
from raymerge.execution.lease import Holder, Lease, this_machine
from raymerge.storage.store import Conflict
from raymerge.storage.writers import LEASE, STAGING, open_output
from tests.helpers import race


def _holder(output) -> dict:
    return json.loads(output.staging.get(LEASE).data)


def test_second_run_is_refused_naming_the_holder(output):
    first = Lease.acquire(output, takeover=False, run_id="first-run")
    try:
        for takeover in (False, True):  # a live holder is never taken over, even with --resume/--overwrite
            with pytest.raises(LeaseError, match=r"another raymerge run is writing it \(run first-run on .*pid "
                                                 rf"{os.getpid()}, last heartbeat \d+s ago\)"):
                Lease.acquire(output, takeover=takeover)
    finally:
        first.release()
    assert output.staging.get(LEASE) is None
    Lease.acquire(output, takeover=False).release()  # free again


def _write_foreign_lease(output, **changes) -> None:
    holder = Holder("old-run", "elsewhere", 4242, "another-machine", 1.0, time.time())
    data = json.dumps({"raymerge_lease": 1, **{**holder.__dict__, **changes}}).encode()
    output.staging.put_if_absent(LEASE, data)


def test_stale_lease_taken_over_only_with_resume_or_overwrite(output, monkeypatch):
    _write_foreign_lease(output)
    monkeypatch.setenv("RAYMERGE_LEASE_STALE", "2")
    with pytest.raises(LeaseError, match="another raymerge run is writing it"):  # still fresh
        Lease.acquire(output, takeover=True)
    time.sleep(3.2)
    with pytest.raises(LeaseError, match="an earlier run that is gone holds its lease .*pass --resume .* or --overwrite"):
        Lease.acquire(output, takeover=False)
    assert _holder(output)["run_id"] == "old-run"
    lease = Lease.acquire(output, takeover=True, run_id="new-run")
    assert _holder(output)["run_id"] == "new-run"
    lease.release()


def test_lease_of_a_dead_process_on_this_machine_is_gone_at_once(output):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    _write_foreign_lease(output, pid=dead, machine=this_machine(), host="here")
    with pytest.raises(LeaseError, match=f"gone holds its lease .*pid {dead}"):
        Lease.acquire(output, takeover=False)
    Lease.acquire(output, takeover=True).release()


def test_heartbeat_refreshes_and_a_run_taken_over_stops(output, monkeypatch):
    monkeypatch.setenv("RAYMERGE_LEASE_STALE", "1")  # heartbeat every 0.2 s
    lease = Lease.acquire(output, takeover=False, run_id="mine")
    first = _holder(output)["heartbeat"]
    deadline = time.monotonic() + 10
    while _holder(output)["heartbeat"] == first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _holder(output)["heartbeat"] > first
    lease.check()  # still ours
    # Another run judges this one gone and replaces the lease (compare and swap on what it read).
    record = output.staging.get(LEASE)
    output.staging.put_if_match(LEASE, json.dumps({"run_id": "thief"}).encode(), record.version)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            lease.check()
        except LeaseError as e:
            assert "replaced this run's lease" in str(e) and "nothing was committed" in str(e)
            break
        time.sleep(0.1)
    else:
        pytest.fail("the run did not notice it was taken over")
    lease.release()
    assert _holder(output)["run_id"] == "thief"  # not ours to delete


def test_compare_and_swap_refuses_a_changed_lease(output):
    token = output.staging.put_if_absent(LEASE, b'{"run_id": "a"}')
    with pytest.raises(Conflict):
        output.staging.put_if_absent(LEASE, b'{"run_id": "b"}')
    newer = output.staging.put_if_match(LEASE, b'{"run_id": "a2"}', token)
    with pytest.raises(Conflict):
        output.staging.put_if_match(LEASE, b'{"run_id": "c"}', token)  # the version read before the change
    assert _holder(output)["run_id"] == "a2"
    output.staging.delete_if_match(LEASE, token)  # no longer that version: quietly kept
    assert _holder(output)["run_id"] == "a2"
    output.staging.delete_if_match(LEASE, newer)
    assert output.staging.get(LEASE) is None


def test_many_runs_at_once_exactly_one_wins(tmp_path):
    # Local only: moto checks If-None-Match and then stores, not atomically; S3 and MinIO decide atomically.
    output = open_output(str(tmp_path / "out"), {})
    wins, refused = race(lambda i: Lease.acquire(output, takeover=True, run_id=f"r{i}"), 6, LeaseError)
    assert len(wins) == 1 and len(refused) == 5
    wins[0].release()


def test_local_lease_lives_in_the_staging_folder_and_leaves_nothing(tmp_path):
    out = tmp_path / "fresh" / "out"
    lease = Lease.acquire(open_output(str(out), {}), takeover=False)
    assert (out / STAGING / LEASE).is_file()
    lease.release()
    assert not (tmp_path / "fresh").exists()  # made for the lease alone, removed with it


def _lease_bytes(**changes) -> bytes:
    fields = {"raymerge_lease": 1, "run_id": "old-run", "host": "here", "pid": 4242, "machine": this_machine(),
              "started": 1.0, "heartbeat": 1.7e9}
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not KeyError}).encode()


def test_a_sound_lease_names_its_holder():
    assert Holder.from_json(_lease_bytes()) == Holder("old-run", "here", 4242, this_machine(), 1.0, 1.7e9)


@pytest.mark.parametrize("changes", [
    {"pid": 10**30}, {"pid": 0}, {"pid": -1}, {"pid": 4194305}, {"pid": True}, {"pid": "12"}, {"pid": "١٢"},
    {"pid": 12.0}, {"pid": KeyError}, {"started": "nan"}, {"started": "1e3"}, {"started": -1}, {"started": 1e300},
    {"heartbeat": True}, {"heartbeat": None}, {"run_id": 5}, {"run_id": "x" * 5000}, {"host": "a\nb"},
    {"machine": None}, {"machine": ["m"]},
])
def test_a_holder_with_any_field_out_of_range_cannot_be_judged(changes):
    # Not a Holder: its pid is never signalled, its names never shown; the lease is judged by its age.
    assert Holder.from_json(_lease_bytes(**changes)) is None


@pytest.mark.parametrize("raw", [b"[]", b'"lease"', b"\xff\xfe", b"{" * 100, b"1e999"])
def test_a_lease_that_is_no_object_cannot_be_judged(raw):
    assert Holder.from_json(raw) is None


@pytest.mark.parametrize("pid", [10**30, 0, -1])
def test_an_out_of_range_pid_from_this_machine_is_never_signalled(tmp_path, monkeypatch, pid):
    # os.kill(10**30, 0) raised OverflowError on every later run; os.kill(0 or -1, 0) signals process groups.
    signalled = []
    real_kill = os.kill
    monkeypatch.setattr(os, "kill", lambda p, sig: signalled.append(p) or real_kill(p, sig))
    output = open_output(str(tmp_path / "out"), {})
    output.staging.put_if_absent(LEASE, _lease_bytes(pid=pid, heartbeat=time.time()))
    for takeover in (False, True):  # fresh: refused, with --resume / --overwrite too
        with pytest.raises(LeaseError, match=r"another raymerge run is writing it \(an unreadable lease"):
            Lease.acquire(output, takeover=takeover)
    monkeypatch.setenv("RAYMERGE_LEASE_STALE", "1")
    time.sleep(1.5)
    with pytest.raises(LeaseError, match="an earlier run that is gone holds its lease"):
        Lease.acquire(output, takeover=False)
    Lease.acquire(output, takeover=True).release()  # stale: taken over by its age alone
    assert all(p >= 1 for p in signalled)


def test_a_fifo_where_the_lease_belongs_is_an_unreadable_lease_never_waited_on(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / STAGING).mkdir(parents=True)
    os.mkfifo(out / STAGING / LEASE)
    for takeover in (False, True):  # fresh: refused, with --resume / --overwrite too
        with pytest.raises(LeaseError, match=r"another raymerge run is writing it \(an unreadable lease"):
            Lease.acquire(open_output(str(out), {}), takeover=takeover)
    monkeypatch.setenv("RAYMERGE_LEASE_STALE", "1")
    os.utime(out / STAGING / LEASE, (time.time() - 60, time.time() - 60), follow_symlinks=False)
    Lease.acquire(open_output(str(out), {}), takeover=True).release()  # stale: replaced, never opened
    assert not (out / STAGING).exists()
