"""The control socket (host/terminal/control.py): frames, statuses, and clients that misbehave.

Most tests run the real ControlServer against a scripted stand-in for the node (no Wasm needed);
the last ones use a real node.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for

from host.messages import ProcessId
from host.terminal import control
from host.terminal.control import ControlServer, run_command

REPO = Path(__file__).resolve().parent.parent
SCRIPT = ProcessId("123", "pkg", "pub.os")


class FakeNode:
    """A CommandHost whose commands are scripted: `say TEXT`, `reject`, `script OUTCOME`, `flood N`."""

    def __init__(self):
        self.listeners: list = []
        self.exit_watchers: list = []
        self.running: set[ProcessId] = set()
        self.lock = threading.Lock()
        self.emit_times: list[float] = []

    def emit(self, line: str) -> None:
        t0 = time.monotonic()
        with self.lock:
            listeners = list(self.listeners)
        for fn in listeners:
            fn(line)
        self.emit_times.append(time.monotonic() - t0)

    def exit(self, pid: ProcessId, reason: str) -> None:
        self.running.discard(pid)
        for fn in list(self.exit_watchers):
            fn(pid, reason)

    # ---- CommandHost
    def run_command(self, line: str):
        head, _, rest = line.partition(" ")
        if head == "say":
            self.emit(rest)
            return None
        if head == "reject":
            self.emit("error: unknown command")
            return None
        if head == "flood":
            threading.Thread(target=lambda: [self.emit(f"line {i} " + "x" * 200) for i in range(int(rest))]).start()
            return None
        if head == "script":
            self.running.add(SCRIPT)

            def play():
                time.sleep(0.05)
                for step in rest.split(","):
                    if step == "forever":
                        return
                    if step.startswith("print:"):
                        self.emit(f"pkg:pub.os: {step[6:]}")
                    elif step.startswith("other:"):
                        self.emit(f"other:pub.os: {step[6:]}")
                    elif step.startswith("exit:"):
                        self.exit(SCRIPT, step[5:])
                    time.sleep(0.02)
            threading.Thread(target=play).start()
            return SCRIPT
        raise AssertionError(line)

    def subscribe_output(self, fn):
        with self.lock:
            self.listeners.append(fn)

        def unsubscribe():
            with self.lock:
                self.listeners.remove(fn)
        return unsubscribe

    def watch_exits(self, fn):
        self.exit_watchers.append(fn)
        return lambda: self.exit_watchers.remove(fn)

    def is_running(self, pid):
        return pid in self.running

    def stopping(self) -> bool:
        return False


@pytest.fixture
def served(tmp_path):
    node = FakeNode()
    server = ControlServer(tmp_path, node)
    server.start()
    yield node, tmp_path
    server.stop()


def settled(node: FakeNode, within: float = 3.0) -> bool:
    """True once no client is subscribed any more."""
    deadline = time.monotonic() + within
    while node.listeners or node.exit_watchers:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def raw_exchange(home: Path, payload: bytes, close_write: bool = True) -> list[dict]:
    """Send raw bytes to the control socket; return the frames the node answers with."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(home / control.SOCKET_NAME))
        s.settimeout(15)
        s.sendall(payload)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


# ---- statuses ---------------------------------------------------------------------------------------
def test_a_script_that_returns_is_ok_and_its_output_comes_in_order(served):
    node, home = served
    out = run_command(home, "script print:one,print:two,exit:returned", wait=0.1, timeout=10)
    assert out == (0, ["pkg:pub.os: one", "pkg:pub.os: two"], "ok")
    assert settled(node)


@pytest.mark.parametrize("command, reason", [
    ("reject", "the terminal rejected the command"),
    ("script print:error: no such file,exit:returned", "the script reported an error"),
    ("script print:working,exit:trapped: out of fuel", "123:pkg:pub.os trapped: out of fuel"),
])
def test_a_failed_command_ends_with_status_1_and_says_why(served, command, reason):
    node, home = served
    out = run_command(home, command, wait=0.1, timeout=10)
    assert out.status == 1 and out.reason == reason, out


def test_an_error_printed_by_another_package_is_not_the_commands(served):
    node, home = served
    out = run_command(home, "script other:error: unrelated,print:fine,exit:returned", wait=0.1, timeout=10)
    assert out.status == 0 and "other:pub.os: error: unrelated" in out.lines, out
    # the same line from the script's own package fails it (the positive control)
    out = run_command(home, "script print:error: related,print:fine,exit:returned", wait=0.1, timeout=10)
    assert out.status == 1, out


def test_a_plain_line_is_ok(served):
    node, home = served
    assert run_command(home, "say hello", wait=0) == (0, ["hello"], "ok")


def test_until_ends_at_the_first_matching_line(served):
    node, home = served
    t0 = time.monotonic()
    out = run_command(home, "script print:a,print:done,print:b,forever", until="done", timeout=20)
    assert out.status == 0 and out.lines == ["pkg:pub.os: a", "pkg:pub.os: done"], out
    assert time.monotonic() - t0 < 5
    assert settled(node)


def test_until_that_never_matches_fails_at_the_timeout(served):
    node, home = served
    out = run_command(home, "script print:a,exit:returned", until="never", timeout=0.5)
    assert out.status == 1 and "no output line matched 'never'" in out.reason, out


def test_a_script_still_running_at_the_timeout_fails(served):
    node, home = served
    out = run_command(home, "script print:a,forever", timeout=0.5)
    assert out.status == 1 and "still running after 0.5 s" in out.reason, out


def test_no_node_is_status_2(tmp_path):
    out = run_command(tmp_path, "ps")
    assert out.status == 2 and "no node is running" in out.reason


# ---- misbehaving clients ----------------------------------------------------------------------------
@pytest.mark.parametrize("payload, why", [
    (b"ps\n", "not a JSON line"),
    (b"\xff\xfe{}\n", "not a JSON line"),
    (b"[1, 2]\n", "a frame must be a JSON object"),
    (b'{"linger": 1}\n', '"run" must be the command line'),
    (b'{"run": "say x", "linger": "soon"}\n', '"linger" must be a number'),
    (b'{"run": "say x", "timeout": -1}\n', '"timeout" must be a number'),
    (b'{"run": "say x", "until": "("}\n', '"until" is not a regular expression'),
    (b'{"run": "say x"', "the request ended without a newline"),
    (b"x" * (control.MAX_REQUEST + 10), "request longer than"),
])
def test_a_malformed_request_gets_a_clear_end_frame_and_harms_nothing(served, payload, why):
    node, home = served
    frames = raw_exchange(home, payload)
    assert len(frames) == 1 and frames[0]["type"] == "end" and frames[0]["status"] == 1, frames
    assert why in frames[0]["reason"], frames
    assert settled(node)
    assert run_command(home, "say still here", wait=0) == (0, ["still here"], "ok")


def test_a_client_that_connects_and_leaves_harms_nothing(served):
    node, home = served
    for _ in range(20):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(home / control.SOCKET_NAME))
    assert raw_exchange(home, b"") == []  # nothing asked, nothing answered
    assert run_command(home, "say still here", wait=0).status == 0


def test_a_client_that_vanishes_mid_command_is_forgotten(served):
    node, home = served
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(home / control.SOCKET_NAME))
    s.sendall(control.encode({"run": "script print:a,forever", "until": "never", "timeout": 600}))
    assert json.loads(s.makefile("rb").readline())["text"] == "pkg:pub.os: a"
    assert node.listeners  # watching
    s.close()
    assert settled(node), "the node still watches for a client that left"
    assert run_command(home, "say still here", wait=0).status == 0


def test_a_client_that_stops_reading_never_stalls_the_output(served, monkeypatch):
    node, home = served
    monkeypatch.setattr(control, "SEND_WAIT", 0.5)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(str(home / control.SOCKET_NAME))
    try:
        s.sendall(control.encode({"run": "flood 30000", "until": "never", "timeout": 600}))
        deadline = time.monotonic() + 30
        while len(node.emit_times) < 30000:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert max(node.emit_times) < 0.5  # emitting never waited for the client
        assert settled(node, within=10), "a client that stopped reading was not cut off"
    finally:
        s.close()
    assert run_command(home, "say still here", wait=0).status == 0


def test_too_many_clients_are_refused_clearly(served, monkeypatch):
    node, home = served
    monkeypatch.setattr(control, "MAX_CLIENTS", 2)
    server = ControlServer(home / "other", node)
    (home / "other").mkdir()
    server.start()
    try:
        held = []
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(home / "other" / control.SOCKET_NAME))
            s.sendall(control.encode({"run": "script forever", "until": "never", "timeout": 600}))
            held.append(s)
        # (one thread accepts in connection order: both held clients took their slots before this one)
        out = run_command(home / "other", "say x", wait=0, timeout=5)
        assert out.status == 1 and "already running 2 control commands" in out.reason, out
        for s in held:
            s.close()
        # their slots free once their commands notice the clients left
        wait_for(lambda: run_command(home / "other", "say x", wait=0, timeout=5).status == 0, 30, "a slot freed")
    finally:
        server.stop()


# ---- a real node ------------------------------------------------------------------------------------
def test_a_real_node_survives_bad_frames_and_cli_exit_codes_hold(node_factory):
    node = node_factory("fake.dev")
    for payload in (b"\x00\x01garbage\n", b'{"run": 5}\n', b"{" * 70000, b'{"run": "ps"'):
        frames = raw_exchange(node.home, payload)
        assert frames and frames[-1]["status"] == 1 and "malformed request" in frames[-1]["reason"], frames
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a client that leaves mid-command
    s.connect(str(node.home / control.SOCKET_NAME))
    s.sendall(control.encode({"run": "help", "until": "never", "timeout": 600}))
    s.close()
    assert node.alive()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "host", "run", "--home", str(node.home), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    ok = cli("--wait", "0.1", "ps")
    assert ok.returncode == 0 and "file_transfer:file_transfer:template.os" in ok.stdout, ok
    bad = cli("nosuch:file_transfer:template.os")
    assert bad.returncode == 1 and "has no script 'nosuch'" in bad.stdout, bad
    assert "error: the terminal rejected the command" in bad.stderr, bad
    until = cli("--until", "usage", "list_files:file_transfer:template.os")
    assert until.returncode == 1 and "error: usage: list_files" in until.stdout, until
