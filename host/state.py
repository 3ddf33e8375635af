"""Processes' get/set/clear-state: one file per process under HOME/state, written atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from host.types import ProcessId


class StateStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, pid: ProcessId) -> Path:
        return self.root / quote(str(pid), safe="")

    def get(self, pid: ProcessId) -> Optional[bytes]:
        try:
            return self._path(pid).read_bytes()
        except FileNotFoundError:
            return None

    def set(self, pid: ProcessId, data: bytes) -> None:
        path = self._path(pid)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def clear(self, pid: ProcessId) -> None:
        self._path(pid).unlink(missing_ok=True)
