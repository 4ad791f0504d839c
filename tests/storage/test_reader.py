import os

import pytest

from raymerge.errors import StorageError
from raymerge.storage.reader import Buffer, RangeReader, coalesce


def test_coalesce_merges_touching_and_near_ranges_and_maps_back():
    runs, where = coalesce([(100, 200), (0, 10), (10, 50), (205, 300), (1000, 1010)], gap=8)
    assert runs == [(0, 50), (100, 300), (1000, 1010)]
    assert where == [(1, 0), (0, 0), (0, 10), (1, 105), (2, 0)]


def test_coalesce_handles_overlaps():
    runs, where = coalesce([(0, 100), (20, 40), (90, 120)], gap=0)
    assert runs == [(0, 120)] and where == [(0, 0), (0, 20), (0, 90)]


def test_local_reads_return_exact_bytes_in_request_order(tmp_path):
    data = os.urandom(100_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    reader, buf = RangeReader(), Buffer()
    ranges = [(90_000, 99_999), (3, 70), (70, 5000), (50_000, 50_001)]
    got = reader.read(str(path), ranges, buf)
    assert [bytes(g) for g in got] == [data[s:e] for s, e in ranges]
    # mapped without reading ahead (a pass that may not touch them): the same bytes where touched
    assert [bytes(g) for g in reader.read(str(path), ranges, buf, populate=False)] == [data[s:e] for s, e in ranges]
    # a range past the end is a storage error naming the file, not short data
    with pytest.raises(StorageError, match="f.bin ended at byte 100000"):
        reader.read(str(path), [(99_000, 100_100)], buf)


def test_local_views_stay_valid_while_held(tmp_path):
    """Local ranges are mapped from the file: a view outlives later reads and the reader itself."""
    data = os.urandom(3 * 65536 + 123)
    path = tmp_path / "g.bin"
    path.write_bytes(data)
    reader, buf = RangeReader(), Buffer()
    first = reader.read(str(path), [(65536 + 7, 2 * 65536)], buf)[0]
    second = reader.read(str(path), [(1, 9)], buf)[0]
    reader.close()
    assert bytes(first) == data[65536 + 7:2 * 65536] and bytes(second) == data[1:9]
    assert first.readonly  # inputs are never written


def test_a_local_file_is_mapped_once_and_follows_its_size(tmp_path):
    """Where runs are read again (`again`: a later pass), the file's one mapping serves every read
    (the pages it mapped stay mapped); a file that grew is mapped again to its new end; one cut
    short is an error, never a short read. Without `again`, each read maps anew (unmapped with its
    last view)."""
    data = os.urandom(5 * 4096 + 17)
    path = tmp_path / "h.bin"
    path.write_bytes(data)
    reader, buf = RangeReader(again=True), Buffer()
    first = reader.read(str(path), [(4096 + 3, 3 * 4096)], buf)[0]
    again = reader.read(str(path), [(4096 + 3, 3 * 4096), (0, 0), (17, 18)], buf)
    assert first.obj is again[0].obj  # the same mapping, populated once
    other = RangeReader(again=True)  # another thread's: the process maps the file once
    assert other.read(str(path), [(5, 6)], buf)[0].obj is first.obj
    assert [bytes(g) for g in again] == [data[4096 + 3:3 * 4096], b"", data[17:18]]
    more = os.urandom(9000)
    with open(path, "ab") as f:
        f.write(more)
    whole = data + more
    got = reader.read(str(path), [(len(data) - 5, len(whole)), (2, 40)], buf)
    assert [bytes(g) for g in got] == [whole[-9005:], whole[2:40]]
    assert bytes(first) == data[4096 + 3:3 * 4096]  # a view of the first mapping outlives it
    os.truncate(path, 4096)
    with pytest.raises(StorageError, match="h.bin ended at byte 4096"):
        reader.read(str(path), [(4000, 4100)], buf)
    reader.close()  # its files' mappings are dropped (unmapped with their last views)
    assert other.read(str(path), [(0, 10)], buf)[0].obj is not got[0].obj
    once = RangeReader()
    assert once.read(str(path), [(0, 10)], buf)[0].obj is not once.read(str(path), [(0, 10)], buf)[0].obj


def test_remote_reads_go_through_fsspec(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/rr/f.bin", bytes(range(256)) * 10)
    got = RangeReader().read("memory://rr/f.bin", [(5, 9), (300, 301)], Buffer())
    assert [bytes(g) for g in got] == [bytes([5, 6, 7, 8]), bytes([300 % 256])]
