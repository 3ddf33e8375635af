"""Tests only: hold a provider mid-transfer, however fast the machine (KINODE_TEST_PAUSE_AFTER_CHUNKS).

With the setting at N > 0, each process's read of a file's bytes (a `ReadExact` or a `ReadMany`
outside the `.partial` folders, i.e. a provider worker's chunk or batch) is counted, and the one after
its Nth waits until the file `test-pause-release` exists in the node's home. The node prints
"test pause: PROCESS holds before read N+1 of PATH" when it starts to wait, so a test acts on that
line (kills, freezes, changes the file), then releases. A process pauses at most once; a release
file present beforehand lets every read through. The setting is 0 (off) in a normal run.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from host.messages import ProcessId

RELEASE_FILE = "test-pause-release"
COUNTED = frozenset({"ReadExact", "ReadMany"})


class TestPause:
    def __init__(self, after: int, home: Path, say: Callable[[str], None]):
        self.after = after
        self.release = home / RELEASE_FILE
        self.say = say
        self.counts: dict[ProcessId, int] = {}
        self.lock = threading.Lock()

    def before(self, source: ProcessId, body: bytes) -> None:
        """Called on the requesting process's thread before the VFS handles `body`: may wait."""
        try:
            req = json.loads(body)
            path, action = req["path"], req["action"]
        except (ValueError, KeyError, TypeError):
            return
        name = next(iter(action)) if isinstance(action, dict) and action else action
        if name not in COUNTED or not isinstance(path, str) or "/.partial/" in path:
            return
        with self.lock:
            n = self.counts.get(source, 0)
            if n > self.after:
                return
            self.counts[source] = n + 1
        if n != self.after or self.release.exists():
            return
        self.say(f"test pause: {source} holds before read {n + 1} of {path}")
        while not self.release.exists():
            time.sleep(0.02)
        self.say(f"test pause: {source} released")


class TestLie:
    """Tests only (KINODE_TEST_LIE_AFTER_READS=N): each process's counted read after its Nth (see
    TestPause) comes back with one byte flipped, as a provider that lies about its data would send it.
    The node prints "test lie: PROCESS flipped a byte of read N+1 of PATH"."""

    def __init__(self, after: int, say: Callable[[str], None]):
        self.after = after
        self.say = say
        self.counts: dict[ProcessId, int] = {}
        self.lock = threading.Lock()

    def corrupt(self, source: ProcessId, body: bytes, blob: bytes | None) -> bytes | None:
        try:
            req = json.loads(body)
            path, action = req["path"], req["action"]
        except (ValueError, KeyError, TypeError):
            return blob
        name = next(iter(action)) if isinstance(action, dict) and action else action
        if name not in COUNTED or not isinstance(path, str) or "/.partial/" in path or not blob:
            return blob
        with self.lock:
            n = self.counts.get(source, 0)
            self.counts[source] = n + 1
        if n != self.after:
            return blob
        self.say(f"test lie: {source} flipped a byte of read {n + 1} of {path}")
        mid = len(blob) // 2
        return blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1:]
