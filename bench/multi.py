"""From every node that has it: one file downloaded from one provider, then from three at once
(`download NAME A,B,C`), each provider behind its own rate-limited link, in alternating rounds.

    sudo .venv/bin/python bench/multi.py [--mib 512] [--rate 200mbit] [--req-rate 2gbit] [--rounds 2]
    sudo .venv/bin/python bench/multi.py --old-copy [--changes 8] ...

Needs root (`ip netns`, `tc`). A hub namespace (`multi<pid>hub`) holds a bridge; the requestor and
three providers each have a namespace joined to it by a veth pair. Each provider's link is limited
by `tc tbf` to --rate both ways (its own end and the hub's end), the requestor's to --req-rate. All
three providers hold the same random file. Each round downloads it from the first provider alone,
then from all three (the order alternating between rounds); before each download the providers'
copies get a fresh mtime (no chunk list cached from the last round) and dirty pages are written out.
Every copy is checked by hash. Prints each time, MiB/s and the ratio three/one per round, and the
median ratio.

With --old-copy each round downloads from all three twice instead: once with the requestor holding an
older copy (the file with --changes stretches of 64 bytes overwritten, spread evenly; a fresh file,
so chunked afresh), once without one. Prints each time and the bytes that came in on the requestor's
link (its interface's counter: the lists, the pieces and the protocol's messages).
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
from netns import sh  # noqa: E402
from transfer import FILES, REPO, run_remote, sha256, write_random  # noqa: E402

TAG = f"multi{os.getpid()}"
HUB = f"{TAG}hub"
NAMES = ["req", "p1", "p2", "p3"]
DL = "download:file_transfer:template.os"


def ns(name: str) -> str:
    return f"{TAG}{name}"


def addr(i: int) -> str:
    return f"10.231.29.{i + 2}"


def tbf(namespace: str, dev: str, rate: str) -> None:
    sh("tc", "-n", namespace, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "1mb",
       "latency", "50ms")


def make_net(rate: str, req_rate: str) -> None:
    sh("ip", "netns", "add", HUB)
    sh("ip", "-n", HUB, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", HUB, "link", "set", "br0", "up")
    for i, name in enumerate(NAMES):
        sh("ip", "netns", "add", ns(name))
        sh("ip", "link", "add", "eth0", "netns", ns(name), "type", "veth", "peer", "name", f"v{name}", "netns", HUB)
        sh("ip", "-n", HUB, "link", "set", f"v{name}", "master", "br0", "up")
        sh("ip", "-n", ns(name), "link", "set", "lo", "up")
        sh("ip", "-n", ns(name), "addr", "add", f"{addr(i)}/24", "dev", "eth0")
        sh("ip", "-n", ns(name), "link", "set", "eth0", "up")
        r = req_rate if name == "req" else rate
        tbf(ns(name), "eth0", r)      # what the host sends
        tbf(HUB, f"v{name}", r)       # what it receives


def remove_net() -> None:
    for name in [*NAMES, "hub"]:
        subprocess.run(["ip", "netns", "del", f"{TAG}{name}"], capture_output=True)


def entry(home: Path, name: str, advertise: str) -> dict:
    return json.loads(sh(sys.executable, "-m", "host", "id", "--home", str(home), "--node", name,
                         "--advertise", advertise, "--net-port", "8080"))


def start_node(namespace: str, name: str, home: Path, peers: Path, log: Path | None = None) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", namespace, sys.executable, "-m", "host", "--node", name, "--home", str(home),
           "--directory", str(home.parent / f"{name}.sqlite"), "--peers", str(peers),
           "--net-port", "8080", "--port", "8081"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "ready in" in line:
            threading.Thread(target=_pump, args=(proc.stdout, log), daemon=True).start()
            return proc
    raise RuntimeError(f"{name} did not start")


def _pump(out, log: Path | None) -> None:
    """Read the node's output; with `log`, each line timed (seconds since the bench began)."""
    f = open(log, "w") if log else None
    for line in out:
        if f:
            f.write(f"{time.perf_counter() - T0:8.3f} {line}")
            f.flush()


T0 = time.perf_counter()


def rx_bytes(namespace: str) -> int:
    """Bytes received on `namespace`'s eth0 so far."""
    return int(sh("ip", "netns", "exec", namespace, "cat", "/sys/class/net/eth0/statistics/rx_bytes"))


def old_copy_rounds(args, src: Path, got: Path, digest: str, homes: dict, one_all: str) -> None:
    """Three providers, the requestor holding an older copy with a few changes, against the same with
    none, in alternating order: time and bytes in on the requestor's link."""
    size = args.mib << 20
    secs: dict = {"old": [], "none": []}
    moved: dict = {"old": [], "none": []}
    for r in range(args.rounds):
        for kind in (["old", "none"] if r % 2 == 0 else ["none", "old"]):
            got.unlink(missing_ok=True)
            if kind == "old":
                shutil.copyfile(src, got)
                with open(got, "r+b") as f:
                    for k in range(args.changes):
                        f.seek((k + 1) * size // (args.changes + 1))
                        f.write(os.urandom(64))
            for n in ("p1", "p2", "p3"):
                os.utime(homes[n] / FILES / "big.bin")
            os.sync()
            before = rx_bytes(ns("req"))
            t0 = time.perf_counter()
            code, lines = run_remote(homes["req"], f"{DL} big.bin {one_all}", until=r"big\.bin downloaded|error:",
                                     timeout=3600)
            took = time.perf_counter() - t0
            came = rx_bytes(ns("req")) - before
            if code != 0 or not any("big.bin downloaded" in ln for ln in lines):
                raise RuntimeError("\n".join(lines[-5:]))
            assert sha256(got) == digest, f"hash mismatch ({kind})"
            done = next(ln for ln in lines if "big.bin downloaded" in ln)
            if kind == "old":
                assert "the rest came from the copy this node had" in done, done
            secs[kind].append(took)
            moved[kind].append(came)
            print(f"round {r + 1}, {'an old copy here' if kind == 'old' else 'no old copy'}: {took:.2f} s, "
                  f"{came / 2**20:.1f} MiB in on the requestor's link", flush=True)
    old_s, none_s = statistics.median(secs["old"]), statistics.median(secs["none"])
    old_b, none_b = statistics.median(moved["old"]), statistics.median(moved["none"])
    print(f"median of {args.rounds}: {args.mib} MiB from three, {args.changes} changes: with the old copy "
          f"{old_s:.2f} s and {old_b / 2**20:.1f} MiB on the links; without {none_s:.2f} s and "
          f"{none_b / 2**20:.1f} MiB ({none_s / old_s:.1f}x the time, {none_b / max(old_b, 1):.0f}x the bytes)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rate", default="200mbit", help="each provider's link (tc tbf)")
    ap.add_argument("--req-rate", default="2gbit", help="the requestor's link (tc tbf)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--log", type=Path, help="write each node's output here (NAME.log, lines timed)")
    ap.add_argument("--old-copy", action="store_true", help="three providers with and without an older copy here")
    ap.add_argument("--changes", type=int, default=8, help="with --old-copy: stretches that differ in the old copy")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (ip netns, tc)", file=sys.stderr)
        return 2
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average at start: {' '.join(load)} ({os.cpu_count()} CPUs)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-multi-"))
    procs: list[subprocess.Popen] = []
    try:
        make_net(args.rate, args.req_rate)
        homes = {n: tmp / n for n in NAMES}
        nodes = {n: f"bench-{n}.dev" for n in NAMES}
        entries = {n: entry(homes[n], nodes[n], addr(i)) for i, n in enumerate(NAMES)}
        for n in NAMES:
            peers = tmp / f"{n}.peers.json"
            peers.write_text(json.dumps([entries[m] for m in NAMES if m != n]))
            procs.append(start_node(ns(n), nodes[n], homes[n], peers, args.log / f"{n}.log" if args.log else None))
        size = args.mib << 20
        src = homes["p1"] / FILES / "big.bin"
        src.parent.mkdir(parents=True, exist_ok=True)
        digest = write_random(src, size)
        for n in ("p2", "p3"):
            (homes[n] / FILES).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, homes[n] / FILES / "big.bin")
        print(f"{args.mib} MiB; each provider's link {args.rate}, the requestor's {args.req_rate}", flush=True)
        got = homes["req"] / FILES / "big.bin"
        one_all = f"{nodes['p1']},{nodes['p2']},{nodes['p3']}"
        if args.old_copy:
            old_copy_rounds(args, src, got, digest, homes, one_all)
            return 0
        ratios = []
        for r in range(args.rounds):
            secs = {}
            order = [nodes["p1"], one_all] if r % 2 == 0 else [one_all, nodes["p1"]]
            for who in order:
                got.unlink(missing_ok=True)
                for n in ("p1", "p2", "p3"):
                    os.utime(homes[n] / FILES / "big.bin")
                os.sync()
                t0 = time.perf_counter()
                print(f"  {t0 - T0:.3f}: download from {who}", flush=True)
                code, lines = run_remote(homes["req"], f"{DL} big.bin {who}", until=r"big\.bin downloaded|error:",
                                         timeout=3600)
                secs[who] = time.perf_counter() - t0
                if code != 0 or not any("big.bin downloaded" in ln for ln in lines):
                    raise RuntimeError("\n".join(lines[-5:]))
                assert sha256(got) == digest, f"hash mismatch ({who})"
            one, three = secs[nodes["p1"]], secs[one_all]
            ratios.append(one / three)
            print(f"round {r + 1}: one provider {one:.2f} s ({size / one / 2**20:.1f} MiB/s), three {three:.2f} s "
                  f"({size / three / 2**20:.1f} MiB/s): {ratios[-1]:.2f}x", flush=True)
        print(f"median of {args.rounds}: three providers {statistics.median(ratios):.2f}x one "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        remove_net()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
