"""Only what changed: an updated file downloaded over a rate-limited link by a node that holds the
old version, against `rsync` over ssh updating the same old copy on the same link, in the same run;
and a first download (no old copy) with the feature on and off (KINODE_DELTA=0), in the same run.

    sudo .venv/bin/python bench/delta.py [--mib 1024] [--changes 16] [--change-kib 4] [--insert-mib 1]
                                         [--rates 1gbit,100mbit] [--parts delta,first] [--rounds 1]

Needs root (`ip netns`, `tc`), rsync and sshd. Two network namespaces (`delta<pid>a`, `delta<pid>b`)
joined by a veth pair whose both ends are limited by `tc tbf` to each rate. Node b (provider, and
the sshd) holds the new file: the old one with --changes changes of --change-kib KiB at scattered
places and --insert-mib MiB inserted in the middle. Node a (requestor, and the rsync client) holds
the old one. Bytes are counted on the veth (both ends' tx_bytes), not by the node. Before each
timed copy the old copy is put back afresh (a new file: no chunk list cached for it), the new file's
mtime is changed (so the provider's cached list is not used either) and dirty pages are written out
(`sync`). Every result is checked by hash. Parts: `delta` (ours against rsync), `first` (a first
download, the feature on then off; the nodes are restarted for each setting).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
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
from transfer import FILES, REPO, run_remote  # noqa: E402

NS_A, NS_B = f"delta{os.getpid()}a", f"delta{os.getpid()}b"
ADDR_A, ADDR_B = "10.231.19.2", "10.231.19.3"
DL = "download:file_transfer:template.os"


def make_link() -> None:
    make_pair(NS_A, NS_B, ADDR_A, ADDR_B)


def set_rate(rate: str) -> None:
    for ns in (NS_A, NS_B):
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
           "burst", "1mb", "latency", "50ms")


def remove_link() -> None:
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def link_bytes() -> int:
    """Bytes sent on the link so far, both ways (the veth ends' tx_bytes)."""
    total = 0
    for ns in (NS_A, NS_B):
        info = json.loads(sh("ip", "-n", ns, "-s", "-j", "link", "show", "eth0"))
        total += info[0]["stats64"]["tx"]["bytes"]
    return total


def cpu_of(pid: int) -> float:
    """CPU seconds a process has used, with its threads and the children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def entry(home: Path, name: str, advertise: str) -> dict:
    return json.loads(sh(sys.executable, "-m", "host", "id", "--home", str(home), "--node", name,
                         "--advertise", advertise, "--net-port", "8080"))


def start_node(ns: str, name: str, home: Path, peers: Path, delta: bool) -> subprocess.Popen:
    env = dict(os.environ, KINODE_DELTA="1" if delta else "0")
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "host", "--node", name, "--home", str(home),
           "--directory", str(home.parent / f"{name}.sqlite"), "--peers", str(peers),
           "--net-port", "8080", "--port", "8081"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "ready in" in line:
            threading.Thread(target=lambda out=proc.stdout: [None for _ in out], daemon=True).start()
            return proc
    raise RuntimeError(f"{name} did not start")


def stop(procs: list) -> None:
    for p in procs:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    procs.clear()


def blake(path: Path) -> str:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def make_files(old: Path, new: Path, size: int, changes: int, change: int, insert: int) -> None:
    """`old`: random bytes; `new`: `old` with `changes` blocks of `change` bytes rewritten at scattered
    places and `insert` random bytes inserted in the middle."""
    r = random.Random(1)
    where = sorted(r.randrange(0, size - change) for _ in range(changes))
    mid = size // 2
    with open(old, "wb") as fo, open(new, "wb") as fn:
        pos = 0
        while pos < size:
            block = bytearray(os.urandom(min(4 << 20, size - pos)))
            fo.write(block)
            for at in where:
                if pos <= at < pos + len(block):
                    k = at - pos
                    block[k:k + change] = os.urandom(len(block[k:k + change]))
            if pos <= mid < pos + len(block):
                k = mid - pos
                fn.write(block[:k])
                left = insert
                while left:
                    piece = os.urandom(min(4 << 20, left))
                    fn.write(piece)
                    left -= len(piece)
                fn.write(block[k:])
            else:
                fn.write(block)
            pos += len(block)


class Sshd:
    def __init__(self, tmp: Path):
        self.dir = tmp / "ssh"
        self.server: subprocess.Popen | None = None

    def start(self) -> None:
        d = self.dir
        d.mkdir()
        for key in ("host_key", "client_key"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key))
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"Port 22\nListenAddress {ADDR_B}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
            f"PermitRootLogin yes\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
            f"PidFile {d}/sshd.pid\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.server = subprocess.Popen(["ip", "netns", "exec", NS_B, sshd, "-D", "-f", str(d / "sshd_config"),
                                        "-E", str(d / "log")])
        time.sleep(0.5)

    def rsync(self, src: Path, dest: Path, fsync: bool = False) -> None:
        ssh = (f"ssh -i {self.dir / 'client_key'} -c aes128-gcm@openssh.com -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
        subprocess.run(["ip", "netns", "exec", NS_A, "rsync", *(["--fsync"] if fsync else []), "-e", ssh,
                        f"root@{ADDR_B}:{src}", str(dest)], check=True)

    def cpu(self) -> float:
        """CPU seconds of rsync on both ends, ssh and sshd: this process's waited-for children (the
        client side) and the sshd's (the server side)."""
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        return child.ru_utime + child.ru_stime + (cpu_of(self.server.pid) if self.server is not None else 0.0)

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(5)


class Bench:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.a_home, self.b_home = tmp / "a", tmp / "b"
        self.a_peers, self.b_peers = tmp / "a.peers.json", tmp / "b.peers.json"
        self.procs: list = []
        self.delta_on: bool | None = None

    def nodes(self, delta: bool) -> None:
        if self.delta_on == delta:
            return
        stop(self.procs)
        self.procs.append(start_node(NS_A, "bench-a.dev", self.a_home, self.a_peers, delta))
        self.procs.append(start_node(NS_B, "bench-b.dev", self.b_home, self.b_peers, delta))
        self.delta_on = delta

    def download(self, name: str) -> tuple[float, int, str, float]:
        """-> (seconds, bytes on the link, the end line, CPU seconds of both nodes)."""
        os.sync()
        cpu = sum(cpu_of(p.pid) for p in self.procs)
        before = link_bytes()
        t0 = time.perf_counter()
        code, lines = run_remote(self.a_home, f"{DL} {name} bench-b.dev", until=rf"{name} downloaded|error:",
                                 timeout=3600)
        secs = time.perf_counter() - t0
        moved = link_bytes() - before
        cpu = sum(cpu_of(p.pid) for p in self.procs) - cpu
        if code != 0:
            raise RuntimeError("\n".join(lines[-5:]))
        return secs, moved, next((ln for ln in lines if "downloaded" in ln), ""), cpu


def main() -> int:  # noqa: C901 - one flat run of the parts
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="size of the old file")
    ap.add_argument("--changes", type=int, default=16)
    ap.add_argument("--change-kib", type=int, default=4)
    ap.add_argument("--insert-mib", type=float, default=1.0)
    ap.add_argument("--rates", default="1gbit,100mbit", help="tc tbf rates, comma-separated")
    ap.add_argument("--parts", default="delta,first", help="delta (ours against rsync), first (a first download)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rsync-fsync", action="store_true",
                    help="also time rsync --fsync (durable as our download; the goal's reference is plain rsync)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (ip netns, tc)", file=sys.stderr)
        return 2
    parts = set(args.parts.split(","))
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average at start: {' '.join(load)} ({os.cpu_count()} CPUs)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-delta-"))
    bench = Bench(tmp)
    sshd = Sshd(tmp)
    ratios: dict = {}    # rate -> time ours/rsync of each round
    try:
        make_link()
        bench.a_peers.write_text(json.dumps([entry(bench.b_home, "bench-b.dev", ADDR_B)]))
        bench.b_peers.write_text(json.dumps([entry(bench.a_home, "bench-a.dev", ADDR_A)]))
        size = args.mib << 20
        master_old = tmp / "old.bin"
        new = bench.b_home / FILES / "big.bin"
        new.parent.mkdir(parents=True, exist_ok=True)
        (bench.a_home / FILES).mkdir(parents=True, exist_ok=True)
        make_files(master_old, new, size, args.changes, args.change_kib << 10, int(args.insert_mib * (1 << 20)))
        new_size = new.stat().st_size
        digest = blake(new)
        print(f"old file {size / 2**20:.0f} MiB; new file {new_size / 2**20:.1f} MiB: {args.changes} changes of "
              f"{args.change_kib} KiB, {args.insert_mib:g} MiB inserted in the middle", flush=True)
        sshd.start()
        for rate in args.rates.split(","):
            set_rate(rate)
            for r in range(args.rounds):
                if "delta" in parts:
                    bench.nodes(True)
                    got = bench.a_home / FILES / "big.bin"
                    dest = tmp / "rsync" / "big.bin"
                    dest.parent.mkdir(exist_ok=True)
                    rsyncs: dict = {}
                    ours: tuple = ()
                    # rounds alternate which goes first, so neither always runs on a warmer machine
                    for who in ("ours", "rsync") if r % 2 == 0 else ("rsync", "ours"):
                        if who == "ours":
                            shutil.copyfile(master_old, got)
                            os.utime(new)   # a fresh stamp: the provider's cached list is not used
                            ours = bench.download("big.bin")
                            assert blake(got) == digest, "hash mismatch (ours)"
                            continue
                        # default rsync (the goal's reference), then with --fsync (durable as ours; context)
                        for fsync in (False, True) if args.rsync_fsync else (False,):
                            shutil.copyfile(master_old, dest)
                            os.sync()
                            before = link_bytes()
                            cpu = sshd.cpu()
                            t0 = time.perf_counter()
                            sshd.rsync(new, dest, fsync)
                            r_secs = time.perf_counter() - t0
                            time.sleep(0.5)   # the server side's sshd is reaped, its CPU counted
                            r_cpu = sshd.cpu() - cpu
                            rsyncs[fsync] = (r_secs, link_bytes() - before, r_cpu)
                            assert blake(dest) == digest, "hash mismatch (rsync)"
                    secs, moved, line, cpu = ours
                    r_secs, r_moved, r_cpu = rsyncs[False]
                    print(f"{rate} round {r + 1} update: ours {secs:.2f} s, {moved / 2**20:.2f} MiB on the link "
                          f"({moved / new_size:.2%} of the file); rsync {r_secs:.2f} s, {r_moved / 2**20:.2f} MiB "
                          f"({r_moved / new_size:.2%}); time ours/rsync {secs / r_secs:.2f}; CPU seconds ours {cpu:.2f}, "
                          f"rsync {r_cpu:.2f}", flush=True)
                    ratios.setdefault(rate, []).append(secs / r_secs)
                    if True in rsyncs:
                        f_secs = rsyncs[True][0]
                        ratios.setdefault(f"{rate} against rsync --fsync", []).append(secs / f_secs)
                        print(f"  rsync --fsync {f_secs:.2f} s; time ours/(rsync --fsync) {secs / f_secs:.2f}",
                              flush=True)
                    print(f"  ({line.strip()})", flush=True)
                if "first" in parts:
                    got = bench.a_home / FILES / "first.bin"
                    firsts = {}
                    for on in (True, False):
                        bench.nodes(on)
                        got.unlink(missing_ok=True)
                        shutil.copyfile(new, bench.b_home / FILES / "first.bin")
                        firsts[on] = bench.download("first.bin")
                        assert blake(got) == digest, "hash mismatch (first)"
                    (on_s, on_b, _, _), (off_s, off_b, _, _) = firsts[True], firsts[False]
                    print(f"{rate} round {r + 1} first download: feature on {on_s:.2f} s, {on_b / 2**20:.1f} MiB on "
                          f"the link; off (KINODE_DELTA=0) {off_s:.2f} s, {off_b / 2**20:.1f} MiB; time on/off "
                          f"{on_s / off_s:.2f}", flush=True)
                    (bench.b_home / FILES / "first.bin").unlink()
        for what, values in ratios.items():
            won = sum(v < 1 for v in values)
            print(f"{what}: time ours/rsync median {statistics.median(values):.2f} (range {min(values):.2f}-"
                  f"{max(values):.2f}), ours first in {won} of {len(values)} rounds", flush=True)
    finally:
        sshd.stop()
        stop(bench.procs)
        remove_link()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
