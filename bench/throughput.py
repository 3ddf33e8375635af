"""File transfer benchmark: speed against scp, memory, and many small files.

    .venv/bin/python bench/throughput.py [--gib 1] [--big-gib 4] [--small 1000] [--shared-cpus]

The two nodes run on one machine as on two: each on its own half of the CPUs (`--cpus`), as scp's
client and server are one single-threaded process each. With --shared-cpus both nodes may use every
CPU, and a node's threads hand work to each other across cores (docs/BENCHMARKS.md has the figures).

1. A random file of --gib GiB downloaded between two nodes on this machine, then the same file
   copied with `scp -c aes128-gcm@openssh.com` to 127.0.0.1 (a private sshd on a free port; needs
   Debian's openssh-server, else scp is skipped), --rounds times in turn. Before each timed copy
   the page cache's dirty pages are written out (`sync`), so neither pays for the other's (or the
   source file's) writeback. Our download ends with an fsync; scp's copy does not. Between the
   two, the plain-socket reference (bench/plainsock.py: a length header, then the raw bytes into a
   file, fsync at the end; no encryption, no hash) copies the same file, then does it sealed
   (AES-GCM both ways, a BLAKE3 on each end, nothing else: the floor for any transfer that keeps
   encryption and hashing on both ends). Prints MiB/s, the ratios
   ours/plain and ours/scp per round, then the medians; and CPU-seconds per GiB: each node's (from
   /proc/PID/stat before and after), the plain socket's (its two processes' rusage) and scp's
   (client's rusage plus the private sshd's reaped children).
2. A --big-gib GiB file: MiB/s and each node's peak memory (VmHWM), which must stay under 300 MB.
3. --small files of 4 KiB downloaded with 8 downloads running at a time: files/s.
4. The same files again in commands of 100 names each (`download A B ... NODE`; file_transfer
   runs 4 at a time and queues the rest): files/s.
5. Folders (--folder N, on two fresh nodes): a folder of N files of 4 KiB in 10 subfolders, one
   `download` of the folder against `scp -r -c aes128-gcm` of the same folder (and `rsync -a` over
   the same ssh, if rsync is installed), --rounds times in turn; then --folder-many files (each node's peak RSS printed), and with --mixed-mib M a folder of
   the N small files plus one file of M MiB against the two downloaded apart.
Every download is checked by hash or byte for byte.
"""
from __future__ import annotations

import argparse
import os
import queue
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer import FILES, peak_rss_mib, run_remote, sha256, start_node, write_random  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_cpus() -> tuple[str, str] | None:
    """This process's CPUs in two halves, as `--cpus` lists; None on a single CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    half = len(cpus) // 2
    return ",".join(map(str, cpus[:half])), ",".join(map(str, cpus[half:]))


TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int, children: bool = False) -> float:
    """CPU-seconds (user + system) of process `pid` so far, all its threads; with `children`, those
    of its children it has reaped instead."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    u, s = (13, 14) if children else (11, 12)  # cutime, cstime / utime, stime, counted after "(comm)"
    return (int(fields[u]) + int(fields[s])) / TICK


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def no_children(pid: int, timeout: float = 5.0) -> None:
    """Wait until process `pid` has reaped every child (so its cutime counts them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}/task/{t}/children").read_text().strip()
                   for t in os.listdir(f"/proc/{pid}/task")):
            return
        time.sleep(0.02)


def plain_socket(src: Path, dest: Path, sealed: bool = False) -> tuple[float, float]:
    """Copy `src` to `dest` with bench/plainsock.py (the copy is then deleted): seconds, CPU-seconds.
    `sealed`: with AES-GCM and a BLAKE3 on each end (see plainsock.py), both digests checked."""
    os.sync()
    script = str(Path(__file__).resolve().parent / "plainsock.py")
    flag = ["--sealed"] if sealed else []
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    rx = subprocess.Popen([sys.executable, script, "recv", str(dest), *flag], stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None
    port = rx.stdout.readline().strip()
    sent = subprocess.run([sys.executable, script, "send", port, str(src), *flag], check=True,
                          stdout=subprocess.PIPE, text=True).stdout.strip()
    got = rx.stdout.read().strip()
    if rx.wait(3600) != 0:
        raise RuntimeError("plain socket receiver failed")
    secs = time.perf_counter() - t0
    cpu = children_cpu() - cpu0
    if dest.stat().st_size != src.stat().st_size or sent != got:
        raise RuntimeError("plain socket copy has the wrong size or hash")
    dest.unlink()
    return secs, cpu


class Pair:
    def __init__(self, tmp: Path, cpus: tuple[str, str] | None = None):
        """`cpus`: the --cpus of the requestor (a) and the provider (b); None: both use all."""
        self.tmp = tmp
        env = dict(os.environ, KINODE_DIRECTORY=str(tmp / "directory.sqlite"))
        self.a_home, self.b_home = tmp / "a", tmp / "b"
        (self.b_home / FILES).mkdir(parents=True, exist_ok=True)
        a_extra, b_extra = (["--cpus", cpus[0]], ["--cpus", cpus[1]]) if cpus else ([], [])
        self.a = start_node("bench-a.dev", self.a_home, free_port(), env, a_extra)
        self.b = start_node("bench-b.dev", self.b_home, free_port(), env, b_extra)

    def cpu(self) -> tuple[float, float]:
        """CPU-seconds so far of the requestor and the provider."""
        return proc_cpu(self.a.pid), proc_cpu(self.b.pid)

    def download(self, name: str, timeout: float = 3600, sync: bool = False) -> float:
        if sync:
            os.sync()
        t0 = time.perf_counter()
        code, lines = run_remote(self.a_home, f"download:file_transfer:template.os {name} bench-b.dev",
                                 until=rf"{name} downloaded|error:", timeout=timeout)
        if code != 0:
            raise RuntimeError("\n".join(lines[-5:]))
        return time.perf_counter() - t0

    def stop(self) -> None:
        for p in (self.a, self.b):
            p.terminate()
            p.wait(10)


class Scp:
    """A private sshd on 127.0.0.1 and an `scp -c aes128-gcm` client for it; `start()` says whether
    sshd and scp are there."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.server: subprocess.Popen | None = None

    def start(self) -> bool:
        sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
        if sshd is None or shutil.which("scp") is None:
            return False
        d = self.dir = self.tmp / "ssh"
        d.mkdir()
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        self.port = free_port()
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin yes\nPasswordAuthentication no\n"
            f"StrictModes no\nUsePAM no\nPidFile {d}/sshd.pid\nSubsystem sftp internal-sftp\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        self.server = subprocess.Popen([sshd, "-D", "-f", str(d / "sshd_config"), "-E", str(d / "log")])
        time.sleep(0.5)
        return True

    def seconds(self, src: Path) -> float:
        """Time one copy of `src` (the copy is then deleted); `self.cpu` is then its CPU-seconds."""
        dest = self.tmp / "scp-copy.bin"
        os.sync()
        assert self.server is not None
        cpu0 = children_cpu() + proc_cpu(self.server.pid, children=True)
        t0 = time.perf_counter()
        subprocess.run(["scp", "-q", "-c", "aes128-gcm@openssh.com", "-P", str(self.port),
                        "-i", str(self.dir / "client_key"), "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                        str(src), f"{os.environ.get('USER', 'root')}@127.0.0.1:{dest}"], check=True)
        secs = time.perf_counter() - t0
        no_children(self.server.pid)
        self.cpu = children_cpu() + proc_cpu(self.server.pid, children=True) - cpu0
        dest.unlink()
        return secs

    def seconds_tree(self, src: Path) -> float:
        """Time one `scp -r` of the folder `src` (the copy is then deleted)."""
        dest = self.tmp / "scp-tree"
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["scp", "-q", "-r", "-c", "aes128-gcm@openssh.com", "-P", str(self.port),
                        "-i", str(self.dir / "client_key"), "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                        str(src), f"{os.environ.get('USER', 'root')}@127.0.0.1:{dest}"], check=True)
        secs = time.perf_counter() - t0
        shutil.rmtree(dest)
        return secs

    def rsync_seconds(self, src: Path) -> float | None:
        """Time one `rsync -a` of the folder `src` over this ssh (None without rsync)."""
        if shutil.which("rsync") is None:
            return None
        dest = self.tmp / "rsync-tree"
        ssh = (f"ssh -c aes128-gcm@openssh.com -p {self.port} -i {self.dir / 'client_key'} "
               "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["rsync", "-a", "-e", ssh, f"{src}/", f"{os.environ.get('USER', 'root')}@127.0.0.1:{dest}/"],
                       check=True)
        secs = time.perf_counter() - t0
        shutil.rmtree(dest)
        return secs

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(5)


def small_files(pair: Pair, count: int, concurrency: int = 8) -> float:
    digests = {}
    for i in range(count):
        data = os.urandom(4096)
        (pair.b_home / FILES / f"small{i}.bin").write_bytes(data)
        digests[f"small{i}.bin"] = data
    todo: queue.Queue[str] = queue.Queue()
    for name in digests:
        todo.put(name)
    failures: list[str] = []

    def worker() -> None:
        while True:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                return
            try:
                pair.download(name, timeout=120)
            except RuntimeError as e:
                failures.append(f"{name}: {e}")

    os.sync()  # the files just written, and earlier steps' writeback, are not this step's cost
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    bad = [n for n, d in digests.items() if (pair.a_home / FILES / n).read_bytes() != d]
    if failures or bad:
        raise RuntimeError(f"{len(failures)} failed, {len(bad)} differ: {(failures or bad)[:3]}")
    return secs


def small_files_batched(pair: Pair, count: int, per_command: int = 100, timeout: float = 600) -> float:
    """Download the files small_files() wrote, again, `per_command` names per `download` command."""
    names = [f"small{i}.bin" for i in range(count)]
    for n in names:
        (pair.a_home / FILES / n).unlink()
    t0 = time.perf_counter()
    for i in range(0, count, per_command):
        code, lines = run_remote(pair.a_home, f"download:file_transfer:template.os {' '.join(names[i:i + per_command])} "
                                 "bench-b.dev", wait=0.0)
        if code != 0:
            raise RuntimeError("\n".join(lines[-5:]))
    left = set(names)
    while left:  # a file takes its real name only once verified
        left = {n for n in left if not (pair.a_home / FILES / n).exists()}
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{len(left)} files never arrived")
        time.sleep(0.02)
    secs = time.perf_counter() - t0
    bad = [n for n in names if (pair.a_home / FILES / n).read_bytes() != (pair.b_home / FILES / n).read_bytes()]
    if bad:
        raise RuntimeError(f"{len(bad)} differ: {bad[:3]}")
    return secs


def make_folder(root: Path, count: int, size: int = 4096, subfolders: int = 10) -> dict:
    """`count` random files of `size` bytes spread over `subfolders` folders: {relative path: bytes}."""
    files = {f"d{i % subfolders}/f{i:05}.bin": os.urandom(size) for i in range(count)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def check_folder(root: Path, files: dict) -> None:
    bad = [rel for rel, data in files.items() if (root / rel).read_bytes() != data]
    if bad:
        raise RuntimeError(f"{len(bad)} files differ: {bad[:3]}")


def folders(tmp: Path, cpus, count: int, many: int, mixed_mib: int, rounds: int) -> None:
    pair = Pair(tmp / "folders", cpus)
    scp = Scp(tmp / "folders")
    if not scp.start():
        print("[5] scp -r: skipped (needs sshd: apt-get install openssh-server)")
        scp = None
    try:
        src = pair.b_home / FILES / "tree"
        files = make_folder(src, count)
        ratios = []
        for r in range(1, rounds + 1):
            secs = pair.download("tree", sync=True)
            check_folder(pair.a_home / FILES / "tree", files)
            shutil.rmtree(pair.a_home / FILES / "tree")
            line = f"[5] round {r}: folder of {count} files of 4 KiB in 10 subfolders: {secs:.2f} s (verified)"
            if scp is not None:
                theirs = scp.seconds_tree(src)
                ratios.append(secs / theirs)
                line += f"; scp -r -c aes128-gcm {theirs:.2f} s; time ours/scp {secs / theirs:.2f}"
                rsync = scp.rsync_seconds(src)
                if rsync is not None:
                    line += f"; rsync -a over ssh {rsync:.2f} s; time ours/rsync {secs / rsync:.2f}"
            print(line, flush=True)
        if ratios:
            print(f"[5] time ours/scp -r: median {statistics.median(ratios):.2f} (lowest {min(ratios):.2f}, "
                  f"highest {max(ratios):.2f})", flush=True)
        if mixed_mib > 0:
            big = pair.b_home / FILES / "mixed" / "big.bin"
            big.parent.mkdir(parents=True)
            write_random(big, mixed_mib << 20)
            shutil.copytree(src, pair.b_home / FILES / "mixed" / "small")
            os.link(big, pair.b_home / FILES / "alone.bin")
            mixed_ratios = []
            for r in range(1, rounds + 1):  # in turn: together, then apart
                together = pair.download("mixed", sync=True)
                check_folder(pair.a_home / FILES / "mixed" / "small", files)
                if sha256(pair.a_home / FILES / "mixed" / "big.bin") != sha256(big):
                    raise RuntimeError("big.bin differs")
                shutil.rmtree(pair.a_home / FILES / "mixed")
                t_big = pair.download("alone.bin", sync=True)
                (pair.a_home / FILES / "alone.bin").unlink()
                t_small = pair.download("tree", sync=True)
                shutil.rmtree(pair.a_home / FILES / "tree")
                mixed_ratios.append(together / (t_big + t_small))
                print(f"[5] round {r}: folder of {count} small files + one {mixed_mib} MiB file: {together:.2f} s; "
                      f"apart {t_big:.2f} + {t_small:.2f} = {t_big + t_small:.2f} s; time together/apart "
                      f"{mixed_ratios[-1]:.2f} (verified)", flush=True)
            print(f"[5] time together/apart: median {statistics.median(mixed_ratios):.2f} "
                  f"(lowest {min(mixed_ratios):.2f}, highest {max(mixed_ratios):.2f})", flush=True)
    finally:
        if scp is not None:
            scp.stop()
        pair.stop()
    if many > 0:  # on fresh nodes, so their peak memory is this step's
        pair = Pair(tmp / "many", cpus)
        try:
            files = make_folder(pair.b_home / FILES / "many", many)
            secs = pair.download("many", sync=True)
            check_folder(pair.a_home / FILES / "many", files)
            print(f"[5] folder of {many} files of 4 KiB: {secs:.2f} s, {many / secs:.0f} files/s (verified); peak RSS "
                  f"requestor {peak_rss_mib(pair.a.pid):.0f} MiB, provider {peak_rss_mib(pair.b.pid):.0f} MiB",
                  flush=True)
        finally:
            pair.stop()


def speed_vs_scp(pair: Pair, tmp: Path, gib: float, rounds: int) -> None:
    size = int(gib * (1 << 30))
    gibs = size / (1 << 30)
    src = pair.b_home / FILES / "one.bin"
    digest = write_random(src, size)
    scp = Scp(tmp)
    if not scp.start():
        print("[1] scp -c aes128-gcm: skipped (needs sshd: apt-get install openssh-server)")
        scp = None
    ours_all, plain_all, ratios, plain_ratios, sealed_all = [], [], [], [], []
    cpu_a, cpu_b, cpu_plain, cpu_scp, cpu_sealed = [], [], [], [], []
    try:
        for r in range(1, rounds + 1):
            a0, b0 = pair.cpu()
            secs = pair.download("one.bin", sync=True)
            a1, b1 = pair.cpu()
            assert sha256(pair.a_home / FILES / "one.bin") == digest, "hash mismatch"
            (pair.a_home / FILES / "one.bin").unlink()
            ours = size / secs / 2**20
            ours_all.append(ours)
            cpu_a.append((a1 - a0) / gibs)
            cpu_b.append((b1 - b0) / gibs)
            plain_secs, plain_cpu = plain_socket(src, tmp / "plain-copy.bin")
            plain = size / plain_secs / 2**20
            plain_all.append(plain)
            plain_ratios.append(ours / plain)
            cpu_plain.append(plain_cpu / gibs)
            sealed_secs, sealed_cpu = plain_socket(src, tmp / "sealed-copy.bin", sealed=True)
            sealed_all.append(size / sealed_secs / 2**20)
            cpu_sealed.append(sealed_cpu / gibs)
            line = (f"[1] round {r}: {gib:g} GiB download {secs:.2f} s, {ours:.0f} MiB/s (verified), CPU-s/GiB "
                    f"requestor {cpu_a[-1]:.2f} + provider {cpu_b[-1]:.2f}; plain socket {plain:.0f} MiB/s, "
                    f"CPU-s/GiB {cpu_plain[-1]:.2f}; ratio ours/plain {ours / plain:.2f}; sealed plain socket "
                    f"{sealed_all[-1]:.0f} MiB/s, CPU-s/GiB {cpu_sealed[-1]:.2f}")
            if scp is not None:
                theirs = size / scp.seconds(src) / 2**20
                ratios.append(ours / theirs)
                cpu_scp.append(scp.cpu / gibs)
                line += (f"; scp -c aes128-gcm {theirs:.0f} MiB/s, CPU-s/GiB {cpu_scp[-1]:.2f}; "
                         f"ratio ours/scp {ours / theirs:.2f}")
            print(line + f"; load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        if scp is not None:
            scp.stop()
        src.unlink()
    med = statistics.median
    ours_cpu = med([a + b for a, b in zip(cpu_a, cpu_b)])
    line = (f"[1] median of {rounds}: {med(ours_all):.0f} MiB/s, plain socket {med(plain_all):.0f}; ratio ours/plain "
            f"median {med(plain_ratios):.2f} (lowest {min(plain_ratios):.2f}, highest {max(plain_ratios):.2f})")
    if ratios:
        line += (f"; ratio ours/scp median {med(ratios):.2f} "
                 f"(lowest {min(ratios):.2f}, highest {max(ratios):.2f})")
    print(line)
    line = (f"[1] CPU-seconds per GiB, medians: ours {ours_cpu:.2f} (requestor {med(cpu_a):.2f}, provider "
            f"{med(cpu_b):.2f}), plain socket {med(cpu_plain):.2f} (ours/plain {ours_cpu / med(cpu_plain):.2f})")
    if cpu_scp:
        line += f", scp {med(cpu_scp):.2f} (ours/scp {ours_cpu / med(cpu_scp):.2f})"
    print(line, flush=True)
    print(f"[1] the floor: the plain socket sealed (AES-GCM both ways, a BLAKE3 on each end, nothing else) "
          f"{med(sealed_all):.0f} MiB/s ({med(sealed_all) / med(plain_all):.2f}x the plain socket's speed), "
          f"{med(cpu_sealed):.2f} CPU-s/GiB ({med(cpu_sealed) / med(cpu_plain):.2f}x its CPU; ours "
          f"{ours_cpu / med(cpu_sealed):.2f}x the floor's)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--big-gib", type=float, default=4.0)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of ours-then-scp for [1] and [5]")
    ap.add_argument("--folder", type=int, default=1000, help="files of 4 KiB in the folder of [5] (0: skip [5])")
    ap.add_argument("--folder-many", type=int, default=10000, help="files in [5]'s large folder (0: skip)")
    ap.add_argument("--mixed-mib", type=int, default=1024, help="the big file of [5]'s mixed folder (0: skip)")
    ap.add_argument("--shared-cpus", action="store_true",
                    help="let both nodes use every CPU instead of half each")
    args = ap.parse_args()
    cpus = None if args.shared_cpus else split_cpus()
    print("CPUs: " + (f"requestor node {cpus[0]}, provider node {cpus[1]}" if cpus
                      else f"both nodes share all {len(os.sched_getaffinity(0))}"), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    try:
        pair = Pair(tmp, cpus)
        try:
            if args.gib > 0:
                speed_vs_scp(pair, tmp, args.gib, args.rounds)
            if args.big_gib > 0:
                size = int(args.big_gib * (1 << 30))
                digest = write_random(pair.b_home / FILES / "big.bin", size)
                secs = pair.download("big.bin")
                assert sha256(pair.a_home / FILES / "big.bin") == digest, "hash mismatch"
                print(f"[2] {args.big_gib:g} GiB download: {secs:.2f} s, {size / secs / 2**20:.0f} MiB/s (verified); "
                      f"peak RSS requestor {peak_rss_mib(pair.a.pid):.0f} MiB, provider {peak_rss_mib(pair.b.pid):.0f} MiB")
                (pair.a_home / FILES / "big.bin").unlink()
                (pair.b_home / FILES / "big.bin").unlink()
            if args.small > 0:
                secs = small_files(pair, args.small)
                print(f"[3] {args.small} files of 4 KiB, 8 at a time: {secs:.1f} s, {args.small / secs:.1f} files/s "
                      f"(verified)")
                secs = small_files_batched(pair, args.small)
                print(f"[4] the same {args.small} files in commands of 100 names: {secs:.1f} s, "
                      f"{args.small / secs:.1f} files/s (verified)")
        finally:
            pair.stop()
        if args.folder > 0:
            folders(tmp, cpus, args.folder, args.folder_many, args.mixed_mib, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
