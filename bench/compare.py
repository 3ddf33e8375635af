"""Two source trees alternating in one run: one download each per round, the plain socket between.

    .venv/bin/python bench/compare.py OTHER_TREE [--mib 1024] [--rounds 6] [--folder 0]

OTHER_TREE is a checkout with its components built (e.g. `git worktree add /tmp/before main &&
(cd /tmp/before && ./build.sh)`); this tree is the other. Each tree's pair of nodes runs from its own
code; per round the two download the same --mib MiB file in turn (the order alternating), then the
plain-socket reference copies it (bench/plainsock.py). Prints MiB/s and each node's CPU-seconds per
GiB per round, the medians and each pair's peak memory (the compiled components are evicted from the
page cache first, so that both pairs' peaks count them alike). With --folder N, the downloads are instead a
folder of N files of 4 KiB (kept after each round, not deleted: see docs/BENCHMARKS.md on ext4).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # noqa: E402
from throughput import Pair, check_folder, make_folder, plain_socket  # noqa: E402
from transfer import FILES, evict_compiled, peak_rss_mib, sha256, write_random  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("other", help="the other tree (built)")
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--folder", type=int, default=0, help="a folder of this many 4 KiB files instead of one file")
    args = ap.parse_args()
    trees = {"other": Path(args.other).resolve(), "this": transfer.REPO}
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-compare-"))
    pairs: dict[str, Pair] = {}
    evict_compiled()  # else the tree built last reads higher in peak memory (see evict_compiled)
    try:
        for tag, repo in trees.items():
            transfer.REPO = repo  # start_node runs `python -m host` from this tree
            (tmp / tag).mkdir()
            pairs[tag] = Pair(tmp / tag, None)
        size = args.mib << 20
        src = tmp / "src.bin"
        digest, files = "", {}
        if args.folder:
            files = make_folder(tmp / "src", args.folder)
            for p in pairs.values():
                shutil.copytree(tmp / "src", p.b_home / FILES / "tree")
            size = args.folder * 4096
        else:
            digest = write_random(src, size)
            for p in pairs.values():
                os.link(src, p.b_home / FILES / "one.bin")
        res: dict[str, list] = {"other": [], "this": [], "plain": []}
        for r in range(args.rounds):
            for tag in (("other", "this") if r % 2 == 0 else ("this", "other")):
                p = pairs[tag]
                a0, b0 = p.cpu()
                secs = p.download("tree" if args.folder else "one.bin", sync=True)
                a1, b1 = p.cpu()
                if args.folder:
                    check_folder(p.a_home / FILES / "tree", files)
                    os.rename(p.a_home / FILES / "tree", p.a_home / f"kept{r}")
                else:
                    if sha256(p.a_home / FILES / "one.bin") != digest:
                        raise RuntimeError("hash mismatch")
                    (p.a_home / FILES / "one.bin").unlink()
                g = size / (1 << 30)
                rate = f"{args.folder / secs:.0f} files/s" if args.folder else f"{size / secs / 2**20:.0f} MiB/s"
                res[tag].append((args.folder / secs if args.folder else size / secs / 2**20, (a1 - a0) / g, (b1 - b0) / g))
                print(f"round {r + 1} {tag}: {rate}, CPU-s/GiB requestor {(a1 - a0) / g:.2f} + provider "
                      f"{(b1 - b0) / g:.2f} (CPU-s requestor {a1 - a0:.2f}, provider {b1 - b0:.2f}); load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
            if not args.folder:
                secs, cpu = plain_socket(src, tmp / "plain.bin")
                res["plain"].append((size / secs / 2**20, cpu / (size / (1 << 30)), 0.0))
                print(f"round {r + 1} plain socket: {res['plain'][-1][0]:.0f} MiB/s, CPU-s/GiB {res['plain'][-1][1]:.2f}",
                      flush=True)
        med = statistics.median
        unit = "files/s" if args.folder else "MiB/s"
        for tag, rows in res.items():
            if rows:
                print(f"median {tag}: {med(x[0] for x in rows):.0f} {unit}, CPU-s/GiB {med(x[1] + x[2] for x in rows):.2f} "
                      f"(requestor {med(x[1] for x in rows):.2f}, provider {med(x[2] for x in rows):.2f})")
        for tag, p in pairs.items():
            print(f"peak RSS {tag}: requestor {peak_rss_mib(p.a.pid):.0f} MiB, provider {peak_rss_mib(p.b.pid):.0f} MiB")
    finally:
        for p in pairs.values():
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
