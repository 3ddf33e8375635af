"""Warm start: wall time from launching `python -m host` to its ready line, components already
built and compiled (run ./build.sh first).

    .venv/bin/python bench/startup.py [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(tmp: Path, i: int) -> float:
    env = dict(os.environ, KINODE_DIRECTORY=str(tmp / "directory.sqlite"))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "host", "--node", f"start{i}.dev", "--home", str(tmp / f"h{i}"),
                             "--port", str(free_port())], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "ready in" in line:
                return time.perf_counter() - t0
        raise RuntimeError("node did not start")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        one_start(Path(d), 99)  # first start of a home copies the package into its pkg drive
        times = [one_start(Path(d), i % 2) for i in range(args.runs)]
    print(f"warm start to ready prompt: median {statistics.median(times):.2f} s, "
          f"min {min(times):.2f} s, max {max(times):.2f} s over {len(times)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
