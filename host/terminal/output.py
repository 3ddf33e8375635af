"""The node's terminal output: process output, the node's messages and errors, each line escaped
and written to stdout by its own thread, and copied to subscribers (the control socket)."""
from __future__ import annotations

import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from host.messages import ProcessId

# C0/C1 control characters other than tab: printed escaped so a peer's text cannot drive the terminal
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def sanitize(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


OUTPUT_BACKLOG = 10_000  # lines waiting for a slow stdout before older output is dropped


class TerminalOutput:
    def __init__(self, out: TextIO = sys.stdout):
        self.out = out
        self.verbosity = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        # stdout is written by its own thread: a reader that stops reading (a full pipe) must
        # never stall the processes that print
        self._pending: queue.Queue[str] = queue.Queue(OUTPUT_BACKLOG)
        self._dropped = 0
        threading.Thread(target=self._write_out, name="terminal-out", daemon=True).start()

    # ---- output ------------------------------------------------------------------------------
    def emit(self, line: str) -> None:
        try:
            self._pending.put_nowait(line)
        except queue.Full:
            self._dropped += 1
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            fn(line)  # listeners queue the line themselves; they never block

    def _write_out(self) -> None:
        while True:
            line = self._pending.get()
            if self._dropped:
                line = f"({self._dropped} lines of output were dropped: stdout was not being read)\n{line}"
                self._dropped = 0
            try:
                self.out.write(line + "\n")
                self.out.flush()
            except (OSError, ValueError):
                pass  # stdout gone (closed pipe): keep running for the control socket

    def flush(self, timeout: float = 2.0) -> None:
        """Wait (briefly) until queued output has been written, e.g. before the node exits."""
        deadline = time.monotonic() + timeout
        while not self._pending.empty() and time.monotonic() < deadline:
            time.sleep(0.01)

    def process_output(self, pid: ProcessId, text: str, verbosity: int = 0) -> None:
        if verbosity > self.verbosity:
            return
        prefix = f"{pid.package_name}:{pid.publisher_node}"
        for line in text.split("\n"):
            self.emit(f"{prefix}: {sanitize(line)}")

    def info(self, text: str) -> None:
        for line in text.split("\n"):
            self.emit(sanitize(line))

    def error(self, text: str) -> None:
        self.emit(f"error: {sanitize(text)}")

    def subscribe(self, fn: Callable[[str], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._listeners:
                    self._listeners.remove(fn)
        return unsubscribe
