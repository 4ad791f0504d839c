"""Local files, opened so that nothing a folder holds can make raymerge block or write into an input.

Every local path raymerge reads or writes is a regular file, checked on the descriptor it uses:
`open_regular` opens with O_NONBLOCK (a FIFO with no writer, a terminal or a device cannot block
the open) and O_NOCTTY, then `fstat`s and refuses anything else with `NotRegular`, naming what it
found ("a FIFO"). Checking the descriptor, not the name, leaves no window for a swap between the
check and the use.

Identities (device, inode) tell files apart however they are named: a hard link (`cp -al`,
`rsync --link-dest`, snapshots) or a bind mount gives two names one inode. `identity_of` and
`identities` serve the output writer's rule: a file raymerge writes has one link and the inode of
no input (storage.local_output).

`SafeLocalFileSystem` is fsspec's local filesystem with its reads opened by `open_regular`, so
that resolve, verify, inspect and the commit get the same guarantee through fsspec.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import uuid
from collections.abc import Iterable

from fsspec.implementations.local import LocalFileSystem

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_QUIET = os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))
_TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp", re.S)


class NotRegular(OSError):
    """The path is not a regular file (a FIFO, socket, device, directory, or a link where none may be)."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(errno.EINVAL, f"is {what}, not a regular file", path)


def kind(mode: int) -> str:
    """What a file of this st_mode is, as messages say it ("a FIFO"); "a regular file" for one."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file" if stat.S_ISREG(mode) else
                "a special file")


def open_regular(path: str, flags: int = os.O_RDONLY, *, follow: bool = True) -> int:
    """A descriptor of the regular file at `path`, opened with `flags`; NotRegular for anything else.

    Never blocks on what is there, and never opens anything but a regular file: the path is stat'ed
    first (opening some devices acts on them), the descriptor fstat'ed after (the path may have
    changed in between). `follow=False` refuses a symbolic link itself (raymerge's own files);
    inputs may be links (the Hugging Face cache links to its blobs), their targets checked. With
    O_CREAT a missing file is created (mode 0644 before the umask)."""
    try:
        st = (os.stat if follow else os.lstat)(path)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    else:
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(path, kind(st.st_mode))
    try:
        fd = os.open(path, flags | _QUIET | (0 if follow else NOFOLLOW), 0o644)
    except OSError as e:
        # ENXIO: a socket, or a FIFO opened for writing with no reader; ELOOP: a link with O_NOFOLLOW
        if e.errno in (errno.ENXIO, errno.ELOOP, errno.EISDIR):
            raise NotRegular(path, _kind_at(path, follow)) from e
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegular(path, kind(st.st_mode))
    return fd


def _kind_at(path: str, follow: bool) -> str:
    try:
        return kind((os.stat if follow else os.lstat)(path).st_mode)
    except OSError:
        return "a special file"


def write_whole(path: str, data: bytes) -> os.stat_result:
    """`data` as the file at `path`, whole or not at all: written to a new temporary file beside it
    (O_CREAT|O_EXCL, no link followed), fsync'ed, then renamed over the name. Nothing is ever
    written through or truncated: a hard link or symbolic link at `path` loses its name, never the
    bytes it shares with another file. Returns the new file's stat."""
    path = os.path.abspath(path)
    tmp = temporary(path)
    st = create_new(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(path))
    return st


def create_new(path: str, data: bytes) -> os.stat_result:
    """`data` as a new file at `path`, created by this call (O_CREAT|O_EXCL, no link followed:
    FileExistsError where anything is there) and fsync'ed; its stat. A file this call made but
    could not write whole is removed: no one else's yet. The folder is not fsync'ed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            return os.fstat(f.fileno())
    except BaseException:
        _remove_quietly(path)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def temporary(path: str) -> str:
    """A new name beside `path` for a temporary file standing for it: hidden, and never a name
    raymerge gives to anything else (`temporary_of`)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")


def temporary_of(name: str) -> str | None:
    """The name a temporary file (`temporary`) stands for; None for any other name."""
    m = _TEMPORARY.fullmatch(name)
    return m.group(1) if m else None


def write_regular(path: str, data: bytes) -> None:
    """`data` as the file a user names for a report or a plot (write_whole), refused where
    something other than a regular file is (a FIFO, a device: NotRegular)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(path, kind(st.st_mode))
    write_whole(path, data)


def fsync_dir(folder: str) -> None:
    """Make a folder's new names durable (a rename, a new file); a FIFO there fails, never blocks."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NONBLOCK)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_regular(path: str, cap: int, *, follow: bool = True) -> bytes:
    """The whole regular file at `path`; OSError(EFBIG) past `cap` bytes (one byte more is read)."""
    fd = open_regular(path, follow=follow)
    with os.fdopen(fd, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise OSError(errno.EFBIG, f"larger than {cap} bytes", path)
    return data


Identity = tuple[int, int]


def identity_of(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino


def identities(paths: Iterable[str]) -> frozenset[Identity]:
    """The identities of the files at `paths` that exist (links followed: what they name)."""
    found = set()
    for path in paths:
        try:
            found.add(identity_of(os.stat(path)))
        except OSError:
            pass
    return frozenset(found)


class SafeLocalFileSystem(LocalFileSystem):
    """fsspec's local filesystem whose reads open regular files only, without blocking."""

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if mode != "rb":
            return super()._open(path, mode=mode, block_size=block_size, **kwargs)
        fd = open_regular(self._strip_protocol(path))
        return os.fdopen(fd, "rb")
