"""Compression (zstd, host/net/compress.py) against the same code with it off, in one run.

    sudo .venv/bin/python bench/compress.py [--rounds 2] [--text-mib 512] [--random-mib 512]
                                            [--random-rounds 8] [--fast-text-rounds 1] [--mbit 100] [--both-off]

Needs root (`ip netns`). Two namespaces joined by a veth pair; in the provider's, nodes b-on (compression
on) and b-off (KINODE_COMPRESS=0), in the requestor's a-on and a-off, the on pair and the off pair on
their own ports; each pair knows the other from a peers file. Parts:
  [1] `--text-mib` MiB of text-like data (web and application logs, CSV; tests/textlike.py) with the
      provider's side of the link limited to `--mbit` (100) Mbit/s (`tc qdisc ... tbf rate 100mbit`);
  [2] `--random-mib` MiB of random bytes over the same link without a limit;
  [3] the text over the link without a limit (what compression costs where the link is fast).
Each round downloads twice with each pair, on-off-off-on, then off-on-on-off the next round, and so on
(the ratio of a round: the off pair's two times over the on pair's two). Bytes are counted on the veth (the provider's eth0 tx_bytes, as the kernel counts them). Every
copy is checked by hash. Prints each download's time, MiB/s and veth bytes, and per part the medians
and the ratio of times off/on (the speed-up).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns import make_pair, sh  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from textlike import write_text_like  # noqa: E402
from transfer import FILES, REPO, run_remote, sha256, write_random  # noqa: E402

from host.net.compress import compress_blob  # noqa: E402

NS_A, NS_B = f"zstd{os.getpid()}a", f"zstd{os.getpid()}b"
ADDR_A, ADDR_B = "10.231.19.2", "10.231.19.3"
PORTS = {"on": (8080, 8081), "off": (8090, 8091)}   # (networking, HTTP) of each pair
DOWNLOAD = "download:file_transfer:template.os"


def make_link() -> None:
    make_pair(NS_A, NS_B, ADDR_A, ADDR_B)


def limit(mbit: int | None) -> None:
    """Limit what the provider sends to `mbit` Mbit/s (None: no limit)."""
    if mbit is None:
        subprocess.run(["tc", "-n", NS_B, "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
    else:
        sh("tc", "-n", NS_B, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{mbit}mbit",
           "burst", "256kb", "latency", "100ms")


def tx_bytes() -> int:
    out = sh("ip", "-n", NS_B, "-s", "-j", "link", "show", "eth0")
    return json.loads(out)[0]["stats64"]["tx"]["bytes"]


def remove_link() -> None:
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def entry(home: Path, name: str, advertise: str) -> dict:
    return json.loads(sh(sys.executable, "-m", "host", "id", "--home", str(home), "--node", name,
                         "--advertise", advertise))


def start_node(ns: str, name: str, home: Path, peers: Path, ports: tuple[int, int], on: bool) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "host", "--node", name, "--home", str(home),
           "--directory", str(home.parent / f"{name}.sqlite"), "--peers", str(peers),
           "--net-port", str(ports[0]), "--port", str(ports[1]), "--no-discovery"]
    env = dict(os.environ, KINODE_COMPRESS="1" if on else "0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "ready in" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
    raise RuntimeError(f"{name} did not start")


class Pair:
    """Requestor a-<mode> and provider b-<mode>."""

    def __init__(self, tmp: Path, mode: str, on: bool):
        self.mode = mode
        self.a_home, self.b_home = tmp / f"a-{mode}", tmp / f"b-{mode}"
        self.a, self.b = f"a-{mode}.dev", f"b-{mode}.dev"
        net_port = PORTS[mode][0]
        a_peers, b_peers = tmp / f"a-{mode}.peers.json", tmp / f"b-{mode}.peers.json"
        a_peers.write_text(json.dumps([entry(self.b_home, self.b, f"{ADDR_B}:{net_port}")]))
        b_peers.write_text(json.dumps([entry(self.a_home, self.a, f"{ADDR_A}:{net_port}")]))
        self.procs = [start_node(NS_A, self.a, self.a_home, a_peers, PORTS[mode], on),
                      start_node(NS_B, self.b, self.b_home, b_peers, PORTS[mode], on)]

    def download(self, name: str, digest: str, size: int) -> tuple[float, int]:
        """(seconds, bytes on the veth) of one download, checked by hash."""
        got = self.a_home / FILES / name
        got.unlink(missing_ok=True)
        os.sync()
        before = tx_bytes()
        t0 = time.perf_counter()
        code, lines = run_remote(self.a_home, f"{DOWNLOAD} {name} {self.b}",
                                 until=rf"{name} downloaded|error:", timeout=3600)
        secs = time.perf_counter() - t0
        moved = tx_bytes() - before
        if code != 0:
            raise RuntimeError("\n".join(lines[-5:]))
        assert sha256(got) == digest, f"hash mismatch ({self.mode}, {name})"
        got.unlink()
        return secs, moved

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def part(title: str, pairs: dict[str, Pair], name: str, digest: str, size: int, rounds: int) -> tuple[str, dict]:
    """The summary line, and the median seconds of each mode."""
    print(f"-- {title}", flush=True)
    secs: dict[str, list[float]] = {"on": [], "off": []}
    wire: dict[str, list[int]] = {"on": [], "off": []}
    ratios = []
    for r in range(rounds):
        # on off off on, then off on on off: a drift in the machine's load and going first or
        # second count the same for both
        order = ("on", "off", "off", "on") if r % 2 == 0 else ("off", "on", "on", "off")
        took: dict[str, list[float]] = {"on": [], "off": []}
        for mode in order:
            s, moved = pairs[mode].download(name, digest, size)
            secs[mode].append(s)
            wire[mode].append(moved)
            took[mode].append(s)
        ratios.append(sum(took["off"]) / sum(took["on"]))
        print(f"round {r + 1} ({'-'.join(order)}): "
              + ", ".join(f"{m} {'/'.join(f'{t:.2f}' for t in took[m])} s "
                          f"{2 * size / sum(took[m]) / 2**20:.1f} MiB/s {wire[m][-1] / 2**20:.1f} MiB on the veth"
                          for m in ("on", "off"))
              + f"; time off/on {ratios[-1]:.3f}", flush=True)
    med = {m: statistics.median(secs[m]) for m in secs}
    summary = (f"{title}, median of {rounds}: on {med['on']:.2f} s ({size / med['on'] / 2**20:.1f} MiB/s, "
               f"{statistics.median(wire['on']) / 2**20:.1f} MiB on the veth), off {med['off']:.2f} s "
               f"({size / med['off'] / 2**20:.1f} MiB/s, {statistics.median(wire['off']) / 2**20:.1f} MiB); "
               f"time off/on median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}), "
               f"total {sum(secs['off']) / sum(secs['on']):.3f}")
    print(summary, flush=True)
    return summary + f"; load average {os.getloadavg()[0]:.1f}", med


def judging_cost() -> float:
    """Seconds the sender spends judging one incompressible 4 MiB chunk (its sample), best of 5 x 20."""
    chunk = os.urandom(4 << 20)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            assert compress_blob(chunk) is None
        best = min(best, (time.perf_counter() - t0) / 20)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds of part 1 (text over 100 Mbit/s)")
    ap.add_argument("--text-mib", type=int, default=512)
    ap.add_argument("--mbit", type=int, default=100, help="the link's limit in part 1 (Mbit/s)")
    ap.add_argument("--random-mib", type=int, default=512)
    ap.add_argument("--random-rounds", type=int, default=8, help="rounds of part 2 (random, no limit)")
    ap.add_argument("--fast-text-rounds", type=int, default=1, help="rounds of part 3 (text, no limit); 0: skip")
    ap.add_argument("--both-off", action="store_true",
                    help="a control: the \"on\" pair runs with compression off too (what differs is the bench's own bias)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (ip netns)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-compress-"))
    pairs: dict[str, Pair] = {}
    summaries = []
    try:
        make_link()
        for mode in ("on", "off"):
            pairs[mode] = Pair(tmp, mode, mode == "on" and not args.both_off)
        text_size, rnd_size = args.text_mib << 20, args.random_mib << 20
        t0 = time.perf_counter()
        first = pairs["on"].b_home / FILES
        text_digest = write_text_like(first / "logs.txt", text_size)
        rnd_digest = write_random(first / "random.bin", rnd_size)
        other = pairs["off"].b_home / FILES
        other.mkdir(parents=True, exist_ok=True)
        for name in ("logs.txt", "random.bin"):   # the same bytes for both providers
            os.link(first / name, other / name)
        print(f"files written in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}",
              flush=True)
        if args.rounds:
            limit(args.mbit)
            summaries.append(part(f"[1] {args.text_mib} MiB text over {args.mbit} Mbit/s", pairs, "logs.txt",
                                  text_digest, text_size, args.rounds)[0])
        limit(None)
        if args.random_rounds:
            summary, med = part(f"[2] {args.random_mib} MiB random, link without a limit", pairs, "random.bin",
                                rnd_digest, rnd_size, args.random_rounds)
            cost, chunk_secs = judging_cost(), med["off"] * (4 << 20) / rnd_size
            summaries += [summary, f"[2] the sender judges an incompressible 4 MiB chunk in {cost * 1e6:.0f} µs "
                                   f"(one 64 KiB sample): {cost / chunk_secs * 100:.2f}% of the "
                                   f"{chunk_secs * 1e3:.1f} ms a chunk takes at the off median speed"]
        if args.fast_text_rounds:
            summaries.append(part(f"[3] {args.text_mib} MiB text, link without a limit", pairs, "logs.txt",
                                  text_digest, text_size, args.fast_text_rounds)[0])
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
        for s in summaries:
            print(s)
    finally:
        for p in pairs.values():
            p.stop()
        remove_link()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
