"""A peer that is not on the allow list floods a node while an allowed peer downloads from it.

    .venv/bin/python bench/flood.py [--count 400] [--size-mib 8] [--download-mib 256]

Two nodes (server, client) and a hand-driven flooder (tests/flooder.py) on this machine. The server
allows only the client. First the client downloads the file alone (the rate without a flood); then
the flooder sends --count ListFiles requests of --size-mib MiB each to the server's file_transfer
(each refused) and, once the first are refused, the client downloads the file again. Prints the
server's peak RSS (VmHWM, which must stay under 300 MB), both download rates, and how many flood
messages were refused (all must be). Every download is checked by hash.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import flooder as flooder_mod  # noqa: E402
from conftest import NodeProc, free_port, peak_rss_bytes, sha256, wait_for  # noqa: E402
from flooder import Flooder  # noqa: E402


def download(client: NodeProc, name: str) -> float:
    """Download `name` from server.dev; the rate (MiB/s) the node reports."""
    code, lines = client.run(f"download:file_transfer:template.os {name} server.dev",
                             until=rf"{re.escape(name)} downloaded|error:", timeout=900)
    if code != 0:
        raise RuntimeError(f"download failed: {lines[-3:]}")
    m = next(m for ln in lines if (m := re.search(r"downloaded from .*\(([\d.]+) MiB/s\)", ln)))
    return float(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--size-mib", type=int, default=8)
    p.add_argument("--download-mib", type=int, default=256)
    p.add_argument("--body-kib", type=int, default=256,
                   help="of each flood message, this much is JSON body (whitespace) the process parses "
                        "before it refuses; the rest is a blob")
    args = p.parse_args()
    flooder_mod.BODY_PAD = args.body_kib << 10
    tmp = Path(tempfile.mkdtemp(prefix="kinode-flood-"))
    env = dict(os.environ, KINODE_DIRECTORY=str(tmp / "directory.sqlite"), PYTHONUNBUFFERED="1")
    server = NodeProc("server.dev", tmp / "server.dev", free_port(), env, []).start()
    client = NodeProc("client.dev", tmp / "client.dev", free_port(), env, []).start()
    try:
        server.run("allow:file_transfer:template.os client.dev")
        server.files.mkdir(parents=True, exist_ok=True)
        with open(server.files / "big.bin", "wb") as f:
            for _ in range(args.download_mib):
                f.write(os.urandom(1 << 20))
        want = sha256(server.files / "big.bin")
        alone = download(client, "big.bin")
        assert sha256(client.files / "big.bin") == want
        (client.files / "big.bin").unlink()
        before = peak_rss_bytes(server)

        def refused() -> int:
            return sum("refused ListFiles from flood.dev" in ln for ln in server.lines)

        flooder = Flooder("flood.dev", tmp / "flood.dev", tmp / "directory.sqlite", server.net_port)
        start = time.monotonic()
        sender = flooder.flood("server.dev", args.count, args.size_mib << 20)
        wait_for(lambda: refused() >= 3, 120, "the first flood messages refused")
        during = download(client, "big.bin")
        in_flood = refused() < args.count
        assert sha256(client.files / "big.bin") == want, "the download during the flood differs"
        wait_for(lambda: refused() >= args.count, 1800, "every flood message refused", every=0.5)
        sender.join(60)
        took = time.monotonic() - start
        flooder.close()
        peak = peak_rss_bytes(server)
        holds = [ln for ln in server.lines if "not reading from it" in ln]
        print(f"flood: {args.count} x {args.size_mib} MiB ({args.body_kib} KiB of it JSON body) from a peer not "
              f"allowed, all {refused()} refused "
              f"in {took:.1f} s ({args.count * args.size_mib / took:.0f} MiB/s taken in)")
        print(f"server peak RSS: {peak / 1e6:.0f} MB (before the flood {before / 1e6:.0f} MB); limit 300 MB: "
              f"{'ok' if peak < 300e6 else 'OVER'}")
        print(f"download of {args.download_mib} MiB by the allowed peer: {alone:.0f} MiB/s alone, "
              f"{during:.0f} MiB/s during the flood{'' if in_flood else ' (the flood ended before it did)'}")
        print(f"server held the flooder back: {holds[-1].split(': ', 1)[-1] if holds else 'never'}")
        return 0 if peak < 300e6 else 1
    finally:
        server.stop()
        client.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
