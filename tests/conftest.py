"""Fixtures that run real nodes: separate processes, temporary homes, their own directory DB."""
from __future__ import annotations

import hashlib
import http.client  # noqa: F401  (the standard library's, before a test puts process_lib's http.py on the path)
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "components" / "file_transfer" / "common"))

from host.terminal.control import run_remote  # noqa: E402

FT_FILES = "vfs/file_transfer:template.os/files"
TEST_PACKAGES = REPO / "tests" / "packages"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a costly test (over 1 GiB, or a minute long); the normal suite and CI run it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_built() -> None:
    missing = [p for p in ("file_transfer", "file_transfer_worker", "file_transfer_worker_api", "list_files", "download")
               if not (REPO / "components/file_transfer/pkg" / f"{p}.wasm").exists()]
    if missing:
        pytest.exit(f"components are not built ({', '.join(missing)}): run ./build.sh first", returncode=2)


class NodeProc:
    """A node running as its own OS process; its output is collected line by line."""

    def __init__(self, name: str, home: Path, port: int, env: dict, extra_args: list[str]):
        self.name, self.home, self.port = name, home, port   # port: HTTP, as kit's
        self.net_port = free_port()
        self.env = env
        self.extra_args = extra_args
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self.proc: subprocess.Popen | None = None
        self.launcher = [sys.executable, "-m", "host"]  # a test may run the CLI another way
        self.wrap: list[str] = []  # a command to run the node under (e.g. unshare), exec'ing it

    @property
    def files(self) -> Path:
        return self.home / FT_FILES

    def start(self, timeout: float = 60) -> NodeProc:
        cmd = [*self.wrap, *self.launcher, "--node", self.name, "--home", str(self.home),
               "--port", str(self.port), "--net-port", str(self.net_port), *self.extra_args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        first = len(self.lines)  # a restarted node: only this run's lines count
        while not any("ready in" in ln for ln in self.lines[first:]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)  # let the pump collect the last lines
                raise RuntimeError(f"{self.name} failed to start:\n" + "\n".join(self.lines[first:]))
            time.sleep(0.02)
        if "--packages" not in self.extra_args:
            # file_transfer makes its files drive just after the node is ready: a test that puts a
            # file there at once waits for it (bounded: a node whose file_transfer cannot start runs on)
            drive_deadline = time.monotonic() + min(timeout, 20)
            while not self.files.is_dir() and time.monotonic() < drive_deadline and self.proc.poll() is None:
                time.sleep(0.02)
        while not self._new.empty():  # expect() looks only at lines after the start
            self._new.get_nowait()
        return self

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._new.put(line)

    def expect(self, pattern: str, timeout: float = 30) -> str:
        """Wait for a NEW output line matching `pattern`; return it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no line matching {pattern!r} in {timeout} s; output:\n"
                                     + "\n".join(self.lines[-40:]))
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                continue
            if rx.search(line):
                return line

    def type(self, line: str) -> None:
        """Type a line into the node's terminal (stdin)."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def run(self, command: str, wait: float = 0.5, until: str | None = None, timeout: float = 60) -> tuple[int, list[str]]:
        """Run a command through the control socket, as `python -m host run` does."""
        return run_remote(self.home, command, wait=wait, until=until, timeout=timeout)

    def processes(self) -> list[str]:
        _, lines = self.run("ps", wait=0.1)
        return [ln.strip().split(" ")[0] for ln in lines if ln.startswith("  ")]

    def workers(self) -> list[str]:
        return [p for p in self.processes() if p.split(":")[0].isdigit()]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def no_workers(*nodes, within: float = 5.0) -> None:
    """Assert that every worker on these nodes ends within a few seconds."""
    deadline = time.monotonic() + within
    while any(n.workers() for n in nodes):
        assert time.monotonic() < deadline, {n.name: n.workers() for n in nodes}
        time.sleep(0.2)


@pytest.fixture
def node_factory(tmp_path):
    _require_built()
    env = dict(os.environ, KINODE_DIRECTORY=str(tmp_path / "directory.sqlite"), PYTHONUNBUFFERED="1")
    made: list[NodeProc] = []

    def make(name: str = "fake.dev", start: bool = True, extra_args: list[str] | None = None,
             home: Path | None = None, port: int | None = None, pause_after: int = 0) -> NodeProc:
        """`pause_after`: the node's providers hold after that many chunks (see `paused`)."""
        node_env = dict(env, KINODE_TEST_PAUSE_AFTER_CHUNKS=str(pause_after)) if pause_after else env
        node = NodeProc(name, home or tmp_path / name, port or free_port(), node_env, extra_args or [])
        made.append(node)
        return node.start() if start else node

    yield make
    for node in made:
        node.stop()


@pytest.fixture
def two_nodes(node_factory):
    return node_factory("fake.dev"), node_factory("fake2.dev")


@pytest.fixture
def held_nodes(node_factory):
    """fake.dev and fake2.dev, whose providers hold after HELD_CHUNKS chunks (see stop_mid_transfer)."""
    return node_factory("fake.dev"), node_factory("fake2.dev", pause_after=HELD_CHUNKS)


# ---- helpers for tests that must mean the same on a fast or a slow machine ------------------------
class frozen:
    """`with frozen(node):` the node's process is stopped (SIGSTOP) inside the block, so a transfer
    it takes part in cannot move on however fast the machine is; SIGCONT on leaving, unless it died."""

    def __init__(self, node: NodeProc):
        self.node = node

    def __enter__(self) -> NodeProc:
        os.kill(self.node.proc.pid, signal.SIGSTOP)
        return self.node

    def __exit__(self, *exc) -> None:
        if self.node.alive():
            os.kill(self.node.proc.pid, signal.SIGCONT)



# A node started with `pause_after=N` holds each provider worker before its (N+1)th chunk read (host/vfs/
# test_pause.py) until released: a transfer is held part way on any machine, however fast.
PAUSE_RELEASE = "test-pause-release"


def paused(node: NodeProc, timeout: float = 60) -> str:
    """Wait until one of the node's providers holds; the line says which file."""
    return node.expect(r"test pause: .* holds before read", timeout)


def release(node: NodeProc) -> None:
    """Let every held provider (and every later one) go on."""
    (node.home / PAUSE_RELEASE).touch()


def rearm(node: NodeProc) -> None:
    """Providers started from now on hold again after their Nth chunk."""
    (node.home / PAUSE_RELEASE).unlink(missing_ok=True)


def sha256(path: Path) -> str:
    """A file's SHA-256, read in 4 MiB blocks (files in these tests reach several GiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_random(path: Path, size: int) -> str:
    """Write `size` random bytes (a multiple of 4 MiB, or any size below it); their SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 22))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    """Poll `predicate` until it returns something true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(every)


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (VmHWM, VmRSS, Threads, ...)."""
    rows = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (r.partition(":") for r in rows)}


def peak_rss_bytes(node: NodeProc) -> int:
    """The node process's peak resident memory so far (VmHWM)."""
    kb, unit = proc_status(node.proc.pid)["VmHWM"].split()
    assert unit == "kB"
    return int(kb) * 1024


def evict_compiled() -> None:
    """Drop the compiled components (the wasmtime cache) from the page cache before nodes start whose
    peak memory a test bounds: RSS counts a node's mapped pages of them that are resident, and ones
    compiled minutes ago (a fresh clone's run) are resident whole, 40-50 MiB more per node than the
    same components read back from disk (bench/transfer.py's evict_compiled does the same)."""
    from host.fsutil import drop_from_cache
    from host.settings import default_cache_dir
    drop_from_cache(default_cache_dir(os.environ).glob("*.cwasm"))


def open_fds(node: NodeProc) -> int:
    return len(os.listdir(f"/proc/{node.proc.pid}/fd"))


def thread_count(node: NodeProc) -> int:
    return int(proc_status(node.proc.pid)["Threads"])


def partial_size(node, peer: str, name: str) -> int:
    part = node.files / ".partial" / peer / f"{name}.part"
    return part.stat().st_size if part.exists() else -1


def saved_resume_point(node, peer: str, name: str) -> int:
    """The `verified` byte count in the requestor's resume state (0 if none yet)."""
    try:
        return json.loads((node.files / ".partial" / peer / f"{name}.state").read_text())["verified"]
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def stop_mid_transfer(fake, fake2, name: str, size: int, need_resume_point: bool = False) -> int:
    """Start downloading `name` from fake2 (started with `pause_after=HELD_CHUNKS`) and wait until its
    provider holds and every chunk it sent is written: the transfer is held part way on any machine.
    Return the bytes held. The requestor saves its resume point every STATE_EVERY chunks, so with
    HELD_CHUNKS above that a resume point is saved (`need_resume_point` waits for it)."""
    from ft_common import EXT_CHUNK_SIZE
    fake.type(f"download:file_transfer:template.os {name} fake2.dev")
    paused(fake2)
    held = min(size, HELD_CHUNKS * EXT_CHUNK_SIZE)
    assert held < size
    wait_for(lambda: partial_size(fake, "fake2.dev", name) == held, 60, f"{held} bytes of {name} written")
    if need_resume_point:
        wait_for(lambda: saved_resume_point(fake, "fake2.dev", name) > 0, 60, "a resume point saved")
    assert not any(f"{name} downloaded" in ln for ln in fake.lines)
    return held


HELD_CHUNKS = 6  # a provider started with pause_after=HELD_CHUNKS sends this many chunks (24 MiB), then holds


def thread_names(node: NodeProc) -> list[str]:
    """The names of the node process's threads (Python names them for the OS), sorted."""
    names = []
    for comm in Path(f"/proc/{node.proc.pid}/task").glob("*/comm"):
        try:
            names.append(comm.read_text().strip())
        except FileNotFoundError:
            pass  # the thread ended meanwhile
    return sorted(names)
