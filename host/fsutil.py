"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The new contents go to a temporary file in the same folder (so the rename stays on one filesystem),
then `os.replace` swaps it in. With `fsync=True` the data and the rename survive a power cut too.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]
Data = Union[bytes, bytearray, memoryview]

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
def atomic_writer(path: PathLike, *, fsync: bool = False, mode: int = 0o644) -> Iterator[int]:
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


def write_atomic(path: PathLike, data: Data, *, fsync: bool = False, mode: int = 0o644) -> None:
    """Replace `path` with `data`, atomically."""
    with atomic_writer(path, fsync=fsync, mode=mode) as fd:
        _write_all(fd, data)


def create_atomic(path: PathLike, data: Data, *, fsync: bool = False, mode: int = 0o644) -> bool:
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
