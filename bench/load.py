"""Load and soak: many transfers at once, many small messages, and memory over time.

    .venv/bin/python bench/load.py [--downloads 50] [--size-mib 32] [--messages 10000] [--soak 60]

1. One provider, three requestors: --downloads files of --size-mib MiB (by default 1.6 GiB in all, so
   a node that held the files whole would pass 300 MB), all started at once and spread over the requestors; every copy checked by hash; time, MiB/s, peak memory, leftover workers.
2. --messages small requests from a process on one node to a process on another (64 in flight),
   each answered: messages/s and how many were lost.
3. A soak of --soak seconds of back-to-back downloads of mixed sizes, with each node's memory
   (VmRSS) at the start and the end.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import free_port  # noqa: E402
from transfer import FILES, REPO, evict_compiled, peak_rss_mib, run_remote, start_node  # noqa: E402

from host.terminal.control import run_command  # noqa: E402

TEST_PACKAGES = ["--packages", str(REPO / "components"), "--packages", str(REPO / "tests" / "packages")]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Node:
    def __init__(self, name: str, tmp: Path, env: dict, extra: list[str] = TEST_PACKAGES):
        import subprocess
        self.name, self.home = name, tmp / name
        (self.home / FILES).mkdir(parents=True, exist_ok=True)
        self.proc = start_node(name, self.home, free_port(), env, extra=extra)
        self.subprocess = subprocess

    def download(self, name: str, peer: Node, timeout: float = 600) -> None:
        outcome = run_command(self.home, f"download:file_transfer:template.os {name} {peer.name}",
                              until=rf"{re.escape(name)} downloaded|error:", timeout=timeout)
        if outcome.status != 0:
            raise RuntimeError(f"{self.name} <- {peer.name} {name}: {outcome.reason}; {outcome.lines[-3:]}")

    def workers(self) -> int:
        _, lines = run_remote(self.home, "ps", wait=0.1)
        return sum(1 for ln in lines if ln.startswith("  ") and ln.strip().split(":")[0].isdigit())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def concurrent_downloads(provider: Node, requestors: list[Node], count: int, size: int) -> None:
    names = [f"load{i}.bin" for i in range(count)]
    want = {}
    for n in names:
        data = os.urandom(size)
        (provider.home / FILES / n).write_bytes(data)
        want[n] = hashlib.sha256(data).hexdigest()
    errors: list[str] = []

    def one(req: Node, name: str) -> None:
        try:
            req.download(name, provider)
        except RuntimeError as e:
            errors.append(str(e))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(requestors[i % len(requestors)], n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    bad = [n for i, n in enumerate(names)
           if not errors and digest(requestors[i % len(requestors)].home / FILES / n) != want[n]]
    time.sleep(1)
    left = sum(node.workers() for node in [provider, *requestors])
    print(f"[1] {count} downloads of {size >> 20} MiB at once, 1 provider -> {len(requestors)} requestors: "
          f"{secs:.1f} s, {count * size / secs / 2**20:.0f} MiB/s in all; failed {len(errors)}, corrupt {len(bad)}, "
          f"workers left {left}")
    print(f"[1] peak RSS: provider {peak_rss_mib(provider.proc.pid):.0f} MiB, requestors "
          + ", ".join(f"{peak_rss_mib(r.proc.pid):.0f}" for r in requestors) + " MiB")
    for e in errors[:3]:
        print("    ", e)


def messages(a: Node, b: Node, count: int) -> None:
    code, lines = run_remote(a.home, f"m {a.name}@pinger:misbehave:test.os ping {b.name} {count}",
                             until=r"pinged \d+", timeout=600)
    found = [ln for ln in lines if "pinged" in ln]
    print(f"[2] {found[-1].split(': ', 1)[1] if found else 'no result: ' + str(lines[-3:])}")


def soak(a: Node, b: Node, seconds: float) -> None:
    sizes = [4096, 100_000, 1 << 20, 8 << 20, 32 << 20]
    rng = random.Random(7)
    start_rss = (rss_mib(a.proc.pid), rss_mib(b.proc.pid))
    t_end = time.monotonic() + seconds
    done = failed = moved = 0
    i = 0
    while time.monotonic() < t_end:
        size = rng.choice(sizes)
        name = f"soak{i}.bin"
        data = os.urandom(size)
        (b.home / FILES / name).write_bytes(data)
        try:
            a.download(name, b, timeout=120)
            ok = (a.home / FILES / name).read_bytes() == data
            done += ok
            failed += not ok
            moved += size
        except RuntimeError:
            failed += 1
        for home in (a.home, b.home):
            (home / FILES / name).unlink(missing_ok=True)
        i += 1
    end_rss = (rss_mib(a.proc.pid), rss_mib(b.proc.pid))
    print(f"[3] soak {seconds:.0f} s: {done} downloads verified ({moved / 2**20:.0f} MiB), {failed} failed; "
          f"RSS requestor {start_rss[0]:.0f} -> {end_rss[0]:.0f} MiB, provider {start_rss[1]:.0f} -> {end_rss[1]:.0f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--downloads", type=int, default=50)
    ap.add_argument("--size-mib", type=int, default=32)
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--soak", type=float, default=60)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ft-load-"))
    env = dict(os.environ, KINODE_DIRECTORY=str(tmp / "directory.sqlite"))
    nodes: list[Node] = []
    evict_compiled()  # peaks comparable with another tree's run (see transfer.evict_compiled)
    try:
        # the test packages (the pinger of part 2) only when part 2 runs: they add ~45 MB to each node
        extra = TEST_PACKAGES if args.messages else []
        nodes = [Node(n, tmp, env, extra) for n in ("prov.dev", "req1.dev", "req2.dev", "req3.dev")]
        provider, requestors = nodes[0], nodes[1:]
        if args.downloads:
            concurrent_downloads(provider, requestors, args.downloads, args.size_mib << 20)
        if args.messages:
            messages(requestors[0], provider, args.messages)
        if args.soak:
            soak(requestors[1], provider, args.soak)
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
