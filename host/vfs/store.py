"""The VFS service `vfs:distro:sys`: files under `HOME/vfs/<package:publisher>/<drive>/...`.

A request body is JSON `{"path": "/package:publisher/drive/rest", "action": ...}` (serde's externally
tagged form, see KINODE.md); file data travels in the blob. `Vfs.handle` turns one request into a
`VfsResult` (JSON body, optional blob, capabilities the kernel must grant) and never raises.

Design notes
- Paths are split on `/`; empty and `.` parts collapse, `..`, NUL and backslashes are refused. The
  first part is a package id, the second the drive. Every path is then resolved with `realpath` and
  must stay inside the real drive directory (a symlink leading out of its drive is refused); files are
  opened by their resolved path with O_NOFOLLOW, so a symlink swapped in afterwards fails with ELOOP.
- Each `(process, path)` pair has its own handle: a raw fd plus our own cursor, used with
  pread/pwrite. A lock per handle keeps a close (by `forget`, `RemoveFile`, `Rename` ...) from
  racing an operation on that fd; a small set of locks striped by inode serialises writes to one
  file so `Append` never loses data to a concurrent writer and failed writes can be rolled back.
- Capabilities as kinode 0.9.5's vfs.rs: a process may use its own package's drives (its `pkg`
  drive too); anything else needs `has_cap` to accept `{"kind": "read"|"write", "drive":
  "/pkg:pub/drive"}` or `{"root": true}`. Reading needs "read", everything else (OpenFile and
  CloseFile too) "write"; write does not imply read.
- The `pkg` drive may hold hard links to the build output (see host/packages.py): a file there is
  copied to a private inode before any handle is opened on it, so no write reaches the build.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
import shutil
import stat
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host import fsutil
from host.kinode_types import vfs_path_problem
from host.messages import PackageId, ParseError, ProcessId
from host.vfs import delta as vfs_delta
from host.vfs import tree as vfs_tree

__all__ = ["Vfs", "VfsResult"]

CHUNK = 1 << 20                   # piece size for CopyFile
HASH_PIECE = 1 << 20              # piece size for Hash
MAX_OFFSET = 2**63 - 1            # largest file offset the OS accepts (off_t)
U64_MAX = 2**64 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)   # so a FIFO inside a drive can never block an open
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

# Actions whose unit form is a bare string, and which need only a "read" capability.
_UNIT_ACTIONS = frozenset({
    "CreateDrive", "CreateDir", "CreateDirAll", "CreateFile", "CloseFile", "Write", "WriteAll",
    "Append", "SyncAll", "Read", "ReadDir", "ReadToEnd", "ReadToString", "RemoveFile", "RemoveDir",
    "RemoveDirAll", "Metadata", "Len", "Hash", "AddZip",
    "SyncTree",  # this host's folder action
})
_ARG_ACTIONS = frozenset({"OpenFile", "ReadExact", "Seek", "Rename", "CopyFile", "SetLen",
                          "WalkDir", "ReadMany", "WriteMany",   # this host's folder actions
                          "ChunkList", "CopyRanges", "WriteRanges", "Blake3"})  # and its delta actions
# Actions served through the caller's handle: an existing handle needs no path resolution.
_HANDLE_ACTIONS = frozenset({
    "Read", "ReadToEnd", "ReadExact", "ReadToString", "Seek", "Write", "WriteAll", "Append", "SetLen",
    "SyncAll",
})
MAX_PATH_BYTES = 4096
# Upstream's check_caps: these need a "read" capability, every other action a "write" one.
_READ_ACTIONS = frozenset({
    "Read", "ReadDir", "ReadToEnd", "ReadExact", "ReadToString", "Seek", "Metadata", "Len", "Hash",
    "WalkDir", "ReadMany", "ChunkList", "Blake3",
})
READ_MIME = "application/octet-stream"   # the mime upstream puts on every blob the VFS returns
# AddZip refuses an archive beyond these before writing anything (a zip bomb).
MAX_ZIP_ENTRIES = 10_000
MAX_ZIP_BYTES = 1 << 30                   # total uncompressed size, as the entries declare it


@dataclass
class VfsResult:
    body: bytes                       # JSON response body
    blob: bytes | None = None      # file data for Read-like responses
    grant: list = field(default_factory=list)  # capability params the kernel must grant the caller

    @property
    def mime(self) -> str | None:
        return READ_MIME if self.blob is not None else None


# ---- errors ---------------------------------------------------------------------------------------

class _Err(Exception):
    """An `Err` response; `err` is the VfsError value (a bare string for unit variants)."""

    def __init__(self, err: Any):
        super().__init__(err)
        self.err = err


def _bad_json(msg: str) -> _Err:
    return _Err({"BadJson": {"error": msg}})


def _bad_request(msg: str) -> _Err:
    return _Err({"BadRequest": {"error": msg}})


def _io_error(msg: str, path: str) -> _Err:
    return _Err({"IOError": {"error": msg, "path": path}})


def _no_cap(action: str, path: str) -> _Err:
    return _Err({"NoCap": {"action": action, "path": path}})


_ERRNO_TEXT = {
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
    errno.ELOOP: "refusing to follow a symlink",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTEMPTY: "directory not empty",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.EINVAL: "invalid argument",
    errno.EXDEV: "cannot move between file systems",
    errno.EIO: "input/output error",
    errno.EBADF: "file is not open for writing",
}


def _os_text(e: OSError) -> str:
    if e.errno in _ERRNO_TEXT:
        return _ERRNO_TEXT[e.errno]
    if e.errno:
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__


def _from_os(e: OSError, path: str, doing: str = "") -> _Err:
    """Map an OSError on `path` to IOError with a readable message (upstream sends every I/O
    failure, a missing file too, as IOError; it never sends NotFound)."""
    text = _os_text(e)
    return _io_error(f"{doing}: {text}: {path}" if doing else f"{text}: {path}", path)


def _dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:        # a lone surrogate somewhere: fall back to \u escapes
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _err_result(err: Any) -> VfsResult:
    return VfsResult(_dumps({"Err": err}))


_OK = b'"Ok"'


# ---- request parsing -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _VPath:
    package: PackageId
    drive: str
    rest: tuple

    @property
    def text(self) -> str:
        """`pkg:pub/drive/rest`: the form used in responses, errors and as the handle key."""
        return "/".join((str(self.package), self.drive) + self.rest)

    @property
    def drive_text(self) -> str:
        return f"/{self.package}/{self.drive}"

    @property
    def is_drive_root(self) -> bool:
        return not self.rest


def _parse_path(raw: Any) -> _VPath:
    if not isinstance(raw, str):
        raise _bad_json(f"`path` must be a string, got {_json_type(raw)}")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad_request("path is not valid unicode") from None
    shown = raw if len(raw) <= 200 else raw[:200] + "..."
    if len(raw.encode("utf-8")) > MAX_PATH_BYTES:
        raise _bad_request(f"path is longer than {MAX_PATH_BYTES} bytes: {shown!r}")
    problem = vfs_path_problem(raw)
    if problem:
        raise _bad_request(f"path {problem}: {shown!r}")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not parts:
        raise _bad_request("empty path: expected /package:publisher/drive/...")
    try:
        package = PackageId.parse(parts[0])
    except ParseError as e:
        raise _Err({"ParseError": {"error": str(e), "path": shown}}) from None
    if len(parts) < 2:
        raise _Err({"ParseError": {"error": "malformed path: expected /package:publisher/drive/...",
                                   "path": shown}})
    return _VPath(package, parts[1], tuple(parts[2:]))


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad_json(f"{what} must be an integer, got {_json_type(v)}")
    if not lo <= v <= hi:
        raise _bad_json(f"{what} must be between {lo} and {hi}")
    return v


def _parse_action(a: Any) -> tuple:
    """-> (name, argument). Mirrors serde: unit variants as "Name" (or {"Name": null})."""
    if isinstance(a, str):
        if a in _UNIT_ACTIONS:
            return a, None
        if a in _ARG_ACTIONS:
            raise _bad_json(f"action {a} needs an argument, e.g. {{\"{a}\": ...}}")
        raise _bad_json(f"unknown action {a[:100]!r}")
    if not isinstance(a, dict) or len(a) != 1:
        raise _bad_json("`action` must be a string or an object with exactly one key")
    (name, arg), = a.items()
    if name in _UNIT_ACTIONS:
        if arg is not None:
            raise _bad_json(f"action {name} takes no argument")
        return name, None
    if name == "OpenFile":
        if not isinstance(arg, dict) or not isinstance(arg.get("create"), bool):
            raise _bad_json('OpenFile expects {"create": true|false}')
        return name, arg["create"]
    if name == "ReadExact":
        return name, _int(arg, "ReadExact length", 0, U64_MAX)
    if name == "SetLen":
        return name, _int(arg, "SetLen length", 0, U64_MAX)
    if name == "Seek":
        sf = arg.get("seek_from") if isinstance(arg, dict) else None
        if not isinstance(sf, dict) or len(sf) != 1:
            raise _bad_json('Seek expects {"seek_from": {"Start"|"End"|"Current": n}}')
        (whence, n), = sf.items()
        if whence == "Start":
            return name, (whence, _int(n, "Seek Start offset", 0, U64_MAX))
        if whence in ("End", "Current"):
            return name, (whence, _int(n, f"Seek {whence} offset", I64_MIN, I64_MAX))
        raise _bad_json(f"unknown seek origin {str(whence)[:100]!r} (expected Start, End or Current)")
    if name in ("Rename", "CopyFile"):
        if not isinstance(arg, dict) or not isinstance(arg.get("new_path"), str):
            raise _bad_json(f'{name} expects {{"new_path": "/package:publisher/drive/..."}}')
        return name, arg["new_path"]
    if name in _TREE_ACTIONS or name in _DELTA_ACTIONS:
        if not isinstance(arg, dict):
            raise _bad_json(f"{name} expects an object ({_TREE_ACTIONS.get(name) or _DELTA_ACTIONS[name]})")
        return name, arg
    raise _bad_json(f"unknown action {str(name)[:100]!r}")


# this host's folder actions (host/vfs/tree.py) and the shape of their argument
_TREE_ACTIONS = {
    "WalkDir": '{"max_depth": n, "max_entries": n}',   # -> {"WalkDir": counts}, the listing as the blob
    "ReadMany": '{"items": [[path, offset, length, stamp]]}',
    "WriteMany": '{"items": [[path, offset, length, blake3]], "dirs": [path], "state": {"path", "text"} | null}',
}
# and "SyncTree" (a unit action): waits for the process's last write, then makes the tree durable

# this host's delta actions (host/vfs/delta.py)
_DELTA_ACTIONS = {
    # -> {"ChunkList": {"count", "size", "stamp", "blake3"}}, the records as the blob; avg 0: only size and
    # stamp, and with forget what is kept for that stamp is dropped
    # copy_to: the bytes read are copied into that file (write capability) at the same offsets meanwhile,
    # up to copy_size (no whole-file hash then); the answer's "copied" says how many (0: the list was kept)
    "ChunkList": '{"avg": n, "whole": true|false, "forget": true|false, "copy_to": "/package:publisher/drive/...", '
                 '"copy_size": n}',
    # size: the new file's; its ranges in order, apart, within it
    # whole: the rest of the file is written already; -> {"Blake3": hex} of the new file, built and synced;
    # in_place (with whole): the first n bytes hold the old copy's, from ChunkList's copy_to
    "CopyRanges": '{"from": "/package:publisher/drive/...", "stamp": s, "size": n, "items": [[from, to, length]], '
                  '"whole": true|false, "in_place": n}',
    "WriteRanges": '{"size": n, "items": [[offset, length, blake3]]}',   # the pieces back to back as the blob
    "Blake3": '{"sync": true|false, "stamp": s|null}',   # -> {"Blake3": hex}; sync: an fsync meanwhile
}


# ---- low-level I/O ----------------------------------------------------------------------------------

def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def _pread_exact(fd: int, n: int, pos: int) -> bytes:
    data = os.pread(fd, min(n, fsutil.MAX_IO), pos)
    if len(data) == n or len(data) < min(n, fsutil.MAX_IO):
        return data
    parts = [data]
    got = len(data)
    while got < n:
        b = os.pread(fd, min(n - got, fsutil.MAX_IO), pos + got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _pread_to_eof(fd: int, pos: int) -> bytes:
    """From `pos` to the end of the file as fstat sees it now, in one pread (below 2 GiB).

    Reading exactly the known size avoids shrinking an over-sized buffer (a copy of the whole
    result); data appended after the fstat is left for the next read."""
    want = os.fstat(fd).st_size - pos
    if want <= 0:
        return b""
    return _pread_exact(fd, want, pos)


# A large WriteAll is answered at once and written by a background thread ("write-behind"), so the
# writing process handles its next message while the disk works. The process's next VFS request
# waits for that write first, and is answered with its error if it failed (as an OS reports write
# errors at the next call, or at fsync). The write holds the handle's lock, so nothing closes or
# reuses the fd under it.
WRITE_BEHIND_MIN = 256 * 1024
PKG_DRIVE = "pkg"  # where a package is installed (its files may be hard links to the build)

class _Handle:
    __slots__ = ("fd", "pos", "lock", "closed", "key", "direct_fd")

    def __init__(self, fd: int, key: str):
        self.fd = fd
        self.pos = 0
        self.lock = threading.Lock()
        self.closed = False
        self.key = key
        self.direct_fd: int | None = None   # None: not tried yet; -1: not available here

    def direct(self) -> int:
        if self.direct_fd is None:
            try:
                self.direct_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_DIRECT | _O_CLOEXEC)
            except (OSError, AttributeError):
                self.direct_fd = -1
        return self.direct_fd


def _write_at(h: _Handle, data, pos: int) -> None:
    """pwrite all of `data` at `pos`, around the page cache when it is big and aligned."""
    n = len(data)
    body = n - n % fsutil.DIRECT_ALIGN
    if n >= fsutil.DIRECT_MIN and pos % fsutil.DIRECT_ALIGN == 0 and h.direct() >= 0:
        # copied into the aligned buffer a step at a time: it stays that small whatever the chunk size
        view = fsutil.aligned_buffer(min(body, fsutil.DIRECT_STEP))
        src = memoryview(data)
        done = 0
        try:
            while done < body:
                take = min(fsutil.DIRECT_STEP, body - done)
                view[:take] = src[done:done + take]
                put = 0
                while put < take:
                    k = os.pwrite(h.direct(), view[put:take], pos + done + put)
                    if k <= 0:
                        raise OSError(errno.EIO, "short write")
                    put += k
                done += take
        except OSError as e:
            if e.errno != errno.EINVAL or done:
                raise
            _quietly(os.close, h.direct_fd)
            h.direct_fd = -1        # this filesystem refuses O_DIRECT after all: use the cache
        if done == body:
            if n > body:
                fsutil.pwrite_all(h.fd, memoryview(data)[body:], pos + body)
            return
    fsutil.pwrite_all(h.fd, data, pos)


@dataclass
class _Loc:
    real: str        # fully resolved path (inside the drive)
    link: str        # resolved parent + final name: the directory entry itself
    drive: str       # resolved drive directory


# ---- the service -------------------------------------------------------------------------------------

class Vfs:
    MAX_HANDLES_PER_PROCESS = 1024   # beyond this a process's least recently used handle is closed
    HOME_FOLDER = "vfs"              # the VFS's folder in a node's home

    @classmethod
    def in_home(cls, home: Path, delta: bool = True) -> Vfs:
        """The VFS of the node whose home is `home`: its files under HOME/vfs."""
        return cls(Path(home) / cls.HOME_FOLDER, delta)

    def __init__(self, root: Path, delta: bool = True):
        self.root = Path(root)
        self.delta = delta                       # the delta actions answer (KINODE_DELTA)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._root_s = str(self.root)
        self._real_root = os.path.realpath(self._root_s)
        self._lock = threading.Lock()            # guards _handles and _epoch
        self._handles: dict = {}                 # ProcessId -> OrderedDict[key, _Handle]
        self._epoch = 0                          # bumped whenever paths are removed/replaced
        self._ino_locks: dict = {}     # (device, inode) -> [lock, users]: a file's writes take turns, no one else's
        self._ino_locks_guard = threading.Lock()
        self._unshare_lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vfs-write")
        self._releaser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vfs-release")
        self._release_lock = threading.Lock()
        self._releasing = 0                      # replaced big files queued to be freed
        self._in_flight: dict = {}               # ProcessId -> (Future, path text): its write-behind

    # ---- public API ---------------------------------------------------------------------------------
    def drive_path(self, package_id: PackageId, drive: str) -> Path:
        """HOME/vfs/<package:publisher>/<drive>."""
        if not isinstance(drive, str) or "/" in drive or vfs_path_problem(drive, exact=True):
            raise ValueError(f"bad drive name {drive!r}")
        return self.root / str(package_id) / drive

    def file_path(self, vfs_path: str) -> Path:
        """The file on disk for a VFS path like `pkg:pub/pkg/x.wasm` (a process's wasm), resolved and
        inside the VFS; raises ValueError."""
        rel = vfs_path.lstrip("/")
        if len(rel.split("/")) < 3 or vfs_path_problem(rel, exact=True):
            raise ValueError(f"not a VFS file path: {vfs_path!r}")
        root = Path(self._real_root)
        path = (root / rel).resolve()
        if root not in path.parents:
            raise ValueError(f"{vfs_path!r} leads outside the VFS")
        return path

    def forget(self, source: ProcessId) -> None:
        """The process exited: close all its open handles."""
        self._settle(source)
        with self._lock:
            procs = self._handles.pop(source, None)
        for h in (procs or {}).values():
            self._close(h)

    def handle(self, source: ProcessId, has_cap: Callable[[dict], bool], body: bytes,
               blob: bytes | None) -> VfsResult:
        failed = self._settle(source)
        if failed is not None:
            return failed
        try:
            return self._handle(source, has_cap, body, blob)
        except _Err as e:
            return _err_result(e.err)
        except MemoryError:
            return _err_result({"IOError": {"error": "out of memory", "path": ""}})
        except OSError as e:                     # should not happen: every OS call maps its own
            return _err_result({"IOError": {"error": _os_text(e), "path": ""}})
        except BaseException as e:               # noqa: BLE001 - handle() must never raise
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            try:
                text = f"internal error: {type(e).__name__}: {e}"[:500]
            except Exception:                    # noqa: BLE001
                text = "internal error"
            return _err_result({"BadRequest": {"error": text}})

    def _settle(self, source: ProcessId) -> VfsResult | None:
        """Wait for the process's write-behind; its failure becomes this answer."""
        with self._lock:
            pending = self._in_flight.pop(source, None)
        if pending is None:
            return None
        future, path = pending
        try:
            future.result()
        except OSError as e:
            return _err_result(_from_os(e, path, "an earlier write failed").err)
        except Exception as e:  # noqa: BLE001
            return _err_result({"IOError": {"error": f"an earlier write failed: {e}", "path": path}})
        return None

    # ---- dispatch -----------------------------------------------------------------------------------
    def _handle(self, source: ProcessId, has_cap, body, blob) -> VfsResult:
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise _bad_json("request body must be bytes")
        try:
            req = json.loads(bytes(body).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _bad_json(f"request body is not UTF-8: {e}") from None
        except (ValueError, RecursionError) as e:
            raise _bad_json(f"request body is not valid JSON: {e}"[:300]) from None
        if not isinstance(req, dict):
            raise _bad_json('request body must be an object {"path": ..., "action": ...}')
        if "path" not in req:
            raise _bad_json("missing field `path`")
        if "action" not in req:
            raise _bad_json("missing field `action`")
        name, arg = _parse_action(req["action"])
        if name == "ReadDir" and req["path"] == "/":
            return self._list_root(has_cap)
        vp = _parse_path(req["path"])
        if blob is not None and not isinstance(blob, (bytes, bytearray, memoryview)):
            raise _Err({"BadBytes": {"action": name, "path": vp.text}})

        if name == "CreateDrive":
            return self._create_drive(source, has_cap, vp)
        if name == "CopyRanges":
            return self._copy_ranges(source, has_cap, vp, arg)
        if name == "ChunkList" and isinstance(arg, dict) and arg.get("copy_to") is not None:
            return self._chunk_and_copy(source, has_cap, vp, arg)
        if name in ("Rename", "CopyFile"):
            new = _parse_path(arg)
            self._check_cap(source, has_cap, vp, "write", name)
            self._check_cap(source, has_cap, new, "write", name)
            if vp.is_drive_root or new.is_drive_root:
                raise _bad_request(f"{name} cannot move or replace a drive root: "
                                   f"{vp.drive_text if vp.is_drive_root else new.drive_text}")
            src, dst = self._locate(vp), self._locate(new)
            if name == "Rename" and vp.drive == PKG_DRIVE:
                self._unshare(src, vp)   # a build output's link must not move where it can be written
            return (self._rename if name == "Rename" else self._copy)(vp, src, new, dst)

        kind = "read" if name in _READ_ACTIONS else "write"
        self._check_cap(source, has_cap, vp, kind, name)
        if name in ("RemoveDir", "RemoveDirAll") and vp.is_drive_root \
                and source.package_id != vp.package:
            raise _no_cap(name, vp.text)
        if name == "CloseFile":
            self._drop(source, vp.text)
            return VfsResult(_OK)
        if blob is None and name in ("Write", "WriteAll", "Append", "AddZip"):
            raise _bad_request(f"blob needs to exist for {name}")
        data = b"" if blob is None else blob if isinstance(blob, bytes) else bytes(blob)
        # handle actions resolve the path only when they must open a new handle
        loc = None if name in _HANDLE_ACTIONS else self._locate(vp)
        return getattr(self, f"_a_{name}")(source, vp, loc, arg, data)

    def _list_root(self, has_cap) -> VfsResult:
        """ReadDir of `/`: the packages' folders, for a holder of the root cap (kinode v0.9.5
        kinode/src/vfs.rs handle_request, its special case for `/`)."""
        if not _asks(has_cap, {"root": True}):
            raise _no_cap("ReadDir", "/")
        entries = []
        with os.scandir(self._root_s) as it:
            for e in it:
                kind = "Directory" if e.is_dir(follow_symlinks=False) else "File" if e.is_file(follow_symlinks=False) \
                    else "Symlink" if e.is_symlink() else "Other"
                entries.append({"path": e.name, "file_type": kind})
        entries.sort(key=lambda d: d["path"])
        return VfsResult(_dumps({"ReadDir": entries}))

    def _check_cap(self, source: ProcessId, has_cap, vp: _VPath, kind: str, action: str) -> None:
        if source.package_id == vp.package:
            return

        if _asks(has_cap, {"kind": kind, "drive": vp.drive_text}) or _asks(has_cap, {"root": True}):
            return
        raise _no_cap(action, vp.text)

    def _locate(self, vp: _VPath) -> _Loc:
        """Resolve symlinks; refuse anything that leaves the drive (or the drive leaving the root)."""
        drive_dir = os.path.join(self._root_s, str(vp.package), vp.drive)
        real_drive = os.path.realpath(drive_dir)
        if real_drive == self._real_root or not _inside(real_drive, self._real_root):
            raise _bad_request(f"drive {vp.drive_text} leads outside the VFS root")
        if vp.is_drive_root:
            return _Loc(real_drive, real_drive, real_drive)
        parent = os.path.realpath(os.path.join(drive_dir, *vp.rest[:-1]))
        link = os.path.join(parent, vp.rest[-1])
        real = os.path.realpath(link)
        if not (_inside(parent, real_drive) and _inside(real, real_drive)):
            raise _bad_request(f"path leads outside its drive through a symlink: {vp.text}")
        return _Loc(real, link, real_drive)

    # ---- handles ------------------------------------------------------------------------------------
    def _open_fd(self, loc: _Loc, vp: _VPath, create: bool, truncate: bool = False) -> int:
        if vp.drive == PKG_DRIVE:
            self._unshare(loc, vp)
        flags = os.O_RDWR | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK
        if create:
            flags |= os.O_CREAT
        if truncate:
            flags |= os.O_TRUNC
        try:
            try:
                fd = os.open(loc.real, flags, 0o600)
            except OSError as e:
                # a read-only file can still be read: fall back to a read-only fd
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or truncate:
                    raise
                fd = os.open(loc.real, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
        except OSError as e:
            raise _from_os(e, vp.text) from None
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            os.close(fd)
            raise _from_os(e, vp.text) from None
        if not stat.S_ISREG(mode):
            os.close(fd)
            what = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise _io_error(f"{what}: {vp.text}", vp.text)
        return fd

    def _install(self, source: ProcessId, h: _Handle, epoch: int | None, replace: bool):
        """Register a freshly opened handle. Returns the handle to use, or None to retry."""
        dropped = []
        result: _Handle | None = h
        with self._lock:
            if epoch is not None and epoch != self._epoch:
                dropped.append(h)
                result = None
            else:
                procs = self._handles.setdefault(source, OrderedDict())
                old = procs.get(h.key)
                if old is not None and not replace:
                    procs.move_to_end(h.key)
                    dropped.append(h)
                    result = old
                else:
                    if old is not None:
                        dropped.append(procs.pop(h.key))
                    procs[h.key] = h
                    while len(procs) > self.MAX_HANDLES_PER_PROCESS:
                        dropped.append(procs.popitem(last=False)[1])
        for d in dropped:
            self._close(d)
        return result

    def _handle_for(self, source: ProcessId, vp: _VPath, loc: _Loc | None, create: bool) -> _Handle:
        for _ in range(16):
            with self._lock:
                procs = self._handles.get(source)
                h = procs.get(vp.text) if procs else None
                if procs and h is not None:
                    procs.move_to_end(vp.text)
                    return h
                epoch = self._epoch
            fd = self._open_fd(loc or self._locate(vp), vp, create)
            h = self._install(source, _Handle(fd, vp.text), epoch, replace=False)
            if h is not None:
                return h
        raise _io_error(f"file keeps being replaced while opening it: {vp.text}", vp.text)

    def _with_handle(self, source, vp, loc, fn, create: bool = False):
        for _ in range(16):
            h = self._handle_for(source, vp, loc, create)
            with h.lock:
                if h.closed:          # closed under us by a Rename/Remove/eviction: look again
                    continue
                try:
                    return fn(h)
                except OSError as e:
                    raise _from_os(e, vp.text) from None
        raise _io_error(f"file keeps being replaced while using it: {vp.text}", vp.text)

    def _close(self, h: _Handle) -> None:
        with h.lock:
            if not h.closed:
                h.closed = True
                for fd in (h.fd, h.direct_fd):
                    if fd is not None and fd >= 0:
                        _quietly(os.close, fd)

    def _drop(self, source: ProcessId, key: str) -> None:
        with self._lock:
            procs = self._handles.get(source)
            h = procs.pop(key, None) if procs else None
            if procs is not None and not procs:
                del self._handles[source]
        if h is not None:
            self._close(h)

    def _sweep(self, *keys: str) -> None:
        """Close every process's handles on these paths or below them (removed or replaced)."""
        dropped = []
        with self._lock:
            self._epoch += 1
            for source in list(self._handles):
                procs = self._handles[source]
                for k in [k for k in procs if any(k == p or k.startswith(p + "/") for p in keys)]:
                    dropped.append(procs.pop(k))
                if not procs:
                    del self._handles[source]
        for h in dropped:
            self._close(h)

    def _unshare(self, loc: _Loc, vp: _VPath) -> None:
        """Give a hard-linked file in the pkg drive (installed from the build) an inode of its own,
        so a write cannot reach the build output; for a directory, every such file inside it."""
        with self._unshare_lock:     # two openers must not each make (and one lose) a copy
            try:
                st = os.lstat(loc.real)
            except OSError:
                return               # missing: the action itself reports it
            if stat.S_ISDIR(st.st_mode):
                for top, _dirs, names in os.walk(loc.real):
                    for n in names:
                        self._unshare_file(os.path.join(top, n), vp)
            else:
                self._unshare_file(loc.real, vp)

    def _unshare_file(self, real: str, vp: _VPath) -> None:
        st = os.lstat(real)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return
        tmp = os.path.join(os.path.dirname(real), f".vfs-unshare-{secrets.token_hex(8)}")
        try:
            shutil.copy2(real, tmp, follow_symlinks=False)
            os.rename(tmp, real)
        except OSError as e:
            _quietly(os.unlink, tmp)
            raise _from_os(e, vp.text, "cannot copy an installed file before writing it") from None

    @contextlib.contextmanager
    def _ino_lock(self, fd: int):
        """Held while one file is written: a lock of its own (one shared by several files would let a
        long copy into one hold up writes to another package's)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._ino_locks_guard:
            entry = self._ino_locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._ino_locks_guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._ino_locks[key]

    # ---- actions without a handle -----------------------------------------------------------------
    def _create_drive(self, source: ProcessId, has_cap, vp: _VPath) -> VfsResult:
        if source.package_id != vp.package and not _asks(has_cap, {"root": True}):
            raise _no_cap("CreateDrive", vp.text)
        if not vp.is_drive_root:
            raise _bad_request(f"CreateDrive expects /package:publisher/drive, got {vp.text}")
        loc = self._locate(vp)
        try:
            os.makedirs(loc.real, exist_ok=True)
        except OSError as e:
            raise _from_os(e, vp.text, "cannot create drive") from None
        self._locate(vp)   # re-check: nothing may have redirected it meanwhile
        return VfsResult(_OK, None, [{"kind": "read", "drive": vp.drive_text},
                                     {"kind": "write", "drive": vp.drive_text}])

    def _a_CreateDir(self, source, vp, loc, arg, data):
        try:
            os.mkdir(loc.real, 0o700)
        except OSError as e:
            raise _from_os(e, vp.text, "cannot create directory") from None
        return VfsResult(_OK)

    def _a_CreateDirAll(self, source, vp, loc, arg, data):
        try:
            os.makedirs(loc.real, 0o700, exist_ok=True)
        except OSError as e:
            raise _from_os(e, vp.text, "cannot create directory") from None
        return VfsResult(_OK)

    def _reopen(self, source, vp, loc, create: bool, truncate: bool) -> VfsResult:
        """Give the caller a fresh handle (cursor 0), replacing any it had on this path."""
        for _ in range(16):
            with self._lock:
                epoch = self._epoch
            fd = self._open_fd(loc, vp, create=create, truncate=truncate)
            if self._install(source, _Handle(fd, vp.text), epoch, replace=True) is not None:
                return VfsResult(_OK)
        raise _io_error(f"file keeps being replaced while opening it: {vp.text}", vp.text)

    def _a_CreateFile(self, source, vp, loc, arg, data):
        return self._reopen(source, vp, loc, create=True, truncate=True)

    def _a_OpenFile(self, source, vp, loc, create, data):
        return self._reopen(source, vp, loc, create=create, truncate=False)

    def _a_ReadDir(self, source, vp, loc, arg, data):
        try:
            fd = os.open(loc.real, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError as e:
            raise _from_os(e, vp.text) from None
        try:
            entries = []
            with os.scandir(fd) as it:
                for ent in it:
                    if ent.is_symlink():
                        ft = "Symlink"
                    elif ent.is_dir(follow_symlinks=False):
                        ft = "Directory"
                    elif ent.is_file(follow_symlinks=False):
                        ft = "File"
                    else:
                        ft = "Other"
                    name = ent.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                    entries.append((name, ft))
        except OSError as e:
            raise _from_os(e, vp.text) from None
        finally:
            os.close(fd)
        entries.sort()
        return VfsResult(_dumps({"ReadDir": [{"path": f"{vp.text}/{n}", "file_type": t}
                                             for n, t in entries]}))

    def _lstat(self, loc: _Loc, vp: _VPath) -> os.stat_result:
        try:
            st = os.lstat(loc.real)
        except OSError as e:
            raise _from_os(e, vp.text) from None
        if stat.S_ISLNK(st.st_mode):   # `real` is resolved: a link here was swapped in meanwhile
            raise _io_error(f"refusing to follow a symlink: {vp.text}", vp.text)
        return st

    def _a_Metadata(self, source, vp, loc, arg, data):
        st = self._lstat(loc, vp)
        m = st.st_mode
        ft = ("File" if stat.S_ISREG(m) else "Directory" if stat.S_ISDIR(m)
              else "Symlink" if stat.S_ISLNK(m) else "Other")
        # "stamp" is this host's addition (Kinode's FileMetadata has the first two fields; serde
        # ignores a field it does not know): an opaque token that changes whenever the file does,
        # so a process can tell that a file changed under it without reading it all again
        stamp = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        return VfsResult(_dumps({"Metadata": {"file_type": ft, "len": st.st_size, "stamp": stamp}}))

    def _a_Len(self, source, vp, loc, arg, data):
        st = self._lstat(loc, vp)
        if not stat.S_ISREG(st.st_mode):
            what = "is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise _io_error(f"{what}: {vp.text}", vp.text)
        return VfsResult(_dumps({"Len": st.st_size}))

    def _a_Hash(self, source, vp, loc, arg, data):
        try:
            fd = os.open(loc.real, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
        except OSError as e:
            raise _from_os(e, vp.text) from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                what = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
                raise _io_error(f"{what}: {vp.text}", vp.text)
            hasher = hashlib.sha256()   # upstream's Hash is SHA-256
            while True:
                piece = os.read(fd, HASH_PIECE)
                if not piece:
                    break
                hasher.update(piece)
        except OSError as e:
            raise _from_os(e, vp.text) from None
        finally:
            os.close(fd)
        return VfsResult(_dumps({"Hash": list(hasher.digest())}))

    def _a_AddZip(self, source, vp, loc, arg, data):
        """Unpack the zip in the blob below `vp` (created if missing), as upstream. Every entry is
        checked first, then unpacked into a staging folder inside the drive, then moved into place:
        a refused or corrupt archive leaves nothing behind."""
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            plan = _zip_plan(zf, vp)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as e:
            raise _Err({"ParseError": {"error": f"not a readable zip archive: {e}", "path": vp.text}}) from None
        # where each entry lands, every one resolved inside the drive, nothing in the way
        targets = []
        for parts, info in plan:
            tl = self._locate(_VPath(vp.package, vp.drive, vp.rest + parts))
            try:
                st = os.lstat(tl.real)
            except FileNotFoundError:
                st = None
            except OSError as e:
                raise _from_os(e, "/".join((vp.text,) + parts)) from None
            if st is not None and stat.S_ISDIR(st.st_mode) == (info is not None):
                what = "a directory" if info is not None else "a file"
                raise _io_error(f"zip entry would replace {what}: {'/'.join((vp.text,) + parts)}",
                                vp.text)
            targets.append((tl, info))
        stage = os.path.join(loc.drive, f".vfs-zip-{secrets.token_hex(8)}")
        try:
            os.mkdir(stage, 0o700)
            staged = []
            for n, (tl, info) in enumerate(targets):
                if info is None:
                    continue
                tmp = os.path.join(stage, str(n))
                with zf.open(info) as src, open(tmp, "xb") as out:
                    shutil.copyfileobj(src, out, CHUNK)   # zipfile stops at the declared size, checks the CRC
                staged.append((tmp, tl))
            os.makedirs(loc.real, 0o700, exist_ok=True)
            for tl, info in targets:
                if info is None:
                    os.makedirs(tl.real, 0o700, exist_ok=True)
            for tmp, tl in staged:
                os.makedirs(os.path.dirname(tl.real), 0o700, exist_ok=True)
                os.replace(tmp, tl.real)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise _Err({"ParseError": {"error": f"corrupt zip archive: {e}", "path": vp.text}}) from None
        except OSError as e:
            raise _from_os(e, vp.text, "cannot unpack zip") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            self._sweep(vp.text)
        return VfsResult(_OK)

    def _a_RemoveFile(self, source, vp, loc, arg, data):
        try:
            if stat.S_ISDIR(os.lstat(loc.link).st_mode):
                raise _io_error(f"is a directory (use RemoveDir): {vp.text}", vp.text)
            os.unlink(loc.link)
        except OSError as e:
            raise _from_os(e, vp.text) from None
        self._sweep(vp.text)
        return VfsResult(_OK)

    def _a_RemoveDir(self, source, vp, loc, arg, data):
        try:
            os.rmdir(loc.link)
        except OSError as e:
            raise _from_os(e, vp.text) from None
        self._sweep(vp.text)
        return VfsResult(_OK)

    def _a_RemoveDirAll(self, source, vp, loc, arg, data):
        try:
            st = os.lstat(loc.link)
            if stat.S_ISLNK(st.st_mode):
                os.unlink(loc.link)
            elif stat.S_ISDIR(st.st_mode):
                shutil.rmtree(loc.link)
            else:
                raise _io_error(f"not a directory (use RemoveFile): {vp.text}", vp.text)
        except OSError as e:
            raise _from_os(e, vp.text) from None
        finally:
            self._sweep(vp.text)
        return VfsResult(_OK)

    def _rename(self, vp: _VPath, src: _Loc, new: _VPath, dst: _Loc) -> VfsResult:
        try:
            os.lstat(src.link)
        except OSError as e:
            raise _from_os(e, vp.text) from None
        old = _hold_big_file(dst.link)
        try:
            os.rename(src.link, dst.link)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise _io_error(f"destination directory does not exist: {new.text}", new.text) from None
            raise _from_os(e, new.text, f"cannot rename {vp.text}") from None
        finally:
            self._sweep(vp.text, new.text)
            if old is not None:   # the file replaced is released (its pages and blocks freed) after the answer
                self._release(old)
        return VfsResult(_OK)

    def _release(self, fd: int) -> None:
        """Close `fd` on the releaser's thread; at once when RELEASE_PENDING are queued already (so a
        flood of renames cannot hold descriptors and disk space without bound)."""
        with self._release_lock:
            later = self._releasing < RELEASE_PENDING
            if later:
                self._releasing += 1
        if not later:
            os.close(fd)
            return

        def close() -> None:
            try:
                os.close(fd)
            finally:
                with self._release_lock:
                    self._releasing -= 1
        self._releaser.submit(close)

    def _copy(self, vp: _VPath, src: _Loc, new: _VPath, dst: _Loc) -> VfsResult:
        try:
            sfd = os.open(src.real, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
        except OSError as e:
            raise _from_os(e, vp.text) from None
        try:
            mode = os.fstat(sfd).st_mode
            if not stat.S_ISREG(mode):
                what = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
                raise _io_error(f"{what}: {vp.text}", vp.text)
            try:
                with fsutil.atomic_writer(dst.link) as dfd:
                    pos = 0
                    while True:
                        piece = os.pread(sfd, CHUNK, pos)
                        if not piece:
                            break
                        fsutil.pwrite_all(dfd, piece, pos)
                        pos += len(piece)
            except FileNotFoundError:
                raise _io_error(f"destination directory does not exist: {new.text}", new.text) from None
        except OSError as e:
            raise _from_os(e, new.text, f"cannot copy {vp.text}") from None
        finally:
            os.close(sfd)
        self._sweep(new.text)
        return VfsResult(_OK)

    # ---- actions on the caller's handle -----------------------------------------------------------
    def _a_Read(self, source, vp, loc, arg, data):
        def f(h: _Handle):
            out = _pread_to_eof(h.fd, 0)    # Kinode: the whole file, whatever the cursor, which stays
            return VfsResult(b'"Read"', out)
        return self._with_handle(source, vp, loc, f)

    def _a_ReadToEnd(self, source, vp, loc, arg, data):
        def f(h: _Handle):
            out = _pread_to_eof(h.fd, h.pos)
            h.pos += len(out)
            return VfsResult(b'"Read"', out)
        return self._with_handle(source, vp, loc, f)

    def _a_ReadExact(self, source, vp, loc, n, data):
        def f(h: _Handle):
            left = max(os.fstat(h.fd).st_size - h.pos, 0)
            if n > left:
                raise _io_error(f"unexpected end of file: {n} bytes requested at offset {h.pos}, "
                                f"{left} available: {vp.text}", vp.text)
            out = _pread_exact(h.fd, n, h.pos)
            if len(out) != n:
                raise _io_error(f"unexpected end of file: {n} bytes requested at offset {h.pos}, "
                                f"{len(out)} available: {vp.text}", vp.text)
            h.pos += n
            return VfsResult(b'"Read"', out)
        return self._with_handle(source, vp, loc, f)

    def _a_ReadToString(self, source, vp, loc, arg, data):
        def f(h: _Handle):
            out = _pread_to_eof(h.fd, h.pos)
            try:
                text = out.decode("utf-8")
            except UnicodeDecodeError:
                raise _io_error(f"file is not valid UTF-8 text: {vp.text}", vp.text) from None
            h.pos += len(out)
            return VfsResult(_dumps({"ReadToString": text}))
        return self._with_handle(source, vp, loc, f)

    def _a_Seek(self, source, vp, loc, arg, data):
        whence, n = arg

        def f(h: _Handle):
            base = 0 if whence == "Start" else h.pos if whence == "Current" else os.fstat(h.fd).st_size
            new = base + n
            if new < 0:
                raise _bad_request(f"invalid seek to a negative position ({new}): {vp.text}")
            if new > MAX_OFFSET:
                raise _bad_request(f"invalid seek past the largest file offset ({new}): {vp.text}")
            h.pos = new
            return VfsResult(_dumps({"SeekFrom": new}))
        return self._with_handle(source, vp, loc, f)

    def _a_Write(self, source, vp, loc, arg, data):
        def f(h: _Handle):
            with self._ino_lock(h.fd):
                os.ftruncate(h.fd, 0)
                try:
                    fsutil.pwrite_all(h.fd, data, 0)
                except OSError:
                    _quietly(os.ftruncate, h.fd, 0)   # all or nothing: leave an empty file
                    raise
            return VfsResult(_OK)   # Kinode writes the whole file (fs::write): no cursor moves
        return self._with_handle(source, vp, loc, f, create=True)

    def _a_WriteAll(self, source, vp, loc, arg, data):
        def write(h: _Handle, pos: int, end: int) -> None:
            with self._ino_lock(h.fd):
                old = os.fstat(h.fd).st_size
                try:
                    _write_at(h, data, pos)
                except OSError:
                    if end > old:
                        _quietly(os.ftruncate, h.fd, old)   # undo any growth
                    raise

        def behind(h: _Handle, pos: int, end: int) -> None:
            with h.lock:
                if h.closed:
                    raise OSError(errno.EBADF, "file was closed before the write")
                write(h, pos, end)

        def f(h: _Handle):
            pos, end = h.pos, h.pos + len(data)
            if end > MAX_OFFSET:
                raise _bad_request(f"write would pass the largest file offset: {vp.text}")
            if len(data) >= WRITE_BEHIND_MIN:
                with self._lock:
                    self._in_flight[source] = (self._writer.submit(behind, h, pos, end), vp.text)
            else:
                write(h, pos, end)
            h.pos = end
            return VfsResult(_OK)
        return self._with_handle(source, vp, loc, f)

    def _a_Append(self, source, vp, loc, arg, data):
        def f(h: _Handle):
            with self._ino_lock(h.fd):
                old = os.fstat(h.fd).st_size
                if old + len(data) > MAX_OFFSET:
                    raise _bad_request(f"append would pass the largest file offset: {vp.text}")
                try:
                    fsutil.pwrite_all(h.fd, data, old)
                except OSError:
                    _quietly(os.ftruncate, h.fd, old)
                    raise
            h.pos = old + len(data)
            return VfsResult(_OK)
        return self._with_handle(source, vp, loc, f)

    def _a_SetLen(self, source, vp, loc, n, data):
        if n > MAX_OFFSET:
            raise _bad_request(f"length {n} is larger than the largest file size: {vp.text}")

        def f(h: _Handle):
            with self._ino_lock(h.fd):
                os.ftruncate(h.fd, n)
            return VfsResult(_OK)
        return self._with_handle(source, vp, loc, f)

    def _a_SyncAll(self, source, vp, loc, arg, data):
        def f(h: _Handle):
            os.fsync(h.fd)
            return VfsResult(_OK)
        return self._with_handle(source, vp, loc, f)

    # ---- this host's folder actions: the path is the folder, the tree's paths are relative to it
    def _tree(self, vp: _VPath, fn, *args):
        try:
            return fn(*args)
        except vfs_tree.TreeError as e:
            where = "/".join((vp.text, e.path)) if e.path else vp.text
            raise _bad_request(f"{e}: {vp.text}") if not e.path else _io_error(str(e), where) from None
        except OSError as e:
            raise _from_os(e, vp.text) from None

    def _a_WalkDir(self, source, vp, loc, arg, data):
        depth = _int(arg.get("max_depth"), "WalkDir max_depth", 1, 4096)
        entries = _int(arg.get("max_entries"), "WalkDir max_entries", 1, 10_000_000)
        found = self._tree(vp, vfs_tree.walk, loc.link, depth, entries, loc.drive)
        # the listing rides in the blob: a body crosses into Wasm only up to 2 MiB, a blob whole
        counts = {k: len(v) for k, v in found.items()}
        return VfsResult(_dumps({"WalkDir": counts}), _dumps(found))

    def _a_ReadMany(self, source, vp, loc, arg, data):
        items = arg.get("items")
        if not isinstance(items, list):
            raise _bad_json("ReadMany expects {\"items\": [[path, offset, length, stamp]]}")
        hashes, out = self._tree(vp, vfs_tree.read_many, loc.link, items, loc.drive)
        blob = out if isinstance(out, bytes) else bytes(out)
        return VfsResult(_dumps({"ReadMany": hashes}), blob if blob else None)

    def _a_SyncTree(self, source, vp, loc, arg, data):
        # handle() has already waited for the process's write-behind: a failed one is this answer
        self._tree(vp, vfs_tree.sync_tree, loc.link, loc.drive)
        return VfsResult(_OK)

    def _a_WriteMany(self, source, vp, loc, arg, data):
        items, dirs, state = arg.get("items", []), arg.get("dirs", []), arg.get("state")
        if vp.drive == PKG_DRIVE:   # its files are hard links to the build output
            raise _bad_request(f"WriteMany cannot write the {PKG_DRIVE} drive (installed files): {vp.text}")
        if not (isinstance(items, list) and isinstance(dirs, list) and (state is None or isinstance(state, dict))):
            raise _bad_json(f"WriteMany expects {_TREE_ACTIONS['WriteMany']}")
        try:
            os.makedirs(loc.real, 0o700, exist_ok=True)
        except OSError as e:
            raise _from_os(e, vp.text, "cannot create directory") from None
        if len(data) >= WRITE_BEHIND_MIN:
            # checked and written behind, as a big WriteAll: the process's next VFS request waits
            # for it (and gets its error); the hashes are checked before any write, and the state
            # file is written last, so it never claims data not written and verified
            def behind() -> None:
                vfs_tree.write_many(loc.link, items, dirs, data, state, loc.drive)()
            with self._lock:
                self._in_flight[source] = (self._writer.submit(behind), vp.text)
        else:
            job = self._tree(vp, vfs_tree.write_many, loc.link, items, dirs, data, state, loc.drive)
            self._tree(vp, job)
        self._sweep(vp.text)   # handles on files being rewritten would see stale data
        return VfsResult(_OK)

    # ---- this host's delta actions (host/vfs/delta.py) --------------------------------------------
    def _delta_on(self, vp: _VPath, name: str) -> None:
        if not self.delta:
            raise _bad_request(f"{name}: delta transfers are turned off on this node (KINODE_DELTA=0): {vp.text}")

    def _delta_fd(self, loc: _Loc, vp: _VPath, flags: int = os.O_RDONLY) -> int:
        try:
            return vfs_delta.open_regular(loc.real, flags)
        except vfs_delta.DeltaError as e:
            raise _io_error(f"{e}: {vp.text}", vp.text) from None
        except OSError as e:
            raise _from_os(e, vp.text) from None

    def _delta(self, vp: _VPath, fn, *args):
        try:
            return fn(*args)
        except vfs_delta.DeltaError as e:
            raise _io_error(f"{e}: {vp.text}", vp.text) from None
        except OSError as e:
            raise _from_os(e, vp.text) from None

    def _writable(self, loc: _Loc, vp: _VPath, name: str, flags: int = os.O_WRONLY) -> int:
        if vp.drive == PKG_DRIVE:   # its files are hard links to the build output
            raise _bad_request(f"{name} cannot write the {PKG_DRIVE} drive (installed files): {vp.text}")
        fd = self._delta_fd(loc, vp, flags)
        try:
            if os.fstat(fd).st_nlink > 1:   # a write would reach every other name of it
                raise _io_error(f"refusing to write a file with other hard links: {vp.text}", vp.text)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _a_ChunkList(self, source, vp, loc, arg, data):
        """The file's chunk list as the blob; `avg` 0 answers only its size and stamp (a probe)."""
        self._delta_on(vp, "ChunkList")
        avg = _int(arg.get("avg"), "ChunkList avg", 0, vfs_delta.MAX_AVG)
        whole = arg.get("whole", True) is not False
        fd = self._delta_fd(loc, vp)
        try:
            if avg == 0:
                st = os.fstat(fd)
                if arg.get("forget") is True:   # a download built from what is kept failed its check
                    vfs_delta.forget(vfs_delta.stamp_of(st))
                return VfsResult(_dumps({"ChunkList": {"size": st.st_size, "stamp": vfs_delta.stamp_of(st)}}))
            records, digest, stamp, size = self._delta(vp, vfs_delta.chunk_list, fd, avg, whole)
        finally:
            os.close(fd)
        body = {"ChunkList": {"count": len(records) // vfs_delta.RECORD.size, "size": size, "stamp": stamp,
                              "blake3": digest}}
        return VfsResult(_dumps(body), records)

    def _chunk_and_copy(self, source, has_cap, vp: _VPath, arg) -> VfsResult:
        """ChunkList with copy_to (read capability on `vp`, write on copy_to): the old copy chunked, its
        bytes copied meanwhile into the new partial at the same offsets."""
        self._delta_on(vp, "ChunkList")
        if not isinstance(arg["copy_to"], str) or ("whole" in arg and arg["whole"] is not False):
            raise _bad_json(f"ChunkList with copy_to expects {_DELTA_ACTIONS['ChunkList']}, without the whole hash")
        avg = _int(arg.get("avg"), "ChunkList avg", 1, vfs_delta.MAX_AVG)
        limit = _int(arg.get("copy_size"), "ChunkList copy_size", 0, vfs_delta.MAX_FILE)
        dst_vp = _parse_path(arg["copy_to"])
        self._check_cap(source, has_cap, vp, "read", "ChunkList")
        self._check_cap(source, has_cap, dst_vp, "write", "ChunkList")
        fd = self._delta_fd(self._locate(vp), vp)
        try:
            dst = self._writable(self._locate(dst_vp), dst_vp, "ChunkList")
            try:
                if os.path.samestat(os.fstat(fd), os.fstat(dst)):
                    raise _bad_request(f"ChunkList cannot copy a file into itself: {dst_vp.text}")
                with self._ino_lock(dst):
                    records, stamp, size, copied = self._delta(vp, vfs_delta.chunk_and_copy, fd, avg, dst, limit)
            finally:
                os.close(dst)
        finally:
            os.close(fd)
        body = {"ChunkList": {"count": len(records) // vfs_delta.RECORD.size, "size": size, "stamp": stamp,
                              "blake3": None, "copied": copied}}
        return VfsResult(_dumps(body), records)

    def _a_Blake3(self, source, vp, loc, arg, data):
        self._delta_on(vp, "Blake3")
        fd = self._delta_fd(loc, vp)
        try:
            stamp = arg.get("stamp")
            if stamp is not None and not isinstance(stamp, str):
                raise _bad_json(f"Blake3 expects {_DELTA_ACTIONS['Blake3']}")
            return VfsResult(_dumps({"Blake3": self._delta(vp, vfs_delta.blake3_file, fd, arg.get("sync") is True,
                                                           stamp)}))
        finally:
            os.close(fd)

    def _a_WriteRanges(self, source, vp, loc, arg, data):
        self._delta_on(vp, "WriteRanges")
        items = arg.get("items")
        if not isinstance(items, list):
            raise _bad_json(f"WriteRanges expects {_DELTA_ACTIONS['WriteRanges']}")
        size = _int(arg.get("size"), "WriteRanges size", 0, vfs_delta.MAX_FILE)
        fd = self._writable(loc, vp, "WriteRanges")
        try:
            with self._ino_lock(fd):
                self._delta(vp, vfs_delta.write_ranges, fd, items, data, size)
        finally:
            os.close(fd)
        return VfsResult(_OK)

    def _copy_ranges(self, source, has_cap, vp: _VPath, arg) -> VfsResult:
        """Ranges of `from` (read capability) into `vp` (write capability)."""
        self._delta_on(vp, "CopyRanges")
        if not isinstance(arg.get("from"), str) or not isinstance(arg.get("stamp"), str) \
                or not isinstance(arg.get("items"), list):
            raise _bad_json(f"CopyRanges expects {_DELTA_ACTIONS['CopyRanges']}")
        size = _int(arg.get("size"), "CopyRanges size", 0, vfs_delta.MAX_FILE)
        src_vp = _parse_path(arg["from"])
        self._check_cap(source, has_cap, vp, "write", "CopyRanges")
        self._check_cap(source, has_cap, src_vp, "read", "CopyRanges")
        whole = arg.get("whole") is True
        if whole:   # it answers the new file's hash: a read of it
            self._check_cap(source, has_cap, vp, "read", "CopyRanges")
        src = self._delta_fd(self._locate(src_vp), src_vp)
        try:
            dst = self._writable(self._locate(vp), vp, "CopyRanges", os.O_RDWR if whole else os.O_WRONLY)
            try:
                with self._ino_lock(dst):
                    if whole:   # the rest is written: copy, hash the whole in order, sync
                        in_place = _int(arg.get("in_place", 0), "CopyRanges in_place", 0, vfs_delta.MAX_FILE)
                        digest = self._delta(vp, vfs_delta.build_file, src, dst, arg["items"], arg["stamp"], size,
                                             in_place)
                        return VfsResult(_dumps({"Blake3": digest}))
                    self._delta(vp, vfs_delta.copy_ranges, src, dst, arg["items"], arg["stamp"], size)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return VfsResult(_OK)


RELEASE_LATER = 64 << 20   # a file at least this big, replaced by a rename, is freed after the answer
RELEASE_PENDING = 4        # such files queued to be freed, at most; beyond, one is freed before the answer


def _hold_big_file(link: str) -> int | None:
    """An open descriptor of the big regular file at `link` (about to be replaced by a rename), or
    None: freeing a big file's cached pages and blocks takes a while, which the rename's caller need
    not wait for; the last close does it."""
    try:
        fd = os.open(link, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size < RELEASE_LATER or st.st_nlink != 1:
        os.close(fd)
        return None
    return fd


def _asks(has_cap, params: dict) -> bool:
    try:
        return bool(has_cap(params))
    except Exception:                            # noqa: BLE001 - a failing check is a refusal
        return False


def _zip_plan(zf: zipfile.ZipFile, vp: _VPath) -> list:
    """Check every entry of an archive before anything is written: -> [(parts, ZipInfo or None)]
    (None for a directory). Refuses absolute, `..`, backslash and NUL names, encrypted entries, a
    file and a directory of one name, and archives over MAX_ZIP_ENTRIES or MAX_ZIP_BYTES."""
    infos = zf.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise _bad_request(f"zip has {len(infos)} entries, more than {MAX_ZIP_ENTRIES}: {vp.text}")
    total = sum(i.file_size for i in infos)
    if total > MAX_ZIP_BYTES:
        raise _bad_request(f"zip would unpack to {total} bytes, more than {MAX_ZIP_BYTES}: {vp.text}")
    plan: list = []
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    for info in infos:
        name = info.filename
        shown = name if len(name) <= 200 else name[:200] + "..."
        problem = vfs_path_problem(name, relative=True)
        if problem:
            raise _bad_request(f"zip entry {problem}: {shown!r}")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if len("/".join(vp.rest + parts).encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
            raise _bad_request(f"zip entry path is too long: {shown!r}")
        if info.flag_bits & 0x1:
            raise _bad_request(f"zip entry is encrypted: {shown!r}")
        if not parts:
            continue
        is_dir = info.is_dir()
        for i in range(1, len(parts)):
            dirs.add(parts[:i])
        (dirs if is_dir else files).add(parts)
        plan.append((parts, None if is_dir else info))
    clash = files & dirs
    if clash:
        raise _bad_request(f"zip names {'/'.join(min(clash))!r} both as a file and a directory")
    if len(files) != sum(1 for _, i in plan if i is not None):
        raise _bad_request("zip names a file twice")
    return plan


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass
