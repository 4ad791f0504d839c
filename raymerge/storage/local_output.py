"""A local output folder: staged shard files written at offsets, renamed at commit.

Everything raymerge writes goes through a name it chose, in the output folder or its own
staging folder, opened without following symbolic links: a link planted under a staged or
temporary name can never redirect a write, a truncation or a deletion to someone else's file.

A file raymerge writes is its own, provably: created by this run (O_CREAT|O_EXCL), its inode
recorded in the journal, and written through only while it is a regular file with one link whose
identity (device, inode) is no input's (`protect`). A hard link to an input (`cp -al`,
`rsync --link-dest`) or a file put in place of a staged one is refused, never written through;
--overwrite unlinks it and creates a new file. Every file read here is opened so that a FIFO or a
device cannot block (storage.localfs).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

from raymerge.errors import CommitError, OutputError, StorageError
from raymerge.storage import urls
from raymerge.storage.retry import reason_of
from raymerge.storage.checksum import crc32
from raymerge.storage.localfs import (NOFOLLOW, Identity, NotRegular, fsync_dir, identities, identity_of, open_regular,
                                      read_regular, write_whole)
from raymerge.storage.writers import (BLOCK, LEASE, STAGING, LeaseRecord, LeaseTaken, PartRules, ShardState, Span,
                                      StagedItem, Target, Verified, plain_name)

PARTIAL = ".partial"
SMALL_CAP = 64 * 2**20  # bytes: the largest manifest, index or journal file read back


class LocalOutput:
    """A local directory. Shards are staged under `.raymerge-staging/` and renamed at commit.

    Workers write the block-aligned middle of each item with direct I/O (O_DIRECT): new page-cache
    pages are the slowest memory a machine hands out, and a merge's output is not read again soon.
    The unaligned head and tail of an item, and any write direct I/O refuses, go through the page
    cache; the two never share a block, and commit's fsync makes both durable.
    """

    rules: ClassVar[PartRules] = PartRules()  # positional writes: any item size, any number of items

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = urls.local_path(url)
        self._staging = os.path.join(self.url, STAGING)
        self._fds: dict[tuple[str, int], int] = {}
        self._direct = hasattr(os, "O_DIRECT")
        self._lock = threading.Lock()  # worker threads share the open files
        self._made: list[str] = []  # folders this object created, deepest first
        self._protected: frozenset[Identity] = frozenset()  # the inputs' files: never written through
        self._created: dict[str, str] = {}  # handle -> identity of the staged file `prepare` made

    # -- the folder -------------------------------------------------------------------------

    def listing(self) -> list[str]:
        if os.path.isfile(self.url):
            raise OutputError(f"--out {self.url}: is a file; give a directory for the checkpoint")
        try:
            return sorted(os.listdir(self.url)) if os.path.isdir(self.url) else []
        except OSError as e:
            raise OutputError(f"--out {self.url}: cannot list it ({e.strerror}); check its permissions") from e

    def read_small(self, name: str) -> bytes | None:
        """A small file of the output folder (an old manifest or index), or None if absent."""
        try:
            return _read(os.path.join(self.url, name), SMALL_CAP)
        except FileNotFoundError:
            return None
        except NotRegular:  # a FIFO or a link where a manifest or index belongs: read as damaged
            return b""
        except OSError as e:
            raise OutputError(f"--out {self.url}: cannot read {name} ({e.strerror}); check its permissions") from e

    def free_bytes(self) -> int | None:
        folder = self.url
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
        try:
            st = os.statvfs(folder)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _ensure_staging(self) -> None:
        if os.path.isfile(self.url):
            raise OutputError(f"--out {self.url}: is a file; give a directory for the checkpoint")
        if os.path.islink(self._staging):
            raise OutputError(f"--out {self.url}: {STAGING} is a symbolic link; raymerge stages only in a folder "
                              "of its own: remove the link")
        if os.path.isdir(self._staging):
            return
        missing, folder = [], self._staging
        while not os.path.exists(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(self._staging, exist_ok=True)
        except OSError as e:
            raise OutputError(f"--out {self.url}: cannot create {STAGING} in it ({e.strerror}); check the path "
                              "and its permissions") from e
        self._made = missing

    def _staged(self, handle: str) -> str:
        """The path of a staged file: only a plain name in the staging folder is accepted."""
        if not plain_name(handle) or not handle.endswith(PARTIAL):
            raise OutputError(f"--out {self.url}: staged file {handle!r} is not a name raymerge gives; "
                              "the resume journal is damaged: rerun with --overwrite")
        return os.path.join(self._staging, handle)

    def check_handles(self, shards: list[str], handles: list[str]) -> None:
        """Handles a journal gives must be exactly the staged names of its shards."""
        if list(handles) != [s + PARTIAL for s in shards]:
            raise OutputError(f"--resume {self.url}: the resume journal names staged files that do not belong to "
                              "its shards (a journal from another raymerge or another folder?); rerun with "
                              "--overwrite to start over")

    # -- staging the shards -----------------------------------------------------------------

    def protect(self, paths: Sequence[str]) -> None:
        """The local input files (shards, aux files): no file this writer writes through may be one."""
        self._protected = identities(paths)

    def prepare(self, shards: list[tuple[str, int]]) -> list[str]:
        self._ensure_staging()
        handles = []
        try:
            for name, size in shards:
                handle = name + PARTIAL
                fd = _create(self._staged(handle))
                try:
                    os.ftruncate(fd, size)  # its final size: workers write at offsets, in any order
                    self._created[handle] = _identity_text(os.fstat(fd))  # of the file made, not of a name
                finally:
                    os.close(fd)
                handles.append(handle)
        except OSError as e:
            raise OutputError(f"--out {self.url}: cannot create output files ({e.strerror}); "
                              "check the path, its permissions and free space") from e
        return handles

    def identities(self, handles: list[str]) -> list[str]:
        """The identity of each staged file `prepare` made, for the journal: resume checks it."""
        return [self._created[h] for h in handles]

    def _open(self, handle: str, flags: int) -> int:
        """A staged file's descriptor, opened once per flags and shared by the worker's threads;
        only a regular file with one link that is no input's (see the module's docstring)."""
        with self._lock:
            fd = self._fds.get((handle, flags))
            if fd is None:
                try:
                    fd = open_regular(self._staged(handle), flags, follow=False)
                except NotRegular as e:  # an OSError, but never one to fall back from O_DIRECT for
                    raise OutputError(f"execute: the staged {handle} in {self._staging} {e.strerror}; rerun with "
                                      "--overwrite to start over") from e
                why = self._not_own(os.fstat(fd), None)
                if why:
                    os.close(fd)
                    raise OutputError(f"execute: the staged {handle} in {self._staging} {why}; raymerge never "
                                      "writes through it: rerun with --overwrite to start over")
                self._fds[(handle, flags)] = fd
            return fd

    def _not_own(self, st: os.stat_result, recorded: str | None, links: bool = True) -> str:
        """Why the staged file of `st` is not this run's own ("" when it is); `recorded`: its
        identity in the journal (None: not known here, as in a worker); `links`: whether a second
        name is a reason (not for a final shard, which is never written again)."""
        if identity_of(st) in self._protected:
            return "is an input file"
        if links and st.st_nlink != 1:
            return (f"has {st.st_nlink} links: another name shares its bytes (a hard link, as cp -al or "
                    "rsync --link-dest make)")
        if recorded is not None and _identity_text(st) != recorded:
            return "is not the file this run created (replaced, or copied to another file system since)"
        return ""

    def _fd(self, handle: str, flags: int) -> int:
        try:
            return self._open(handle, flags)
        except OSError as e:
            raise StorageError(f"execute: cannot open the staged {handle} in {self._staging}: {e.strerror}",
                               reason_of(e)) from e

    def write(self, target: Target, span: Span, data: memoryview) -> str | None:
        """Write at `span.start` of the staged file; nothing to return: resume re-reads the bytes."""
        name, handle, offset = target.shard, target.handle, span.start
        lo = -(-offset // BLOCK) * BLOCK - offset  # the aligned middle: data[lo:hi]
        hi = (offset + len(data)) // BLOCK * BLOCK - offset
        if self._direct and hi > lo and self._write_direct(name, handle, offset + lo, data[lo:hi]):
            self._pwrite(name, self._fd(handle, os.O_RDWR), offset, data[:lo])
            self._pwrite(name, self._fd(handle, os.O_RDWR), offset + hi, data[hi:])
        else:
            self._pwrite(name, self._fd(handle, os.O_RDWR), offset, data)
        return None

    def _write_direct(self, name: str, handle: str, offset: int, data: memoryview) -> bool:
        """Write with O_DIRECT; False (and buffered from now on) where the file system or the
        memory alignment does not allow it."""
        done = 0
        try:
            fd = self._open(handle, os.O_RDWR | os.O_DIRECT)
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
            return True
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP) or done:
                raise _write_error(name, self.url, offset + done, e) from e
        self._direct = False
        return False

    @staticmethod
    def _pwrite(name: str, fd: int, offset: int, data: memoryview) -> None:
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
        except OSError as e:
            raise _write_error(name, "", offset + done, e) from e

    def verify_staged(self, target: Target, items: Sequence[StagedItem]) -> Verified:
        """Read every journaled item back and keep those whose crc32 matches: a write the journal
        recorded may not have reached the disk before a crash. A staged file that is not this run's
        own (see the module's docstring) is refused: the run goes on only with --overwrite."""
        path = self._staged(target.handle)
        st = _lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != target.size:
            final = self._final(target.shard, target.size)
            if final is not None:
                self._check_own(final, target, target.shard, links=False)
                return Verified(ShardState.FINAL, frozenset(r.item for r in items))
            return Verified(ShardState.GONE)
        try:
            fd = open_regular(path, follow=False)
            try:
                self._check_own(os.fstat(fd), target, target.handle)  # the file read, and later written
                found = frozenset(r.item for r in items if crc32(_pread(fd, r.span.start, r.span.end)) == r.crc32)
            finally:
                os.close(fd)
        except NotRegular:  # replaced since the lstat
            return Verified(ShardState.GONE)
        except OSError as e:
            raise StorageError(f"resume: cannot read the staged {target.handle} in {self._staging}: {e.strerror}",
                               reason_of(e)) from e
        return Verified(ShardState.STAGED, found)

    def _check_own(self, st: os.stat_result, target: Target, name: str, links: bool = True) -> None:
        why = self._not_own(st, target.identity, links)
        if why:
            raise OutputError(f"--resume {self.url}: {name} {why}; raymerge never writes through a file that is "
                              "not its own: rerun with --overwrite to start over (it makes new files)")

    def _final(self, shard: str, size: int) -> os.stat_result | None:
        """The shard under its final name, if a regular file of its planned size is there."""
        st = _lstat(os.path.join(self.url, shard))
        return st if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == size else None

    # -- commit -----------------------------------------------------------------------------

    def finalize(self, shards: Sequence[tuple[Target, Sequence[StagedItem]]]) -> None:
        self.close()
        for target, _ in shards:  # the items are all written in place: nothing to assemble
            name, path = target.shard, self._staged(target.handle)
            if not os.path.exists(path) and self._final(name, target.size) is not None:
                continue  # renamed by an earlier commit that was cut short
            fd = open_regular(path, follow=False)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(path, os.path.join(self.url, name))  # replaces the entry, never writes through a link
        fsync_dir(self.url)

    def put(self, name: str, data: bytes) -> None:
        self._atomic_write(self.url, name, data)

    def delete(self, names: list[str]) -> None:
        """Remove files of the output folder by plain name (a symbolic link is removed, not followed)."""
        for name in names:
            if not plain_name(name):
                raise CommitError(f"commit: refusing to remove {name!r} from {self.url}: not a plain file name")
            _remove(os.path.join(self.url, name), "commit: removing the old checkpoint's files")

    # -- staging files: journal, lease, probes ------------------------------------------------

    def put_staging(self, name: str, data: bytes) -> None:
        self._ensure_staging()
        self._atomic_write(self._staging, name, data)

    def remove_staging(self, name: str) -> None:
        if plain_name(name) and name != LEASE:
            _unlink_quietly(os.path.join(self._staging, name))

    def staging_files(self, prefix: str = "") -> dict[str, bytes]:
        """The small staging files whose names start with `prefix` (no shards, no lease)."""
        try:
            names = sorted(os.listdir(self._staging)) if os.path.isdir(self._staging) else []
            return {n: _read_staging(os.path.join(self._staging, n)) for n in names
                    if n.startswith(prefix) and not n.endswith(PARTIAL) and not n.startswith(".") and n != LEASE}
        except OSError as e:
            raise OutputError(f"--out {self.url}: cannot read {STAGING} ({e.strerror}); check its permissions") from e

    def abort(self, shards: list[str], handles: list[str] | None) -> None:
        self.clear_staging()

    def clear_staging(self) -> None:
        """Remove every staging file but the lease: entries are unlinked, never followed."""
        self.close()
        if not os.path.isdir(self._staging) or os.path.islink(self._staging):
            return
        for name in os.listdir(self._staging):
            if name != LEASE:
                _remove(os.path.join(self._staging, name), "clearing the staging folder")

    def _atomic_write(self, folder: str, name: str, data: bytes) -> None:
        if not plain_name(name):
            raise CommitError(f"refusing to write {name!r} in {folder}: not a plain file name")
        write_whole(os.path.join(folder, name), data)

    # -- the lease (see execution.lease) ------------------------------------------------------

    def lease_create(self, data: bytes) -> str:
        self._ensure_staging()
        path = os.path.join(self._staging, LEASE)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
        except FileExistsError as e:
            raise LeaseTaken() from e
        except OSError as e:
            raise OutputError(f"--out {self.url}: cannot create the lease in {STAGING} ({e.strerror}); check "
                              "the path and its permissions") from e
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self._staging)
        return _token(path)

    def lease_read(self) -> LeaseRecord | None:
        path = os.path.join(self._staging, LEASE)
        try:
            st = os.lstat(path)
            data = _read(path, SMALL_CAP)
        except FileNotFoundError:
            return None
        except OSError:  # a link or something unreadable: held by no one we can name
            return LeaseRecord(b"", _token(path), time.time() - st.st_mtime)
        return LeaseRecord(data, _token(path), max(0.0, time.time() - st.st_mtime))

    def lease_replace(self, data: bytes, token: str) -> str:
        """Replace the lease only if it is still the one `token` names: renamed aside (atomic: of
        two runs, only one can), then checked, and put back where it was if it changed."""
        path = os.path.join(self._staging, LEASE)
        aside = f"{path}.{uuid.uuid4().hex[:8]}.old"
        try:
            os.rename(path, aside)
        except FileNotFoundError as e:
            raise LeaseTaken() from e
        if _token(aside) != token:
            try:
                os.link(aside, path)
            except OSError:
                pass
            _unlink_quietly(aside)
            raise LeaseTaken()
        _unlink_quietly(aside)
        return self.lease_create(data)

    def lease_refresh(self, data: bytes, token: str) -> str:
        """The owner's heartbeat: replace the lease in one rename, so that it never disappears for
        an instant; raise LeaseTaken if it is no longer the one `token` names."""
        path = os.path.join(self._staging, LEASE)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.new"
        fd = _create(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if _token(path) != token:
            _unlink_quietly(tmp)
            raise LeaseTaken()
        os.replace(tmp, path)
        return _token(path)

    def lease_delete(self, token: str) -> None:
        path = os.path.join(self._staging, LEASE)
        try:
            if _token(path) == token:
                os.remove(path)
        except OSError:
            pass
        for folder in [self._staging, *self._made]:  # what this run made and left empty
            try:
                os.rmdir(folder)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _write_error(name: str, folder: str, offset: int, e: OSError) -> StorageError:
    where = f"{name} in {folder}" if folder else name
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"execute: writing {where} at byte {offset} failed: the disk is full ({e.strerror})",
                            reason_of(e))
    return StorageError(f"execute: writing {where} at byte {offset} failed: {e.strerror}", reason_of(e))


def _pread(fd: int, start: int, end: int) -> bytes:
    parts = []
    while start < end:  # one pread returns at most ~2 GiB
        got = os.pread(fd, end - start, start)
        if not got:
            break
        parts.append(got)
        start += len(got)
    return b"".join(parts)


def _remove(path: str, what: str) -> None:
    """Unlink `path` (a symbolic link itself, never its target); one already gone is fine."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"{what}: cannot remove {path} ({e.strerror}); fix its permissions", reason_of(e)) from e


def _create(path: str) -> int:
    """A new empty file at `path`, whatever was there (a planted link is removed, not followed)."""
    _unlink_quietly(path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)


def _read(path: str, cap: int) -> bytes:
    return read_regular(path, cap, follow=False)


def _read_staging(path: str) -> bytes:
    """A staging file; a special file or a link there (never raymerge's) reads as a damaged one."""
    try:
        return _read(path, SMALL_CAP)
    except NotRegular:
        return b""


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _identity_text(st: os.stat_result) -> str:
    """What the journal records of a staged file: its inode. Not the device number, which a
    network or FUSE file system, or a reboot, may change while the file stays the same."""
    return str(st.st_ino)


def _token(path: str) -> str:
    try:
        st = os.lstat(path)
    except OSError:
        return ""
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def _unlink_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
