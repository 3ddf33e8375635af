"""The same process built by two toolchains: the JavaScript guest (componentize-js) against its
Python twin (componentize-py), on one node, in turn.

    .venv/bin/python bench/guests.py [--rounds 2000] [--spawns 20] [--blob-mib 1] [--repeat 3]

Per guest: --rounds awaited requests to the VFS (a guest's cost per message, host included),
--spawns children started, asked once and let go (instantiation), and a --blob-mib blob written
and read back through the VFS. Prints each figure and the ratio JavaScript / Python (under 1: the
JavaScript guest is faster). Needs ./build.sh to have built tests/conformance/guests/.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GUESTS = REPO / "tests" / "conformance" / "guests"


class Node:
    def __init__(self, home: Path):
        env = dict(os.environ, KINODE_DIRECTORY=str(home / "directory.sqlite"), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "host", "--node", "fake.dev", "--home", str(home / "node"),
                                      "--port", "0", "--net-port", "0", "--packages", str(GUESTS)],
                                     cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: dict[tuple[str, str], dict] = {}   # steps read while waiting for another
        threading.Thread(target=self._pump, daemon=True).start()
        for lang in ("py", "js"):
            self.wait(lang, "ready", 120)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait(self, lang: str, step: str, timeout: float = 600) -> dict:
        rx = re.compile(r"^(py|js)guest:test.os: guest (\S+) (\{.*\})$")
        deadline = time.monotonic() + timeout
        while (lang, step) not in self.seen:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"the {lang} guest printed no {step!r} in {timeout} s") from None
            m = rx.match(line)
            if m:
                self.seen[(m.group(1), m.group(2))] = json.loads(m.group(3))
            elif line.startswith("error:"):
                print(f"  node: {line}", file=sys.stderr)
        return self.seen.pop((lang, step))

    def ask(self, lang: str, command: str, step: str) -> tuple[dict, float]:
        assert self.proc.stdin is not None
        t0 = time.perf_counter()
        self.proc.stdin.write(f'm fake.dev@guest:{lang}guest:test.os "{command}"\n')
        self.proc.stdin.flush()
        got = self.wait(lang, step)
        return got, time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--spawns", type=int, default=20)
    ap.add_argument("--blob-mib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measure per guest, in turn; medians shown")
    args = ap.parse_args()
    if not (GUESTS / "jsguest" / "pkg" / "guest.wasm").exists():
        print("build the guests first: ./build.sh (the JavaScript one needs npm)", file=sys.stderr)
        return 2
    blob = int(args.blob_mib * (1 << 20))
    with tempfile.TemporaryDirectory() as tmp:
        node = Node(Path(tmp))
        try:
            figures: dict[str, dict[str, list[float]]] = {"py": {}, "js": {}}
            for _ in range(args.repeat):
                for lang in ("py", "js"):  # in turn, so both meet the same load
                    f = figures[lang]
                    got, _ = node.ask(lang, f"rounds {args.rounds}", "rounds")
                    f.setdefault("rounds", []).append(got["ms"] / args.rounds * 1000)
                    got, _ = node.ask(lang, f"spawns {args.spawns}", "spawns")
                    assert got["ok"] == args.spawns, got
                    f.setdefault("spawns", []).append(got["ms"] / args.spawns)
                    got, secs = node.ask(lang, f"bigblob {blob}", "bigblob")
                    assert got["same"], got
                    f.setdefault("blob", []).append(secs)
        finally:
            node.stop()
    rows = [("rounds", f"awaited request to the VFS, µs each ({args.rounds})"),
            ("spawns", f"spawn + one request + exit, ms each ({args.spawns})"),
            ("blob", f"{args.blob_mib:g} MiB blob written and read back, s (guest's own checks included)")]
    print(f"medians of {args.repeat} runs, Python guest vs JavaScript guest, one node:")
    for key, what in rows:
        py, js = statistics.median(figures["py"][key]), statistics.median(figures["js"][key])
        print(f"  {what}: python {py:.2f}, javascript {js:.2f}, ratio js/py {js / py:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
