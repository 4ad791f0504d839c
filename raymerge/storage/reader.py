"""Coalesced range reads: local files mapped, remote ones into reusable buffers.

Ranges of one file are sorted and merged when they touch or nearly touch, so a worker issues one
read per run of neighbouring tensors. Local runs are mapped from the page cache, populated in one
system call (MADV_POPULATE_READ): no copy at all, four times the throughput of positional reads
into a buffer here; where a later pass reads the same runs again, the file stays mapped, so their
pages are mapped once (a worker's RSS then counts the input pages it has read, as shared memory).
Other URLs are read by `ranges.fetch`: exactly the runs (no read-ahead), concurrently, pinned to
the version the plan recorded (S3 reads send If-Match), into a preallocated buffer (first-touch
page faults are costly, so buffers are reused across items).
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from typing import Any

from raymerge.errors import CHANGED, StorageError
from raymerge.storage import urls
from raymerge.storage.ranges import close_files, fetch
from raymerge.storage.localfs import open_regular
from raymerge.storage.retry import reason_of, with_retries

ALIGN = 64
LOCAL_GAP = 4096  # mapping a small gap costs less than a second system call
MADV_POPULATE_READ = 22  # Linux 5.14's madvise: map a range's pages, reading them in
_POPULATE_READ = sys.platform == "linux"  # until the kernel refuses it
REMOTE_GAP = 1 << 20  # a second request costs more than a megabyte of transfer


class _Mapping:
    """A local file mapped whole, and the runs of it populated already."""

    def __init__(self, mem: mmap.mmap) -> None:
        self.mem = mem
        self.populated: set[tuple[int, int]] = set()
        self.lock = threading.Lock()

    def populate(self, start: int, end: int) -> None:
        """Map the run's pages now, reading those not in the page cache, in one system call; once."""
        global _POPULATE_READ
        with self.lock:
            if (start, end) in self.populated:
                return
            self.populated.add((start, end))
        lo = start - start % mmap.PAGESIZE
        if _POPULATE_READ:
            try:
                self.mem.madvise(MADV_POPULATE_READ, lo, end - lo)
                return
            except OSError:  # before Linux 5.14: read ahead instead, pages mapped as touched
                _POPULATE_READ = False
        if hasattr(mmap, "MADV_WILLNEED"):
            self.mem.madvise(mmap.MADV_WILLNEED, lo, end - lo)


# The files mapped for runs read again, shared by the process's readers (a worker's threads): a
# page is mapped once in the process, and counted once in its RSS (file pages, shared).
_maps_lock = threading.Lock()
_maps: dict[tuple[int, int], _Mapping] = {}  # (device, inode) -> the mapping


class Buffer:
    """Reusable page-aligned memory handed out as memoryviews; grows, never shrinks.

    Page-aligned (anonymous mmap) so that direct I/O can use it as it is.
    """

    def __init__(self) -> None:
        self._buf: mmap.mmap | None = None

    def view(self, n: int) -> memoryview:
        if self._buf is None or len(self._buf) < n:
            size = -(-(n + (n >> 3)) // mmap.PAGESIZE) * mmap.PAGESIZE  # headroom: items differ in size
            self._buf = mmap.mmap(-1, max(size, mmap.PAGESIZE))
        return memoryview(self._buf)[:n]


def coalesce(ranges: list[tuple[int, int]], gap: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Merge ranges into runs; return the runs and, per input range, (run index, offset in run)."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    runs: list[tuple[int, int]] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(ranges)
    for i in order:
        start, end = ranges[i]
        if runs and start <= runs[-1][1] + gap:
            run_start, run_end = runs[-1]
            runs[-1] = (run_start, max(run_end, end))
        else:
            runs.append((start, end))
        where[i] = (len(runs) - 1, start - runs[-1][0])
    return runs, where


class RangeReader:
    """Reads byte ranges of files given by URL. One per worker thread (it caches open files).

    `close()` when done with it: it holds a descriptor per local file read and the remote file
    objects some backends are read through.
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, again: bool = False) -> None:
        self._options = storage_options or {}
        self._again = again  # the same runs will be read again (a later pass): keep their files mapped
        self._fds: dict[str, int] = {}
        self._files: dict[str, object] = {}  # open remote file objects, for backends read through them
        self._mapped: set[tuple[int, int]] = set()  # the files of `_maps` it read (again: kept)

    def read(self, url: str, ranges: list[tuple[int, int]], buf: Buffer,
             version: str | None = None, scattered: bool = False, populate: bool = True) -> list[memoryview]:
        """The bytes of each range, in the order given. Views are valid until `buf` is reused
        (local files: as long as a view of them is held). `version` (the plan's InputFile.version)
        pins remote reads: an S3 object whose ETag differs fails with InputChanged. `scattered`:
        rows gathered by token, which may lie anywhere in a tensor: joined only across small gaps,
        so a read never spans the whole tensor between them. `populate=False`: a local file's
        pages are mapped but read only where touched (for a pass that may not touch them)."""
        local = urls.protocol(url) == "file"
        runs, where = coalesce(ranges, LOCAL_GAP if local or scattered else REMOTE_GAP)
        if local:
            mems = self._map_local(url, runs, populate)
        else:
            mems = self._read_remote(url, runs, buf, version or "")
        return [mems[r][off:off + (e - s)] for (r, off), (s, e) in zip(where, ranges)]

    def _map_local(self, url: str, runs: list[tuple[int, int]], populate: bool = True) -> list[memoryview]:
        fd = self._fds.get(url)
        if fd is None:
            try:
                fd = self._fds[url] = open_regular(urls.local_path(url))
            except OSError as e:
                raise StorageError(f"execute: cannot open input {url}: {e.strerror}", reason_of(e)) from e
        st = os.fstat(fd)
        size = st.st_size
        for start, end in runs:
            if end > size:  # checked, since touching a mapped page past the end would kill the worker
                raise StorageError(f"execute: {url} ended at byte {size} while reading [{start}, {end}); "
                                   "the input changed or was truncated during the run", CHANGED)
        last = max((end for start, end in runs if end > start), default=0)
        mapped = self._mapping(fd, st, last) if last else None
        mems = []
        for start, end in runs:
            if end == start:
                mems.append(memoryview(b""))
                continue
            if populate:
                mapped.populate(start, end)
            mems.append(memoryview(mapped.mem)[start:end])
        return mems

    def _mapping(self, fd: int, st: os.stat_result, end: int) -> _Mapping:
        """The file mapped whole, covering byte `end`. Where the runs are read again (`again`), one
        mapping serves every read of the process's readers, so a run read by an item's next pass
        has its pages mapped already (mapping them again cost a tenth of a karcher run's passes);
        else each read maps the file anew (once for all its runs), unmapped with the last view of it.
        `st`: the file's stat, as the read checked its runs against it."""
        key = (st.st_dev, st.st_ino)
        with _maps_lock:
            mapped = _maps.get(key) if self._again else None
            if mapped is None or len(mapped.mem) < end:  # the first read, or the file grew
                mapped = _Mapping(mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ))
                if self._again:
                    _maps[key] = mapped
                    self._mapped.add(key)
        return mapped

    def _read_remote(self, url: str, runs: list[tuple[int, int]], buf: Buffer, version: str) -> list[memoryview]:
        # Each run starts in the buffer at the same alignment (mod 64) it has in the file, so the
        # tensors in it keep their element alignment in memory.
        offsets, pos = [], 0
        for start, end in runs:
            pos += (start - pos) % ALIGN
            offsets.append(pos)
            pos += end - start
        mem = buf.view(pos)
        fs, path = urls.filesystem(url, self._options)
        requests = [(path, start, end) for start, end in runs]
        try:
            blobs = with_retries(lambda: fetch(fs, requests, versions={path: version}, files=self._files),
                                 f"execute: reading {urls.redact(url)}")
        except StorageError as e:  # fetch's own: it names the URL and says what to do
            raise type(e)(f"execute: {e}", e.reason) from e
        except Exception as e:  # fsspec backends raise their own types; keep the URL and reason
            raise StorageError(f"execute: reading {urls.redact(url)} failed: {type(e).__name__}: {e}",
                               reason_of(e)) from e
        for (start, end), at, blob in zip(runs, offsets, blobs):
            mem[at:at + end - start] = blob
        return [mem[at:at + end - start] for (start, end), at in zip(runs, offsets)]

    def close(self) -> None:
        """Close the files it holds open; it may be used again afterwards (they reopen)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        with _maps_lock:  # each unmapped once no view of it is left
            for key in self._mapped:
                _maps.pop(key, None)
        self._mapped.clear()
        close_files(self._files)
