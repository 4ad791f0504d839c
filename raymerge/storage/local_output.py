"""A local output folder: staged shard files written at offsets, renamed at commit; small files
(`LocalStore`) written whole under a temporary name and renamed.

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

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from raymerge.errors import DENIED, FULL, MISSING, OutputError, StorageError
from raymerge.storage import urls
from raymerge.storage.checksum import crc32
from raymerge.storage.localfs import (NOFOLLOW, Identity, NotRegular, create_new, fsync_dir, identities,
                                      identity_of, open_regular, temporary, temporary_of, write_whole)
from raymerge.storage.retry import Failure, reason_of
from raymerge.storage.store import SMALL_CAP, Conflict, Stored, plain, plain_name
from raymerge.storage.writers import BLOCK, LEASE, STAGING, PartRules, ShardState, Span, StagedItem, Target, Verified

PARTIAL = ".partial"


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
        self.files = LocalStore(self.url)
        self.staging = LocalStore(self.url, STAGING)  # the staged shards live there too
        self._staging = self.staging.url
        self._fds: dict[tuple[str, int], int] = {}
        self._direct = hasattr(os, "O_DIRECT")
        self._lock = threading.Lock()  # worker threads share the open files
        self._protected: frozenset[Identity] = frozenset()  # the inputs' files: never written through
        self._created: dict[str, str] = {}  # handle -> identity of the staged file `prepare` made

    def free_bytes(self) -> int | None:
        folder = self.url
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
        try:
            st = os.statvfs(folder)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

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
        self.staging.make()
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

    def abort(self, shards: list[str], handles: list[str] | None) -> None:
        """Remove every staged file: what the staging folder holds under a staged name is this
        run's to remove, since its lease says it owns the output (found so without handles too)."""
        self.close()
        self.staging.delete([n for n in self.staging.list() if n.endswith(PARTIAL)])

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


LOCK = ".raymerge.lock"  # the lock file of a store's folder (`LocalStore._locked`); never listed
_THREADS = threading.Lock()  # one thread of this process at a time in `LocalStore._locked`


class LocalStore:
    """Small files directly in one local folder (storage.store): `root`, the output folder, or `sub`,
    a folder of raymerge's own in it (the staging folder), which must never be a link.

    Files are written whole: to a temporary name, fsync'ed, renamed (`write_whole`); a name is
    taken only if free with O_CREAT|O_EXCL, never following a link. A file's version is its
    identity and last write (inode, mtime, size), as lstat gives them. A conditional replace or
    delete checks the version and changes the file under the folder's lock, so of two callers only
    one changes a version; a replace renames the new file over the name, which is never free. Temporary names (storage.localfs.temporary) are
    never listed: they stand for a file in the making, or one being replaced."""

    def __init__(self, root: str, sub: str = "") -> None:
        self.url = os.path.join(root, sub) if sub else root
        self._root, self._sub = root, sub
        self._made: list[str] = []  # folders this store created, deepest first

    def make(self) -> None:
        """The folder, created with the folders above it where missing."""
        if os.path.isfile(self._root):
            raise OutputError(f"--out {self._root}: is a file; give a directory for the checkpoint")
        if os.path.isdir(self._folder()):
            return
        missing, folder = [], self.url
        while not os.path.exists(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(self.url, exist_ok=True)
        except OSError as e:
            what = f"{self._sub} in it" if self._sub else "it"
            raise OutputError(f"--out {self._root}: cannot create {what} ({e.strerror}); check the path "
                              "and its permissions") from e
        self._made = missing

    def _folder(self) -> str:
        """The folder, refused where `sub` is a link: planted there, it is never raymerge's own, and
        nothing is read, written or deleted through it."""
        if self._sub and os.path.islink(self.url):
            raise OutputError(f"--out {self._root}: {self._sub} is a symbolic link; raymerge stages only in a folder "
                              "of its own: remove the link")
        return self.url

    def _path(self, name: str) -> str:
        return os.path.join(self._folder(), plain(name, self.url))

    # -- writes ---------------------------------------------------------------------------------

    def put(self, name: str, data: bytes) -> str:
        path = self._path(name)
        self.make()
        try:
            return _version(write_whole(path, data))
        except OSError as e:
            raise _failed("writing", path, e) from e

    def put_if_absent(self, name: str, data: bytes) -> str:
        path = self._path(name)
        self.make()
        st = self._write_new(path, data, name)
        try:
            fsync_dir(self.url)
        except OSError as e:
            _unlink_quietly(path)  # made an instant ago and not surely kept: no one else's yet
            raise _failed("writing", path, e) from e
        return _version(st)

    def _write_new(self, path: str, data: bytes, name: str) -> os.stat_result:
        """`data` as a new file at `path` (localfs.create_new); Conflict (for `name`) where
        something is there, a link or a special file too: never written through."""
        try:
            return create_new(path, data)
        except FileExistsError as e:
            raise Conflict(name) from e
        except OSError as e:  # the open's error names the file; a write's or an fsync's does not
            raise _failed("creating" if e.filename else "writing", path, e) from e

    def put_if_match(self, name: str, data: bytes, version: str) -> str:
        """The new file, written whole beside the name, renamed over it if the file there is still
        `version` (else Conflict): checked and renamed under the folder's lock (`_locked`), so of
        two callers only one replaces a version, and the name is never free meanwhile (a
        `put_if_absent` never slips in). A name whose folder is gone is no version: Conflict."""
        path = self._path(name)
        if not os.path.isdir(self._folder()):
            raise Conflict(name)
        new = temporary(path)
        st = self._write_new(new, data, name)
        try:
            with self._locked():
                if _token(path) != version:
                    raise Conflict(name)
                try:
                    os.rename(new, path)
                except IsADirectoryError:  # a folder where the file belongs (damage): set aside
                    os.rename(path, temporary(path))
                    os.rename(new, path)
            fsync_dir(self.url)
        except FileNotFoundError as e:
            raise Conflict(name) from e  # the folder is gone, and the file with it
        except OSError as e:
            raise _failed("replacing", path, e) from e
        finally:
            _unlink_quietly(new)  # gone once renamed; what was not put otherwise
        return _version(st)

    def delete_if_match(self, name: str, version: str) -> None:
        path = self._path(name)
        try:
            with self._locked():
                if _token(path) != version:
                    return  # no longer that version, or gone: not for this caller to delete
                os.remove(path)
        except FileNotFoundError:
            return  # the folder is gone, and the file with it
        except OSError as e:
            raise _failed("removing", path, e) from e
        self._drop_leftovers([name])

    def delete(self, names: list[str]) -> None:
        """Remove files by name (a symbolic link is removed, never followed), and what is left of
        their temporary files."""
        for path in [self._path(n) for n in names]:
            _remove(path)
        self._drop_leftovers(names)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The folder's exclusive lock, for a check and the change it allows: every conditional
        write or delete of this store's files, by any process on any host that sees the folder,
        takes it. A POSIX record lock (lockf) on the folder's lock file, which NFS serves too; the
        kernel releases it when a holder dies. Where the file system has no locks (some FUSE
        mounts), the check and the change go unlocked: two runs taking over at once could then both
        replace the lease, and the one replaced stops at its next heartbeat, before it commits."""
        with _THREADS:  # a POSIX lock is the process's: its threads take turns here
            fd = os.open(os.path.join(self._folder(), LOCK), os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
            try:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX)
                except OSError as e:
                    if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                yield
            finally:
                os.close(fd)  # releases the lock

    def _drop_leftovers(self, names: list[str]) -> None:
        """Remove the temporary files of deleted names (a write cut short) and, in raymerge's own
        staging folder, those of names that no longer exist (a run killed mid-write) but the
        lease's (a takeover may be writing it); then this store's own folder and the folders it
        made, where empty: a run that made `--out` only to fail leaves nothing."""
        gone = set(names)
        entries = self._entries()
        for entry in entries:
            of = temporary_of(entry)
            if of in gone or (self._sub and of is not None and of != LEASE and of not in entries):
                _unlink_quietly(os.path.join(self.url, entry))
        if set(self._entries()) == {LOCK}:  # nothing left to lock
            _unlink_quietly(os.path.join(self.url, LOCK))
        for folder in ([self._folder()] if self._sub else []) + self._made:
            try:
                os.rmdir(folder)
            except OSError:
                pass

    # -- reads ----------------------------------------------------------------------------------

    def get(self, name: str) -> Stored | None:
        """A file's bytes, read from the descriptor whose identity is its version; a special file,
        a link or a file past SMALL_CAP reads as damaged (b"")."""
        path = self._path(name)
        try:
            fd = open_regular(path, follow=False)
        except FileNotFoundError:
            return None
        except NotRegular:
            st = _lstat(path)
            return None if st is None else Stored(b"", _version(st), _age(st))
        except OSError as e:
            raise _failed("reading", path, e) from e
        try:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(SMALL_CAP + 1)
        except OSError as e:
            raise _failed("reading", path, e) from e
        return Stored(data if len(data) <= SMALL_CAP else b"", _version(st), _age(st))

    def list(self, prefix: str = "") -> list[str]:
        if os.path.isfile(self._root):
            raise OutputError(f"--out {self._root}: is a file; give a directory for the checkpoint")
        return sorted(n for n in self._entries()
                      if n.startswith(prefix) and temporary_of(n) is None and n != LOCK)

    def _entries(self) -> list[str]:
        if not os.path.isdir(self._folder()):
            return []
        try:
            return os.listdir(self.url)
        except OSError as e:
            raise _failed("listing", self.url, e) from e


def classify(e: BaseException) -> Failure | None:
    """Local file system errors, by their class and errno. Also the OSErrors that fsspec's other
    file systems translate their errors into (s3fs: FileNotFoundError for NoSuchKey)."""
    if not isinstance(e, OSError):
        return None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return Failure(FULL, True)  # another writer may free space: a retry may get through
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, NotRegular)):
        return Failure(MISSING, False)
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return Failure(DENIED, False)
    return None


OUTPUT = LocalOutput  # what storage.writers opens for file:// (WRITERS)


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


def _remove(path: str) -> None:
    """Unlink `path` (a symbolic link itself, never its target); one already gone is fine."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"cannot remove {path} ({e.strerror}); fix its permissions", reason_of(e)) from e


def _failed(doing: str, path: str, e: OSError) -> StorageError:
    return StorageError(f"{doing} {path} failed: {e.strerror or e}", reason_of(e))


def _create(path: str) -> int:
    """A new empty file at `path`, whatever was there (a planted link is removed, not followed)."""
    _unlink_quietly(path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)


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
        return _version(os.lstat(path))
    except OSError:
        return ""


def _version(st: os.stat_result) -> str:
    """A local file's version (storage.store): which file, and its last write."""
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def _age(st: os.stat_result) -> float:
    return max(0.0, time.time() - st.st_mtime)


def _unlink_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
