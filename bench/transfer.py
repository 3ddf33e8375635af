"""Throughput of one download between two real nodes on this machine.

    .venv/bin/python bench/transfer.py --size-mib 256

Starts two nodes (temporary homes, their own directory database), writes a random file of the
given size on the provider, downloads it through the terminal's `download` script, checks the copy
by hash, and prints MiB/s and each node's peak memory (VmHWM).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host.terminal.control import run_remote  # noqa: E402

FILES = "vfs/file_transfer:template.os/files"


def start_node(name: str, home: Path, port: int, env: dict, extra: list[str] = ()) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "host", "--node", name, "--home", str(home), "--net-port", str(port),
                             "--port", "0", *extra],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "ready in" in line:
            # keep reading its output, as a terminal would
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
    raise RuntimeError(f"{name} did not start")


def evict_compiled() -> int:
    """Drop the compiled components (the wasmtime cache) from the page cache; return how many.

    A node maps them, and RSS counts the mapped pages that are resident: a component compiled
    minutes ago is still whole in the page cache from being written, and a node mapping it read
    10-30 MiB higher than one of another tree whose components were read back from disk. Evicted
    first, both trees' nodes fault them in alike, so their peaks can be compared."""
    from host.fsutil import drop_from_cache
    from host.settings import default_cache_dir
    return drop_from_cache(default_cache_dir(os.environ).glob("*.cwasm"))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_random(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 22))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--port", type=int, default=18611, help="networking port of the first node (the second: +1)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    env = dict(os.environ, KINODE_DIRECTORY=str(tmp / "directory.sqlite"))
    a_home, b_home = tmp / "a", tmp / "b"
    (b_home / FILES).mkdir(parents=True)
    size = args.size_mib << 20
    digest = write_random(b_home / FILES / "bench.bin", size)
    a = start_node("bench-a.dev", a_home, args.port, env)
    b = start_node("bench-b.dev", b_home, args.port + 1, env)
    try:
        t0 = time.perf_counter()
        code, lines = run_remote(a_home, "download:file_transfer:template.os bench.bin bench-b.dev",
                                 until=r"bench\.bin (downloaded|.*failed)|error:", timeout=3600)
        secs = time.perf_counter() - t0
        ok = code == 0 and sha256(a_home / FILES / "bench.bin") == digest
        print(f"download of {args.size_mib} MiB: {secs:.2f} s, {args.size_mib / secs:.1f} MiB/s, "
              f"verified={'yes' if ok else 'NO'}")
        print(f"peak RSS: requestor {peak_rss_mib(a.pid):.0f} MiB, provider {peak_rss_mib(b.pid):.0f} MiB")
        if not ok:
            print("\n".join(lines[-5:]))
        return 0 if ok else 1
    finally:
        for p in (a, b):
            p.terminate()
            p.wait(10)
        subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    sys.exit(main())
