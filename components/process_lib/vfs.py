"""VFS helpers: requests to `vfs:distro:sys`, as Rust's `kinode_process_lib::vfs`.

Paths are `/package:publisher/drive/rest`. Every call waits for the VFS's answer and raises
VfsError with the VFS's explanation on failure. File data rides in blobs: `read*` return bytes;
`read_at_to_blob` and `write_all_current_blob` move a chunk without its bytes entering the guest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from process_lib.core import (
    Address,
    PackageId,
    ProcessId,
    Request,
    current_blob_hash_chained,
    current_blob_len,
    get_blob,
)

VFS = ProcessId("vfs", "distro", "sys")
_BLAKE3_EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
DEFAULT_TIMEOUT = 30


class VfsError(Exception):
    """A failed VFS call; `kind` is upstream's VfsError variant ("IOError", "NoCap", ...) when the
    VFS answered with one, `detail` its fields."""

    def __init__(self, message: str, kind: str | None = None, detail: dict | None = None):
        super().__init__(message)
        self.kind = kind
        self.detail = detail or {}


# upstream's FileType variants
FILE, DIRECTORY, SYMLINK, OTHER = "File", "Directory", "Symlink", "Other"


@dataclass
class FileMetadata:
    file_type: str
    len: int
    stamp: str | None = None  # this host's VFS: changes whenever the file does


@dataclass
class DirEntry:
    path: str
    file_type: str


def _error(path: str, err: Any) -> VfsError:
    """Upstream's VfsError (serde's externally tagged struct variants) as a VfsError exception."""
    if isinstance(err, dict) and len(err) == 1:
        (kind, detail), = err.items()
        if isinstance(detail, dict):
            text = str(detail.get("error") or "")
            where = str(detail.get("path") or "")
            if kind == "NoCap":
                text = f"no capability for {detail.get('action')} on {where}"
            elif kind == "BadBytes":
                text = f"{detail.get('action')} needs a blob of bytes"
            elif kind == "NotFound":
                text = "not found"
            elif where and where not in text:
                text = f"{text} ({where})"
            return VfsError(f"{path}: {kind}: {text}", kind, detail)
        return VfsError(f"{path}: {kind}: {detail}", kind)
    return VfsError(f"{path}: {err!r}")


def vfs_request(path: str, action: Any, blob: bytes | None = None, forward_blob: bool = False,
                timeout: int = DEFAULT_TIMEOUT) -> Any:
    """Send one VFS action; return the parsed response body (raising VfsError on Err)."""
    # as Rust's process_lib: to the node alias "our", which the kernel reads as this node
    req = (Request.to(Address("our", VFS)).body({"path": path, "action": action})
           .expects_response(timeout))
    if forward_blob:
        req.forward_current_blob()
    elif blob is not None:
        req.blob_bytes(blob)
    msg = req.send_and_await_response()
    try:
        answer = msg.json()
    except ValueError:
        raise VfsError(f"vfs sent a malformed answer: {msg.body[:100]!r}") from None
    if isinstance(answer, dict) and "Err" in answer:
        raise _error(path, answer["Err"])
    return answer


def create_drive(package_id: PackageId, drive: str, timeout: int = DEFAULT_TIMEOUT) -> str:
    path = f"/{package_id}/{drive}"
    vfs_request(path, "CreateDrive", timeout=timeout)
    return path


def metadata(path: str, timeout: int = DEFAULT_TIMEOUT) -> FileMetadata:
    m = vfs_request(path, "Metadata", timeout=timeout)["Metadata"]
    return FileMetadata(m["file_type"], m["len"], m.get("stamp"))


def remove_file(path: str) -> None:
    vfs_request(path, "RemoveFile")


def rename(path: str, new_path: str) -> None:
    vfs_request(path, {"Rename": {"new_path": new_path}})


class Directory:
    def __init__(self, path: str, timeout: int = DEFAULT_TIMEOUT):
        self.path = path
        self.timeout = timeout

    def read(self) -> list[DirEntry]:
        entries = vfs_request(self.path, "ReadDir", timeout=self.timeout)["ReadDir"]
        return [DirEntry(e["path"], e["file_type"]) for e in entries]


def open_dir(path: str, create: bool = False, timeout: int = DEFAULT_TIMEOUT) -> Directory:
    if create:
        vfs_request(path, "CreateDirAll", timeout=timeout)
    else:
        m = metadata(path, timeout)
        if m.file_type != DIRECTORY:
            raise VfsError(f"{path} is not a directory")
    return Directory(path, timeout)


class File:
    """An open file with its own cursor (each opener has its own in this host's VFS)."""

    def __init__(self, path: str, timeout: int = DEFAULT_TIMEOUT):
        self.path = path
        self.timeout = timeout

    def _do(self, action: Any, blob: bytes | None = None, forward: bool = False) -> Any:
        return vfs_request(self.path, action, blob, forward, self.timeout)

    def read(self) -> bytes:
        """The whole file."""
        self._do("Read")
        b = get_blob()
        return b.bytes if b else b""

    def read_at(self, length: int) -> bytes:
        """Up to `length` bytes at the cursor; advances it."""
        self._do({"ReadExact": length})
        b = get_blob()
        return b.bytes if b else b""

    def read_at_to_blob(self, length: int) -> int:
        """Read `length` bytes at the cursor into the current blob (kept in the host); returns its
        length. Forward it with `Request.forward_current_blob()`."""
        self._do({"ReadExact": length})
        return current_blob_len() or 0

    def read_to_end(self) -> bytes:
        self._do("ReadToEnd")
        b = get_blob()
        return b.bytes if b else b""

    def read_to_string(self) -> str:
        return self._do("ReadToString")["ReadToString"]

    def write(self, data: bytes) -> None:
        """Replace the whole file with `data`."""
        self._do("Write", data)

    def write_all(self, data: bytes) -> None:
        """Write at the cursor."""
        self._do("WriteAll", data)

    def write_all_current_blob(self) -> None:
        """Write the current blob at the cursor without its bytes entering the guest."""
        self._do("WriteAll", forward=True)

    def append(self, data: bytes) -> None:
        self._do("Append", data)

    def seek(self, offset: int, whence: str = "Start") -> int:
        return self._do({"Seek": {"seek_from": {whence: offset}}})["SeekFrom"]

    def set_len(self, length: int) -> None:
        self._do({"SetLen": length})

    def sync_all(self) -> None:
        self._do("SyncAll")

    def metadata(self) -> FileMetadata:
        return metadata(self.path, self.timeout)

    def hash(self) -> bytes:
        """SHA-256 of the whole file (the VFS's `Hash`, as upstream)."""
        return bytes(self._do("Hash")["Hash"])

    def blake3(self, piece: int = 4 << 20) -> str:
        """Hex BLAKE3 of the whole file, hashed by the host piece by piece as it is read (this
        host's blobs extension; the bytes never enter the guest). Leaves the cursor where it was."""
        pos = self.seek(0, "Current")
        size = self.metadata().len
        self.seek(0)
        digest = _BLAKE3_EMPTY
        try:
            for offset in range(0, size, piece):
                self.read_at_to_blob(min(piece, size - offset))
                chained = current_blob_hash_chained(offset == 0)
                assert chained is not None   # the read just set a blob
                digest = chained
        finally:
            self.seek(pos)
        return digest

    def close(self) -> None:
        self._do("CloseFile")


def open_file(path: str, create: bool = False, timeout: int = DEFAULT_TIMEOUT) -> File:
    vfs_request(path, {"OpenFile": {"create": create}}, timeout=timeout)
    return File(path, timeout)


def create_file(path: str, timeout: int = DEFAULT_TIMEOUT) -> File:
    """Create (or truncate) a file and open it."""
    vfs_request(path, "CreateFile", timeout=timeout)
    return File(path, timeout)


__all__ = ["VfsError", "FileMetadata", "DirEntry", "Directory", "File", "create_drive", "open_dir",
           "open_file", "create_file", "metadata", "remove_file", "rename", "vfs_request", "json"]
