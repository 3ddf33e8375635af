"""The VFS's folder actions (this host's extension, beside upstream's): walk a tree, and read or
write many files in one call, so a folder of small files costs one VFS round trip per batch
instead of several per file.

Every path is opened one component at a time with O_NOFOLLOW, from the drive's own directory
down to the tree and beneath it, so a symlink anywhere in a tree or above it is never followed,
whatever it points at (one swapped in after the VFS checked the path, or after a walk, included:
its open fails). Names are given as lists of components, each checked here.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from typing import Any

import blake3

from host import fsutil
from host.kinode_types import vfs_path_problem

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)   # a FIFO swapped in can never block an open


# One ReadMany's bytes are held in memory whole: a caller may not ask for more (a folder's batch is
# far smaller).
MAX_READ_MANY = 64 << 20


def _write_piece(fd: int, piece: memoryview, offset: int) -> None:
    n = len(piece)
    body = n - n % fsutil.DIRECT_ALIGN
    if n >= fsutil.DIRECT_MIN and offset % fsutil.DIRECT_ALIGN == 0 and hasattr(os, "O_DIRECT"):
        try:
            dfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            dfd = -1   # no O_DIRECT here (tmpfs): the page cache, as for small pieces
        if dfd >= 0:
            try:
                view = fsutil.aligned_buffer(body)
                view[:body] = piece[:body]
                fsutil.pwrite_all(dfd, view[:body], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                body = 0   # refused after all: write it all the ordinary way
            finally:
                os.close(dfd)
            fsutil.pwrite_all(fd, piece[body:], offset + body)
            return
    fsutil.pwrite_all(fd, piece, offset)


class TreeError(Exception):
    """A refusal or a failure, with the tree-relative path it concerns ('' for the root)."""

    def __init__(self, text: str, path: str = ""):
        super().__init__(text)
        self.path = path


def stamp(st: os.stat_result) -> str:
    """The same token as the VFS's Metadata `stamp`: changes whenever the file does."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _stamp_size(token: Any) -> int | None:
    """The file size inside a stamp (see `stamp`), or None if it is not one."""
    fields = token.split(":") if isinstance(token, str) else []
    return int(fields[2]) if len(fields) == 5 and fields[2].isdigit() else None


def check_parts(path: Any) -> tuple:
    """A tree-relative path as a list of components, refused if any could leave the tree."""
    if not isinstance(path, str) or not path:
        raise TreeError("a path in the tree must be a non-empty string")
    problem = vfs_path_problem(path, exact=True)
    if problem:
        raise TreeError(f"bad path component: {path[:200]!r} {problem}", path)
    return tuple(path.split("/"))


def open_root(real: str, drive: str = "") -> int:
    """The tree's top folder, itself no symlink. With `drive` (the drive's resolved directory, of
    which `real` is a path beneath), it is opened one component at a time from the drive without
    following a symlink, so one swapped in above the folder after the path was checked is refused too."""
    try:
        if not drive or real == drive:
            return os.open(real, _DIR_FLAGS)
        if not real.startswith(drive.rstrip("/") + "/"):
            raise TreeError("the folder is outside its drive")
        fd = os.open(drive, _DIR_FLAGS)
        try:
            for part in real[len(drive.rstrip("/")) + 1:].split("/"):
                if part in ("", "."):
                    continue
                sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd
    except OSError as e:
        # O_NOFOLLOW with O_DIRECTORY fails a symlink with ELOOP or ENOTDIR
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(real):
            raise TreeError("the folder is a symlink: refusing to follow it") from None
        raise


class _Dirs:
    """Directory fds beneath a root, opened (or created) one component at a time without
    following symlinks, and cached for the call."""

    def __init__(self, root_fd: int):
        self.fds: dict = {(): root_fd}

    def get(self, parts: tuple, create: bool = False) -> int:
        fd = self.fds.get(parts)
        if fd is not None:
            return fd
        parent = self.get(parts[:-1], create)
        if create:
            try:
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
            except FileExistsError:
                pass
        fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        self.fds[parts] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


def walk(real: str, max_depth: int, max_entries: int, drive: str = "") -> dict:
    """Every folder and regular file beneath `real`, depth first in name order:
    {"dirs": [path], "files": [[path, size, stamp]], "skipped": [path]} (skipped: symlinks and
    special files, never followed). Refuses a tree deeper than `max_depth` levels or with more than
    `max_entries` entries, and names that are not UTF-8."""
    dirs: list = []
    files: list = []
    skipped: list = []
    count = 0
    # Only the folders on the path to the one being listed are open (at most max_depth fds): a
    # folder waiting its turn is a name on the stack, opened when popped. Depth first, each popped
    # folder's parent is on that path, so it is opened beneath its parent's fd, never by a path.
    chain: list = [open_root(real, drive)]   # fds of the folders on the path, the root first
    stack: list = [()]
    try:
        while stack:
            parts = stack.pop()
            del_to = max(len(parts), 1)
            while len(chain) > del_to:
                os.close(chain.pop())
            if parts:
                try:
                    chain.append(os.open(parts[-1], _DIR_FLAGS, dir_fd=chain[-1]))
                except OSError as e:
                    raise TreeError(f"cannot open {'/'.join(parts)}: {e.strerror}", "/".join(parts)) from None
            fd = chain[-1]
            with os.scandir(fd) as it:
                found = sorted(it, key=lambda e: e.name)
            subdirs = []
            for ent in found:
                path = "/".join(parts + (ent.name,))
                try:
                    ent.name.encode("utf-8")
                except UnicodeEncodeError:
                    raise TreeError(f"a name that is not UTF-8 in {'/'.join(parts) or 'the folder'}",
                                    "/".join(parts)) from None
                count += 1
                if count > max_entries:
                    raise TreeError(f"the folder has more than {max_entries} entries (the limit)")
                if len(parts) + 1 > max_depth:
                    raise TreeError(f"the folder is deeper than {max_depth} levels (the limit): {path[:200]}",
                                    path)
                st = ent.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    dirs.append(path)
                    subdirs.append(ent.name)
                elif stat.S_ISREG(st.st_mode):
                    files.append([path, st.st_size, stamp(st)])
                else:
                    skipped.append(path)
            # depth first, in name order: push in reverse
            stack.extend(parts + (name,) for name in reversed(subdirs))
    finally:
        for fd in chain:
            os.close(fd)
    # `stack` pops last-pushed first, so dirs came out depth first; files follow the same order
    return {"dirs": dirs, "files": files, "skipped": skipped}


def _open_file(dirs: _Dirs, parts: tuple, flags: int) -> int:
    return os.open(parts[-1], flags | _NOFOLLOW | _NONBLOCK, 0o600, dir_fd=dirs.get(parts[:-1]))


def read_many(real: str, items: list, drive: str = "") -> tuple:
    """Read pieces [path, offset, length, stamp] of files beneath `real` into one buffer; each
    file must still have the stamp it had when listed, before and after its read. -> (BLAKE3 hex
    of each piece, the bytes)."""
    plan = []
    total = 0
    for item in items:
        if not (isinstance(item, list) and len(item) == 4):
            raise TreeError("ReadMany items are [path, offset, length, stamp]")
        path, offset, length, want = item
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            raise TreeError("ReadMany offsets and lengths are non-negative integers", str(path))
        plan.append((check_parts(path), path, offset, length, want))
        listed = _stamp_size(want)   # the size the file had when listed: checked before allocating
        if listed is not None and offset + length > listed:
            raise TreeError(f"{path}: the piece at {offset} of {length} bytes passes the file's end "
                            f"({listed} bytes)", str(path))
        total += length
        if total > MAX_READ_MANY:
            raise TreeError(f"ReadMany asks for more than {MAX_READ_MANY} bytes in one call (the limit)")
    # one piece (a big file's) is read straight into its own bytes; several into one buffer
    buf: bytes | bytearray | None = bytearray(total) if len(plan) > 1 else None
    view = memoryview(buf) if isinstance(buf, bytearray) else None
    hashes = []
    dirs = _Dirs(open_root(real, drive))
    pos = 0
    try:
        for parts, path, offset, length, want in plan:
            try:
                fd = _open_file(dirs, parts, os.O_RDONLY)
            except OSError as e:
                raise TreeError(f"{path} changed since the folder was listed ({os.strerror(e.errno or 0).lower()})",
                                path) from None
            try:
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode) or stamp(before) != want:
                    raise TreeError(f"{path} changed since the folder was listed", path)
                if offset + length > before.st_size:
                    raise TreeError(f"{path}: the piece at {offset} of {length} bytes passes the file's end "
                                    f"({before.st_size} bytes)", path)
                if view is None:
                    whole = os.pread(fd, length, offset)
                    piece, got = memoryview(whole), len(whole)
                    buf = whole
                else:
                    piece = view[pos:pos + length]
                    got = 0
                    while got < length:
                        n = os.preadv(fd, [piece[got:]], offset + got)
                        if n <= 0:
                            break
                        got += n
                if got != length or stamp(os.fstat(fd)) != want:
                    raise TreeError(f"{path} changed while being read", path)
            finally:
                os.close(fd)
            hashes.append(blake3.blake3(piece).hexdigest())
            pos += length
    finally:
        dirs.close()
    return hashes, buf if buf is not None else b""


def write_many(real: str, items: list, make_dirs: list, data: bytes, state: dict | None,
               drive: str = "") -> Callable[[], None]:
    """Check every piece [path, offset, length, blake3] against its hash now; return the job that
    creates the folders `make_dirs`, writes the pieces (a piece at offset 0 starts its file anew)
    and last the small `state` file {"path", "text"} (atomically), all beneath `real`, without
    following a symlink. A piece that fails its check raises here: nothing of the batch is written."""
    plan = []
    pos = 0
    view = memoryview(data)
    for item in items:
        if not (isinstance(item, list) and len(item) == 4):
            raise TreeError("WriteMany items are [path, offset, length, blake3]")
        path, offset, length, digest = item
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            raise TreeError("WriteMany offsets and lengths are non-negative integers", str(path))
        parts = check_parts(path)
        piece = view[pos:pos + length]
        if len(piece) != length:
            raise TreeError(f"the data is shorter than its pieces ({len(data)} bytes)", path)
        if blake3.blake3(piece).hexdigest() != digest:
            raise TreeError(f"{path} (at offset {offset}) failed its integrity check", path)
        plan.append((parts, offset, piece))
        pos += length
    if pos != len(data):
        raise TreeError(f"the data is longer than its pieces ({len(data)} bytes, pieces {pos})")
    dir_parts = [check_parts(d) for d in make_dirs]
    state_parts = check_parts(state.get("path")) if state else None
    state_text = state.get("text") if state else None
    if state and not isinstance(state_text, str):
        raise TreeError("WriteMany state is {\"path\", \"text\"}")

    def job() -> None:
        dirs = _Dirs(open_root(real, drive))
        try:
            for parts in dir_parts:
                dirs.get(parts, create=True)
            for parts, offset, piece in plan:
                fd = _open_file(dirs, parts, os.O_WRONLY | os.O_CREAT)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        raise TreeError(f"not a regular file: {'/'.join(parts)}", "/".join(parts))
                    if st.st_nlink > 1:   # a write would reach every other name of it (an installed build file)
                        raise TreeError(f"refusing to write a file with other hard links: {'/'.join(parts)}",
                                        "/".join(parts))
                    if offset == 0 and st.st_size:
                        # a piece at offset 0 starts its file anew; an empty one (a new file) is left
                        # alone, as ext4 writes a file truncated to nothing back as soon as it is closed
                        os.ftruncate(fd, 0)
                    _write_piece(fd, piece, offset)
                finally:
                    os.close(fd)
            if state_parts and isinstance(state_text, str):
                parent = dirs.get(state_parts[:-1])
                tmp = f".{state_parts[-1]}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o600, dir_fd=parent)
                try:
                    fsutil.pwrite_all(fd, state_text.encode("utf-8"), 0)
                finally:
                    os.close(fd)
                os.rename(tmp, state_parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
        finally:
            dirs.close()
    return job


def _syncfs(fd: int) -> bool:
    """Flush the filesystem holding `fd` in one call (Linux syncfs); False where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return False
    if syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


def sync_tree(real: str, drive: str = "") -> None:
    """Make every file and folder beneath `real` durable (before the tree takes its real name): one
    syncfs of its filesystem, or without it an fsync of each file and folder."""
    root = open_root(real, drive)
    try:
        if _syncfs(root):
            return
        for _top, _dirs, names, dfd in os.fwalk(dir_fd=root, follow_symlinks=False):
            for n in names:
                if not stat.S_ISREG(os.stat(n, dir_fd=dfd, follow_symlinks=False).st_mode):
                    continue   # a symlink or special file: never opened
                fd = os.open(n, os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=dfd)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.fsync(dfd)
    finally:
        os.close(root)
