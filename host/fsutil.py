"""File writing helpers: atomic writes (a reader sees the old file or the whole new one, never a
part), and the pieces of a write around the page cache shared by the VFS's writers.

The new contents go to a temporary file in the same folder (so the rename stays on one filesystem),
then `os.replace` swaps it in. With `fsync=True` the data and the rename survive a power cut too.
"""
from __future__ import annotations

import errno
import mmap
import os
import pwd
import secrets
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

MAX_IO = 0x7FFFF000      # Linux caps one read/write call at this many bytes
# A write of DIRECT_MIN bytes or more at a DIRECT_ALIGN-aligned offset may go around the page cache
# (O_DIRECT, from a page-aligned buffer): copying into fresh page-cache pages is the costliest step
# of a big write on a VM, and the final fsync then has little left to flush.
DIRECT_MIN = 1 << 20
DIRECT_ALIGN = 4096
DIRECT_STEP = 4 << 20  # bytes copied into the aligned buffer (and written) at a time
_aligned_buffers = threading.local()


def aligned_buffer(n: int) -> memoryview:
    """A page-aligned buffer of at least `n` bytes, one per thread, reused."""
    buf = getattr(_aligned_buffers, "buf", None)
    if buf is None or len(buf) < n:
        buf = mmap.mmap(-1, max(n, 4 << 20))
        _aligned_buffers.buf = buf
    return memoryview(buf)


def pwrite_all(fd: int, data: bytes | memoryview, pos: int) -> None:
    """pwrite all of `data` at `pos` (a short write is retried; none at all is an error)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:MAX_IO], pos)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        pos += n

PathLike = str | os.PathLike[str]
Data = bytes | bytearray | memoryview

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")


def _write_all(fd: int, data: Data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: PathLike, *, fsync: bool = False, mode: int = 0o600) -> Iterator[int]:
    """Yield a file descriptor to write the new contents of `path` to; on leaving the block without
    an exception they replace `path`, otherwise the temporary file is removed. Raises OSError
    (FileNotFoundError when the folder does not exist)."""
    path = Path(path)
    tmp = _temp_beside(path)
    fd = os.open(tmp, _FLAGS, mode)
    try:
        yield fd
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_folder(path.parent)


def write_atomic(path: PathLike, data: Data, *, fsync: bool = False, mode: int = 0o600) -> None:
    """Replace `path` with `data`, atomically."""
    with atomic_writer(path, fsync=fsync, mode=mode) as fd:
        _write_all(fd, data)


def create_atomic(path: PathLike, data: Data, *, fsync: bool = False, mode: int = 0o600) -> bool:
    """Create `path` holding `data` unless it exists (then leave it alone): False if it existed.
    Two processes racing to create it end up with the same file, one of the two writers'."""
    path = Path(path)
    tmp = _temp_beside(path)
    fd = os.open(tmp, _FLAGS, mode)
    try:
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # unlike a rename, fails on an existing file
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem: a narrow race remains
            if path.exists():
                return False
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        _fsync_folder(path.parent)
    return True


# ---- a private home ---------------------------------------------------------------------------------


class NotPrivate(Exception):
    """A home (or a folder in it) another user owns or may write: the node does not start."""


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def private_problem(path: Path, me: int) -> str:
    """Why the folder `path` is not private to the user `me`, or '' (also if it does not exist).

    Refused: a folder another user owns, one group or others may write, and a symbolic link another
    user owns (in a shared folder such as /tmp its owner could point it elsewhere at any time)."""
    try:
        link = os.lstat(path)
        st = os.stat(path)
    except FileNotFoundError:
        return ""
    where = f"{path} (mode {stat.filemode(st.st_mode)[1:]} {st.st_mode & 0o7777:04o}, owner {_owner(st.st_uid)})"
    mine = _owner(me)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (me, 0):
        return (f"{path} is a symbolic link owned by {_owner(link.st_uid)}, who can point it elsewhere: "
                f"use a home of your own (--home DIR)")
    if not stat.S_ISDIR(st.st_mode):
        return f"{where} is not a folder: use another home (--home DIR)"
    if st.st_uid != me:
        return (f"{where} belongs to another user, who could read and replace this node's files; you are "
                f"{mine}. Use a home of your own (--home DIR), or have it given to you: "
                f"chown -R {_name(me)} {path} && chmod 700 {path}")
    if st.st_mode & 0o022:
        who = "its group and others" if st.st_mode & 0o022 == 0o022 else "its group" if st.st_mode & 0o020 else "others"
        return f"{where} may be written by {who}, who could swap the node's files; fix: chmod 700 {path}"
    return ""


def make_private_home(home: Path, folders: Sequence[str] = ()) -> list[str]:
    """Create `home` (0700) if missing, or check an existing one and its `folders` (what a node
    refuses to use if others can change it).
    Raises NotPrivate with the path, its mode and owner and the fix. An own home others may read
    is made 0700; what was changed is returned, to be told."""
    me = os.geteuid()
    told = []
    home.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(home, 0o700)
    except FileExistsError:
        pass
    for path in (home, *(home / name for name in folders)):
        problem = private_problem(path, me)
        if problem:
            raise NotPrivate(problem)
    mode = os.stat(home).st_mode & 0o777
    if mode & 0o077:
        os.chmod(home, 0o700)
        told.append(f"home {home} was open to others (mode {mode:04o}): made it 0700")
    return told


def drop_from_cache(paths) -> int:
    """Ask the kernel to drop these files' pages from the page cache (a benchmark's or a memory test's
    fair start: RSS counts a file's mapped pages that are resident); -> how many were asked."""
    n = 0
    for f in paths:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n
