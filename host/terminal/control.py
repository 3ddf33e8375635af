"""The control socket: another shell runs one terminal command on a running node (`python -m host run`).

HOME/node.sock (mode 0600) speaks JSON Lines, one object per line:
    client -> node   {"run": LINE, "linger": S, "until": REGEX or null, "timeout": S}
    node -> client   {"type": "line", "text": TEXT}   for each line of terminal output, then
                     {"type": "end", "status": 0 or 1, "reason": TEXT}   and the node closes.
The node watches the command until its script has ended plus `linger` seconds, or, with `until`,
until an output line matches; at most `timeout` seconds. Status 1 when the terminal rejects the line
(unknown command, bad id, no such script), the script ends abnormally (a trap, an exception, a kill),
the script's package prints an `error:` line meanwhile (a Kinode script reports failure by printing,
as process_lib's `script()` does), `until` never matches, or the script outlives `timeout`.
"""
from __future__ import annotations

import json
import logging
import queue
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TextIO

from host.messages import ProcessId

log = logging.getLogger("host.terminal.control")

SOCKET_NAME = "node.sock"
MAX_REQUEST = 65536        # bytes of the one request frame
REQUEST_WAIT = 10.0        # seconds a client has to send its request
SEND_WAIT = 10.0           # a client that takes no output for this long is cut off
MAX_CLIENTS = 256          # commands watched at once (a shell loop of downloads); more are refused
OUTPUT_BACKLOG = 10_000    # lines queued for one client before it counts as not reading
END_GRACE = 10.0           # the client's margin over `timeout` for the node's end frame

OK, FAILED, NO_NODE = 0, 1, 2


class CommandHost(Protocol):
    """What the control socket needs from a node."""

    def run_command(self, line: str) -> ProcessId | None:
        """Run a terminal line; the id of the script it started, if any."""

    def subscribe_output(self, fn: Callable[[str], None]) -> Callable[[], None]:
        """Call `fn` (from any thread, must not block) with each output line; returns unsubscribe."""

    def watch_exits(self, fn: Callable[[ProcessId, str], None]) -> Callable[[], None]:
        """Call `fn(pid, reason)` when a process ends; returns the call that stops it."""

    def is_running(self, pid: ProcessId) -> bool: ...

    def stopping(self) -> bool: ...


class NodeCommands:
    """`CommandHost` over a `host.node.Node`: its terminal runs lines, its kernel reports exits."""

    def __init__(self, node: Any):
        self.node = node

    def run_command(self, line: str) -> ProcessId | None:
        return self.node.run_line(line)

    def subscribe_output(self, fn: Callable[[str], None]) -> Callable[[], None]:
        return self.node.terminal.subscribe(fn)

    def watch_exits(self, fn: Callable[[ProcessId, str], None]) -> Callable[[], None]:
        kernel = self.node.kernel
        kernel.on_exit_listener(fn)
        return lambda: kernel.remove_exit_listener(fn)

    def is_running(self, pid: ProcessId) -> bool:
        return pid in self.node.kernel.processes

    def stopping(self) -> bool:
        return self.node.stopping()


# ---- frames ---------------------------------------------------------------------------------------
class BadFrame(ValueError):
    pass


def encode(frame: dict) -> bytes:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def decode(raw: bytes) -> dict:
    try:
        frame = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadFrame(f"not a JSON line ({e})") from None
    if not isinstance(frame, dict):
        raise BadFrame("a frame must be a JSON object")
    return frame


@dataclass(frozen=True)
class Request:
    line: str
    linger: float = 1.0
    until: re.Pattern | None = None
    timeout: float = 60.0

    @classmethod
    def parse(cls, frame: dict) -> Request:
        line = frame.get("run")
        if not isinstance(line, str):
            raise BadFrame('"run" must be the command line, a string')
        numbers = {}
        for key, default in (("linger", 1.0), ("timeout", 60.0)):
            value = frame.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 86400:
                raise BadFrame(f'"{key}" must be a number of seconds (0 to 86400)')
            numbers[key] = float(value)
        until = frame.get("until")
        if until is not None:
            if not isinstance(until, str):
                raise BadFrame('"until" must be a regular expression or null')
            try:
                until = re.compile(until)
            except re.error as e:
                raise BadFrame(f'"until" is not a regular expression: {e}') from None
        return cls(line, numbers["linger"], until, numbers["timeout"])


# ---- the node's side ------------------------------------------------------------------------------
class ControlServer:
    """Listens on HOME/node.sock; a thread per client, each watching one command."""

    def __init__(self, home: Path, host: CommandHost):
        self.path = Path(home) / SOCKET_NAME
        self.host = host
        self._sock: socket.socket | None = None
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        self.path.chmod(0o600)
        sock.listen(16)
        self._sock = sock
        threading.Thread(target=self._accept_loop, args=(sock,), name="control", daemon=True).start()

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)

    def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed by stop()
            if not self._clients.acquire(blocking=False):
                _send_quietly(conn, {"type": "end", "status": FAILED,
                                     "reason": f"the node is already running {MAX_CLIENTS} control commands"})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(REQUEST_WAIT)
                try:
                    request = Request.parse(decode(_read_line(conn)))
                except BadFrame as e:
                    _send_quietly(conn, {"type": "end", "status": FAILED, "reason": f"malformed request: {e}"})
                    _drain(conn)
                    return
                except OSError:
                    return  # the client left, or sent nothing in time
                conn.settimeout(SEND_WAIT)
                _Watch(self.host, conn, request).run()
        except Exception:  # one client's trouble must never reach the node
            log.exception("control client failed")
        finally:
            self._clients.release()


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        if len(data) > MAX_REQUEST:
            raise BadFrame(f"request longer than {MAX_REQUEST} bytes")
        chunk = conn.recv(4096)
        if not chunk:
            if data:
                raise BadFrame("the request ended without a newline")
            raise ConnectionResetError("client left")
        data += chunk
    return data.split(b"\n", 1)[0]


def _send_quietly(conn: socket.socket, frame: dict) -> None:
    try:
        conn.sendall(encode(frame))
    except OSError:
        pass


def _drain(conn: socket.socket) -> None:
    """Read what the client still sends (briefly), so closing does not reset the connection before
    it has read our answer."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        for _ in range(64):
            if not conn.recv(65536):
                return
    except OSError:
        pass


def _client_gone(conn: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _Watch:
    """One command: run it, stream its output, decide its status."""

    def __init__(self, host: CommandHost, conn: socket.socket, request: Request):
        self.host, self.conn, self.request = host, conn, request
        self.events: queue.Queue[tuple] = queue.Queue(OUTPUT_BACKLOG)
        self.overflow = False
        self.thread = threading.get_ident()
        self.running_line = False  # the terminal is running our line on our thread
        self.script: ProcessId | None = None
        self.script_errors = ""
        self.done_at: float | None = None
        self.failures: list[str] = []
        self.matched = False

    def _on_line(self, text: str) -> None:  # any thread: never blocks
        rejected = self.running_line and threading.get_ident() == self.thread and text.startswith("error: ")
        self._put(("line", text, rejected))

    def _on_exit(self, pid: ProcessId, reason: str) -> None:
        self._put(("exit", pid, reason))

    def _put(self, event: tuple) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:
            self.overflow = True

    def run(self) -> None:
        unsubscribe = self.host.subscribe_output(self._on_line)
        unwatch = self.host.watch_exits(self._on_exit)
        try:
            self.running_line = True
            try:
                self.script = self.host.run_command(self.request.line)
            except Exception as e:  # the terminal reports its own errors; this is a bug, not the client's
                log.exception("control command %r failed", self.request.line)
                self.failures.append(f"the node failed to run the command: {e}")
            finally:
                self.running_line = False
            if self.script is None or not self.host.is_running(self.script):
                self.done_at = time.monotonic()
            if self.script is not None:
                self.script_errors = f"{self.script.package_name}:{self.script.publisher_node}: error: "
            if self._watch():
                _send_quietly(self.conn, self._end())
        finally:
            unsubscribe()
            unwatch()

    def _watch(self) -> bool:
        """Stream events until the command is over; False if the client is gone."""
        deadline = time.monotonic() + self.request.timeout
        while not self.matched:
            now = time.monotonic()
            end = deadline
            if self.request.until is None and self.done_at is not None:
                end = min(deadline, self.done_at + self.request.linger)
            if now >= end or self.host.stopping():
                break
            try:
                event = self.events.get(timeout=min(end - now, 0.25))
            except queue.Empty:
                if self.overflow or _client_gone(self.conn):
                    return False
                continue
            if not self._handle(event):
                return False
        while not self.matched:  # what was already printed still belongs to the command
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            if not self._handle(event):
                return False
        if self.overflow:
            return False  # the client stopped reading: cut off
        return True

    def _handle(self, event: tuple) -> bool:
        if event[0] == "exit":
            _, pid, reason = event
            if pid == self.script:
                self.done_at = self.done_at or time.monotonic()
                if reason != "returned":
                    self.failures.append(f"{pid} {reason}")
            return True
        _, text, rejected = event
        try:
            self.conn.sendall(encode({"type": "line", "text": text}))
        except OSError:
            return False  # the client left or stopped reading
        if rejected:
            self.failures.append("the terminal rejected the command")
        elif self.script_errors and text.startswith(self.script_errors):
            self.failures.append("the script reported an error")
        if self.request.until is not None and self.request.until.search(text):
            self.matched = True
        return True

    def _end(self) -> dict:
        failures = list(dict.fromkeys(self.failures))
        if self.request.until is not None and not self.matched and not self.host.stopping():
            failures.append(f"no output line matched {self.request.until.pattern!r} in {self.request.timeout:g} s")
        elif self.request.until is None and self.done_at is None and not self.host.stopping():
            failures.append(f"{self.script} still running after {self.request.timeout:g} s")
        return {"type": "end", "status": FAILED if failures else OK, "reason": "; ".join(failures) or "ok"}


# ---- the client's side ----------------------------------------------------------------------------
class Outcome(NamedTuple):
    status: int        # OK, FAILED or NO_NODE
    lines: list[str]
    reason: str


def run_command(home: Path, command: str, wait: float = 1.0, until: str | None = None,
                timeout: float = 60.0, out: TextIO | None = None) -> Outcome:
    """Run `command` on the node whose home is `home`; collect (and print to `out`) its output."""
    path = Path(home) / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return Outcome(NO_NODE, [], f"no node is running with home {home} (no control socket at {path})")
    lines: list[str] = []
    with sock:
        sock.settimeout(timeout + END_GRACE)
        try:
            try:
                sock.sendall(encode({"run": command, "linger": wait, "until": until, "timeout": timeout}))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the node refused us at once: its end frame says why
            reader = sock.makefile("rb")
            for raw in reader:
                frame = decode(raw)
                if frame.get("type") == "line" and isinstance(frame.get("text"), str):
                    lines.append(frame["text"])
                    if out is not None:
                        print(frame["text"], file=out, flush=True)
                elif frame.get("type") == "end" and frame.get("status") in (OK, FAILED):
                    return Outcome(frame["status"], lines, str(frame.get("reason", "")))
                else:
                    raise BadFrame(f"unexpected frame {raw[:80]!r}")
            return Outcome(FAILED, lines, "the node closed the connection before the command ended")
        except TimeoutError:
            return Outcome(FAILED, lines, f"the node did not end the command within {timeout + END_GRACE:g} s")
        except (OSError, BadFrame) as e:
            return Outcome(FAILED, lines, f"control connection failed: {e}")


def run_remote(home: Path, command: str, wait: float = 1.0, until: str | None = None,
               timeout: float = 60.0, out: TextIO | None = None) -> tuple[int, list[str]]:
    """`run_command`, as (status, lines)."""
    outcome = run_command(home, command, wait, until, timeout, out)
    return outcome.status, outcome.lines
