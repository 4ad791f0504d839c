"""The small-object store (storage.store) that the lease, the journal and the commit are built on,
the same contract on a local folder and on a real S3 server (moto): whole writes with versions,
conditional writes and deletes, listing; and, locally, no write through a link, no block on a
special file, and nothing left behind."""

from __future__ import annotations

import errno
import os

import pytest

from raymerge.errors import FULL, CommitError, OutputError, StorageError
from raymerge.storage import local_output, s3_output
from raymerge.storage.local_output import LOCK
from raymerge.storage.localfs import temporary
from raymerge.storage.store import Conflict
from raymerge.storage.writers import LEASE, STAGING, clear_staging, open_output
from tests.helpers import race


def test_put_and_get_whole_objects_with_versions(output):
    store = output.staging
    assert store.get("a.json") is None and store.list() == []
    first = store.put("a.json", b"one")
    got = store.get("a.json")
    assert (got.data, got.version) == (b"one", first) and 0 <= got.age < 60
    second = store.put("a.json", b"two!")
    assert second != first and store.get("a.json").data == b"two!"


def test_conditional_writes_compare_versions(output):
    store = output.staging
    v1 = store.put_if_absent("x", b"1")
    with pytest.raises(Conflict):
        store.put_if_absent("x", b"other")
    v2 = store.put_if_match("x", b"2", v1)
    with pytest.raises(Conflict):
        store.put_if_match("x", b"3", v1)  # the version before the change
    with pytest.raises(Conflict):
        store.put_if_match("absent", b"3", v1)
    assert store.get("x").data == b"2"
    store.delete_if_match("x", v1)  # no longer that version: quietly kept
    store.delete_if_match("absent", v1)
    assert store.get("x").version == v2
    store.delete_if_match("x", v2)
    assert store.get("x") is None


def test_list_by_prefix_and_delete(output):
    for name in ("journal-000001.json", "journal-head.json", "probe-1", LEASE):
        output.staging.put(name, b"{}")
    output.files.put("config.json", b"{}")
    assert output.staging.list("journal-") == ["journal-000001.json", "journal-head.json"]
    assert "config.json" in output.files.list()
    clear_staging(output)  # every staging file but the lease
    assert output.staging.list() == [LEASE]
    output.files.delete(["config.json", "never-there.json"])
    assert output.files.get("config.json") is None


def test_names_are_plain_names(output):
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(CommitError, match="not a plain file name"):
            output.files.put(bad, b"x")
        with pytest.raises(CommitError, match="not a plain file name"):
            output.staging.delete([bad])


def test_an_object_past_the_cap_reads_as_damaged(output, monkeypatch):
    monkeypatch.setattr(local_output, "SMALL_CAP", 4)
    monkeypatch.setattr(s3_output, "SMALL_CAP", 4)
    output.staging.put("small", b"1234")
    output.staging.put("big", b"12345")
    assert output.staging.get("small").data == b"1234" and output.staging.get("big").data == b""


# -- the local folder ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "link", "folder"])
def test_a_special_file_reads_as_damaged_and_is_never_written_through(tmp_path, kind):
    target = tmp_path / "input.json"
    target.write_bytes(b"input")
    out = open_output(str(tmp_path / "out"), {})
    out.staging.put("seed", b"")
    path = tmp_path / "out" / STAGING / LEASE
    {"fifo": lambda: os.mkfifo(path), "link": lambda: os.symlink(target, path), "folder": path.mkdir}[kind]()
    got = out.staging.get(LEASE)  # never blocks on a FIFO, never follows a link
    assert got.data == b"" and got.version
    with pytest.raises(Conflict):
        out.staging.put_if_absent(LEASE, b"mine")
    out.staging.put_if_match(LEASE, b"mine", got.version)  # what was there goes, whatever it was
    assert out.staging.get(LEASE).data == b"mine" and target.read_bytes() == b"input"


def test_a_staging_folder_that_is_a_link_is_never_used(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "journal-head.json").write_bytes(b"someone's")
    (tmp_path / "out").mkdir()
    os.symlink(elsewhere, tmp_path / "out" / STAGING)
    out = open_output(str(tmp_path / "out"), {})
    for use in (lambda: out.staging.put("journal-head.json", b"{}"), lambda: out.staging.put_if_absent(LEASE, b""),
                lambda: out.staging.get("journal-head.json"), lambda: clear_staging(out)):
        with pytest.raises(OutputError, match="is a symbolic link"):
            use()
    assert os.listdir(elsewhere) == ["journal-head.json"]
    assert (elsewhere / "journal-head.json").read_bytes() == b"someone's"


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_bytes(b"x")
    out = open_output(str(tmp_path / "out"), {})
    with pytest.raises(OutputError, match="is a file; give a directory"):
        out.files.list()
    with pytest.raises(OutputError, match="is a file; give a directory"):
        out.staging.put_if_absent(LEASE, b"")


def test_temporaries_are_never_listed_and_go_with_their_file(tmp_path):
    out = open_output(str(tmp_path / "fresh" / "out"), {})
    out.staging.put_if_absent(LEASE, b"l")
    out.staging.put("journal-000001.json", b"{}")
    folder = tmp_path / "fresh" / "out" / STAGING
    leftover = temporary(str(folder / "journal-000001.json"))  # a write cut short by a crash
    open(leftover, "wb").close()
    orphan = temporary(str(folder / "journal-000002.json"))  # the first write of a file, cut short
    open(orphan, "wb").close()
    in_flight = temporary(str(folder / LEASE))  # a takeover writing the lease anew
    open(in_flight, "wb").close()
    assert out.staging.list() == ["journal-000001.json", LEASE]
    clear_staging(out)
    assert sorted(os.listdir(folder)) == sorted([LEASE, os.path.basename(in_flight)])
    os.remove(in_flight)
    out.staging.delete_if_match(LEASE, out.staging.get(LEASE).version)
    assert not (tmp_path / "fresh").exists()  # the folders made for the staging files go with the last one


def test_of_many_compare_and_swaps_from_one_version_exactly_one_wins(tmp_path):
    store = open_output(str(tmp_path / "out"), {}).staging
    version = store.put_if_absent(LEASE, b"first")
    wins, conflicts = race(lambda i: (i, store.put_if_match(LEASE, f"run {i}".encode(), version)), 8, Conflict)
    assert len(wins) == 1 and len(conflicts) == 7
    (i, won), = wins
    assert store.get(LEASE).data == f"run {i}".encode() and store.get(LEASE).version == won
    assert sorted(os.listdir(tmp_path / "out" / STAGING)) == [LOCK, LEASE]  # nothing set aside is left


def test_a_replace_that_cannot_be_written_keeps_the_old_file(tmp_path, monkeypatch):
    store = open_output(str(tmp_path / "out"), {}).staging
    version = store.put_if_absent(LEASE, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match="No space left") as failed:
        store.put_if_match(LEASE, b"new", version)
    assert failed.value.reason == FULL
    monkeypatch.undo()
    assert (store.get(LEASE).data, store.get(LEASE).version) == (b"old", version)  # the next try can still match
    assert os.listdir(tmp_path / "out" / STAGING) == [LEASE]


def _swap_in_a_process(url: str, version: str, i: int, results) -> None:
    try:
        open_output(url, {}).staging.put_if_match(LEASE, f"process {i}".encode(), version)
        results.put(("won", i))
    except Conflict:
        results.put(("lost", i))


def test_of_compare_and_swaps_from_several_processes_exactly_one_wins(tmp_path):
    """The local lock is a POSIX record lock: it keeps processes (on any host that shares the
    folder) apart, not only threads."""
    import multiprocessing

    url = str(tmp_path / "out")
    version = open_output(url, {}).staging.put_if_absent(LEASE, b"first")
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    processes = [ctx.Process(target=_swap_in_a_process, args=(url, version, i, results)) for i in range(6)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(30)
    outcomes = [results.get(timeout=5) for _ in processes]
    winners = [i for what, i in outcomes if what == "won"]
    assert len(winners) == 1 and open_output(url, {}).staging.get(LEASE).data == f"process {winners[0]}".encode()


class _TrickleBody:
    """An S3 response body that hands out at most 3 bytes a read, as a network stream may."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.closed = False

    async def read(self, n: int = -1) -> bytes:
        chunk, self._data = self._data[:min(n, 3)], self._data[min(n, 3):]
        return chunk

    def close(self) -> None:
        self.closed = True


def test_an_s3_body_is_read_to_its_end_not_one_read(s3_server):
    output = open_output("s3://any-bucket/out", {})  # its event loop only: nothing is sent
    body = _TrickleBody(b'{"journal": "a document longer than one read"}')
    got = s3_output._read_body(output.staging._s3.fs, {"Body": body}, 1000)
    assert got == b'{"journal": "a document longer than one read"}' and body.closed
    capped = _TrickleBody(b"0123456789")
    assert s3_output._read_body(output.staging._s3.fs, {"Body": capped}, 5) == b"01234"  # never past the cap


def test_a_conditional_write_where_the_folder_is_gone_is_a_conflict(tmp_path):
    store = open_output(str(tmp_path / "out"), {}).staging
    version = store.put_if_absent(LEASE, b"mine")
    store.delete_if_match(LEASE, version)  # the last staging file: the folder goes with it
    assert not (tmp_path / "out" / STAGING).exists()
    with pytest.raises(Conflict):
        store.put_if_match(LEASE, b"again", version)
    store.delete_if_match(LEASE, version)  # quietly: nothing of that version is left
