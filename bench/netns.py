"""1 GiB between two nodes over a real link (two network namespaces joined by a veth pair) against
`scp -c aes128-gcm@openssh.com` over the same link, in turn, in the same run.

    sudo .venv/bin/python bench/netns.py [--gib 1] [--rounds 3] [--shared-cpus]

Needs root (`ip netns`) and, for scp, Debian's openssh-server (else only our figure is printed).
Node b (provider, and sshd) and node a (requestor, and the scp client) each run in their own
namespace and know each other only from a peers file. As in bench/throughput.py, each node runs
on its own half of the CPUs unless --shared-cpus, and the page cache's dirty pages are written out
before each timed copy. Every copy is checked by hash. Prints MiB/s per round, the ratio ours/scp,
and the medians.
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
from throughput import split_cpus  # noqa: E402
from transfer import FILES, REPO, run_remote, sha256, write_random  # noqa: E402

NS_A, NS_B = f"kpybench{os.getpid()}a", f"kpybench{os.getpid()}b"
ADDR_A, ADDR_B = "10.231.9.2", "10.231.9.3"


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def make_pair(ns_a: str, ns_b: str, addr_a: str, addr_b: str) -> None:
    """Two namespaces joined by a veth pair, each end `eth0` with its address in a /24."""
    sh("ip", "netns", "add", ns_a)
    sh("ip", "netns", "add", ns_b)
    sh("ip", "link", "add", "eth0", "netns", ns_a, "type", "veth", "peer", "name", "eth0", "netns", ns_b)
    for ns, addr in ((ns_a, addr_a), (ns_b, addr_b)):
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")


def make_link() -> None:
    make_pair(NS_A, NS_B, ADDR_A, ADDR_B)


def remove_link() -> None:
    for ns in (NS_A, NS_B):  # deleting a namespace deletes its end of the pair, and so the pair
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def entry(home: Path, name: str, advertise: str) -> dict:
    out = sh(sys.executable, "-m", "host", "id", "--home", str(home), "--node", name, "--advertise", advertise,
             "--net-port", "8080")
    return json.loads(out)


def start_node(ns: str, name: str, home: Path, peers: Path, cpus: str | None) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "host", "--node", name, "--home", str(home),
           "--directory", str(home.parent / f"{name}.sqlite"), "--peers", str(peers),
           "--net-port", "8080", "--port", "8081"]  # the networking port the peers entries name
    if cpus:
        cmd += ["--cpus", cpus]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "ready in" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
    raise RuntimeError(f"{name} did not start")


class Sshd:
    """A private sshd in namespace b on its link address; `copy()` pulls a file from namespace a."""

    def __init__(self, tmp: Path):
        self.dir = tmp / "ssh"
        self.server: subprocess.Popen | None = None

    def start(self) -> bool:
        sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
        if sshd is None or shutil.which("scp") is None:
            return False
        d = self.dir
        d.mkdir()
        for key in ("host_key", "client_key"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key))
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"Port 22\nListenAddress {ADDR_B}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
            f"PermitRootLogin yes\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
            f"PidFile {d}/sshd.pid\nSubsystem sftp internal-sftp\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        self.server = subprocess.Popen(["ip", "netns", "exec", NS_B, sshd, "-D", "-f", str(d / "sshd_config"),
                                        "-E", str(d / "log")])
        time.sleep(0.5)
        return True

    def copy(self, src: Path, dest: Path) -> float:
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", NS_A, "scp", "-q", "-c", "aes128-gcm@openssh.com",
                        "-i", str(self.dir / "client_key"), "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                        f"root@{ADDR_B}:{src}", str(dest)], check=True)
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of ours-then-scp")
    ap.add_argument("--shared-cpus", action="store_true", help="let both nodes use every CPU")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (ip netns)", file=sys.stderr)
        return 2
    cpus = None if args.shared_cpus else split_cpus()
    print("CPUs: " + (f"requestor node {cpus[0]}, provider node {cpus[1]}" if cpus else "shared"), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-netns-"))
    procs: list[subprocess.Popen] = []
    sshd = Sshd(tmp)
    try:
        make_link()
        a_home, b_home = tmp / "a", tmp / "b"
        a_peers, b_peers = tmp / "a.peers.json", tmp / "b.peers.json"
        a_peers.write_text(json.dumps([entry(b_home, "bench-b.dev", ADDR_B)]))
        b_peers.write_text(json.dumps([entry(a_home, "bench-a.dev", ADDR_A)]))
        procs.append(start_node(NS_A, "bench-a.dev", a_home, a_peers, cpus and cpus[0]))
        procs.append(start_node(NS_B, "bench-b.dev", b_home, b_peers, cpus and cpus[1]))
        size = int(args.gib * (1 << 30))
        src = b_home / FILES / "big.bin"
        src.parent.mkdir(parents=True, exist_ok=True)
        digest = write_random(src, size)
        has_scp = sshd.start()
        if not has_scp:
            print("scp or sshd (openssh-server) missing: only our figure", flush=True)
        ours, theirs, ratios = [], [], []
        for r in range(args.rounds):
            got = a_home / FILES / "big.bin"
            got.unlink(missing_ok=True)
            os.sync()
            t0 = time.perf_counter()
            code, lines = run_remote(a_home, "download:file_transfer:template.os big.bin bench-b.dev",
                                     until=r"big\.bin downloaded|error:", timeout=3600)
            secs = time.perf_counter() - t0
            if code != 0:
                raise RuntimeError("\n".join(lines[-5:]))
            assert sha256(got) == digest, "hash mismatch (ours)"
            ours.append(size / secs / 2**20)
            line = f"round {r + 1}: ours {ours[-1]:.0f} MiB/s"
            if has_scp:
                dest = tmp / "scp-copy.bin"
                secs = sshd.copy(src, dest)
                assert sha256(dest) == digest, "hash mismatch (scp)"
                dest.unlink()
                theirs.append(size / secs / 2**20)
                ratios.append(ours[-1] / theirs[-1])
                line += f", scp {theirs[-1]:.0f} MiB/s, ratio ours/scp {ratios[-1]:.2f}"
            print(line, flush=True)
        summary = f"{args.gib:g} GiB over the veth link, median of {args.rounds}: ours {statistics.median(ours):.0f} MiB/s"
        if has_scp:
            summary += (f", scp -c aes128-gcm {statistics.median(theirs):.0f} MiB/s, "
                        f"ratio {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")
        print(summary)
    finally:
        sshd.stop()
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        remove_link()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
