"""The node's terminal: output from processes and the node, and the command lines users type.

A line is run like Kinode's terminal: `script:package:publisher rest of line` starts that script
of that package and sends it the rest of the line. A few built-in commands help run the node
(`help` lists them). The same lines can be sent from another shell through the node's control
socket (`python -m host run ...`), which streams the output back.
"""
from __future__ import annotations

import json
import queue
import re
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional, TextIO

from host.types import Address, ParseError, ProcessId

if TYPE_CHECKING:
    from host.node import Node

HELP = """\
Commands:
  SCRIPT:PACKAGE:PUBLISHER ARGS   run a package's terminal script, e.g.
                                  list_files:file_transfer:template.os fake2.dev
                                  download:file_transfer:template.os my_file.txt fake2.dev
  m ADDRESS BODY                  send BODY (text, e.g. JSON) as a request to ADDRESS
                                  (NODE@PROCESS:PACKAGE:PUBLISHER)
  ps                              list running processes
  kill PROCESS:PACKAGE:PUBLISHER  stop a process
  caps PROCESS:PACKAGE:PUBLISHER  list the capabilities a process holds
  scripts                         list the scripts of installed packages
  verbosity N                     show process output up to verbosity N (default 0)
  id                              this node's entry for other nodes' peers files (JSON)
  peers                           re-read the peers file now and list its entries
  help                            this text
  exit                            stop the node"""

# C0/C1 control characters other than tab: printed escaped so a peer's text cannot drive the terminal
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def sanitize(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


OUTPUT_BACKLOG = 10_000  # lines waiting for a slow stdout before older output is dropped


class Terminal:
    def __init__(self, out: TextIO = sys.stdout):
        self.out = out
        self.verbosity = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        # stdout is written by its own thread: a reader that stops reading (a full pipe) must
        # never stall the processes that print
        self._pending: "queue.Queue[str]" = queue.Queue(OUTPUT_BACKLOG)
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

    # ---- input -------------------------------------------------------------------------------
    def run_line(self, node: "Node", line: str) -> Optional[ProcessId]:
        """Run one command line; returns the pid of a started script, if any."""
        line = line.strip()
        if not line:
            return None
        head, _, rest = line.partition(" ")
        rest = rest.strip()
        try:
            if head == "help":
                self.info(HELP)
            elif head == "exit":
                node.request_stop()
            elif head == "ps":
                self.info(node.describe_processes())
            elif head == "scripts":
                self.info("\n".join(node.list_scripts()) or "no scripts installed")
            elif head == "verbosity":
                self.verbosity = int(rest)
                self.info(f"verbosity is now {self.verbosity}")
            elif head in ("id", "peers"):
                if node.net is None:
                    raise ValueError("networking is off on this node")
                self.info(json.dumps(node.net.entry()) if head == "id" else node.net.directory.reload_peers())
            elif head == "caps":
                self.info(node.describe_capabilities(ProcessId.parse(rest)))
            elif head == "kill":
                pid = ProcessId.parse(rest)
                self.info(f"stopping {pid}" if node.kernel.kill(pid) else f"no process {pid}")
            elif head == "m":
                target, _, body = rest.partition(" ")
                node.send_message(Address.parse(target), body.strip())
            elif head.count(":") == 2:
                return node.run_script(ProcessId.parse(head), rest)
            else:
                self.error(f"unknown command {head!r}; type `help` for the list")
        except (ParseError, ValueError) as e:
            self.error(str(e))
        except Exception as e:  # a command must never take the node down
            self.error(f"{head}: {e}")
        return None
