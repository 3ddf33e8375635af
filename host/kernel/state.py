"""Processes' get/set/clear-state: one file per process under HOME/state, written atomically."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from host import fsutil
from host.messages import ProcessId


class StateStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, pid: ProcessId) -> Path:
        return self.root / quote(str(pid), safe="")

    def get(self, pid: ProcessId) -> bytes | None:
        try:
            return self._path(pid).read_bytes()
        except FileNotFoundError:
            return None

    def set(self, pid: ProcessId, data: bytes) -> None:
        fsutil.write_atomic(self._path(pid), data, fsync=True)

    def clear(self, pid: ProcessId) -> None:
        self._path(pid).unlink(missing_ok=True)
