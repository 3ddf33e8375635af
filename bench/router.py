"""1 GiB from an indirect node through a router against the same download direct, in turn, in the
same run, over real links between three network namespaces.

    sudo .venv/bin/python bench/router.py [--gib 1] [--rounds 3]

Needs root (`ip netns`). Namespaces a (requestor), r (router, `--is-router`) and b (provider,
`--router bench-r.dev`) with a veth link a-r, a link r-b and, for the direct figure, a link a-b.
The requestor's peers file names b either by its address on the a-b link (direct) or by its
router (indirect); the file is rewritten between the two, and a node re-reads it when it changes.
Each copy is checked by hash. Prints MiB/s per round, the ratio routed/direct, and the router's
CPU time during each routed copy (user + system seconds, and as a share of one core).
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
from transfer import FILES, REPO, run_remote, sha256, write_random  # noqa: E402

TAG = f"kpyrt{os.getpid()}"
NS = {"a": f"{TAG}a", "r": f"{TAG}r", "b": f"{TAG}b"}
# the links and each end's address: a-r, r-b, a-b
LINKS = [("a", "r", "10.231.20"), ("r", "b", "10.231.21"), ("a", "b", "10.231.22")]
HOST_NO = {"a": 2, "r": 3, "b": 4}
NAMES = {"a": "bench-a.dev", "r": "bench-r.dev", "b": "bench-b.dev"}


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def addr(host: str, other: str) -> str:
    """`host`'s address on its link to `other`."""
    for x, y, net in LINKS:
        if {x, y} == {host, other}:
            return f"{net}.{HOST_NO[host]}"
    raise KeyError((host, other))


def make_links() -> None:
    for ns in NS.values():
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    for x, y, _ in LINKS:
        sh("ip", "link", "add", f"to{y}", "netns", NS[x], "type", "veth", "peer", "name", f"to{x}", "netns", NS[y])
        for h, other in ((x, y), (y, x)):
            sh("ip", "-n", NS[h], "addr", "add", f"{addr(h, other)}/24", "dev", f"to{other}")
            sh("ip", "-n", NS[h], "link", "set", f"to{other}", "up")


def remove_links() -> None:
    for ns in NS.values():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def entry(home: Path, name: str, *args: str) -> dict:
    return json.loads(sh(sys.executable, "-m", "host", "id", "--home", str(home), "--node", name, *args,
                         "--net-port", "8080"))


def write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def start_node(h: str, home: Path, peers: Path, extra: list[str]) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", NS[h], sys.executable, "-m", "host", "--node", NAMES[h], "--home", str(home),
           "--directory", str(home.parent / f"{h}.sqlite"), "--peers", str(peers),
           "--net-port", "8080", "--port", "8081", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "ready in" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
    raise RuntimeError(f"{NAMES[h]} did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of direct-then-routed")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (ip netns)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-router-"))
    procs: dict[str, subprocess.Popen] = {}
    try:
        make_links()
        home = {h: tmp / h for h in NS}
        peers = {h: tmp / f"{h}.peers.json" for h in NS}
        b_direct = entry(home["b"], NAMES["b"], "--advertise", addr("b", "a"))
        b_routed = entry(home["b"], NAMES["b"], "--router", NAMES["r"])
        write_json(peers["a"], [entry(home["r"], NAMES["r"], "--advertise", addr("r", "a")), b_routed])
        write_json(peers["r"], [b_routed])
        write_json(peers["b"], [entry(home["a"], NAMES["a"], "--advertise", addr("a", "b")),
                                entry(home["r"], NAMES["r"], "--advertise", addr("r", "b"))])
        procs["r"] = start_node("r", home["r"], peers["r"], ["--is-router"])
        procs["b"] = start_node("b", home["b"], peers["b"], ["--router", NAMES["r"]])
        procs["a"] = start_node("a", home["a"], peers["a"], [])
        time.sleep(1)  # b connects to its router
        size = int(args.gib * (1 << 30))
        src = home["b"] / FILES / "big.bin"
        src.parent.mkdir(parents=True, exist_ok=True)
        digest = write_random(src, size)
        got = home["a"] / FILES / "big.bin"

        def download(how: str) -> tuple[float, float]:
            """MiB/s of one download, and the router's CPU seconds during it."""
            write_json(peers["a"], [entry(home["r"], NAMES["r"], "--advertise", addr("r", "a")),
                                    b_direct if how == "direct" else b_routed])
            time.sleep(0.3)  # the peers file is checked every 0.1 s
            got.unlink(missing_ok=True)
            os.sync()
            cpu0 = cpu_seconds(procs["r"].pid)
            t0 = time.perf_counter()
            code, lines = run_remote(home["a"], f"download:file_transfer:template.os big.bin {NAMES['b']}",
                                     until=r"big\.bin downloaded|error:", timeout=3600)
            secs = time.perf_counter() - t0
            cpu = cpu_seconds(procs["r"].pid) - cpu0
            if code != 0:
                raise RuntimeError("\n".join(lines[-5:]))
            if sha256(got) != digest:
                raise RuntimeError(f"hash mismatch ({how})")
            return size / secs / 2**20, cpu

        direct, routed, ratios, cpus, shares = [], [], [], [], []
        for r in range(args.rounds):
            d, _ = download("direct")
            v, cpu = download("routed")
            direct.append(d)
            routed.append(v)
            ratios.append(v / d)
            cpus.append(cpu)
            shares.append(cpu / (size / v / 2**20))
            print(f"round {r + 1}: direct {d:.0f} MiB/s, through the router {v:.0f} MiB/s, ratio {ratios[-1]:.2f}; "
                  f"router CPU {cpu:.1f} s ({shares[-1]:.0%} of a core)", flush=True)
        print(f"{args.gib:g} GiB, median of {args.rounds}: direct {statistics.median(direct):.0f} MiB/s, "
              f"through the router {statistics.median(routed):.0f} MiB/s, ratio routed/direct "
              f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); router CPU "
              f"{statistics.median(cpus):.1f} s per copy ({statistics.median(shares):.0%} of a core)")
    finally:
        for p in procs.values():
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        remove_links()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
