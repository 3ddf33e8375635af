"""Only what changed (components/file_transfer/common/ft_delta.py and host/vfs/delta.py): the
chunk-choosing machines wired together in memory with the host's real chunking, copying and
checking on real files; then real nodes, with the bytes the provider node sent counted by the OS."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from conftest import paused, release, wait_for

REPO = Path(__file__).resolve().parent.parent
COMMON = str(REPO / "components/file_transfer/common")
if COMMON not in sys.path:
    sys.path.insert(0, COMMON)

import ft_delta  # noqa: E402
import ft_folder  # noqa: E402, F401  (registers the folder machines, as the worker does)
import ft_multi  # noqa: E402  (registers the multi-source provider, as the worker does)
import ft_protocol as ft  # noqa: E402
from ft_common import EXT_CHUNK_SIZE  # noqa: E402

from host.kinode_types import Address  # noqa: E402
from host.messages import PackageId, ProcessId  # noqa: E402
from host.vfs import delta as host_delta  # noqa: E402
from host.vfs.store import Vfs  # noqa: E402

REQ_WORKER = Address.parse("alice.os@w1:file_transfer:template.os")
REQ_PARENT = Address.parse("alice.os@file_transfer:file_transfer:template.os")
PEER_MAIN = Address.parse("bob.os@file_transfer:file_transfer:template.os")
PROV_WORKER = Address.parse("bob.os@w2:file_transfer:template.os")
AVG = 4096   # small chunks, so a file of a few hundred KiB has many


def h(data: bytes) -> str:
    return blake3(data).hexdigest()


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def edited(old: bytes, seed: int = 1, changes: int = 4, insert: int = 20_000) -> bytes:
    """`old` with a few scattered small changes and a block inserted in the middle."""
    r = random.Random(seed)
    b = bytearray(old)
    for _ in range(changes):
        at = r.randrange(len(b) - 100)
        b[at:at + 100] = r.randbytes(100)
    mid = len(b) // 2
    return bytes(b[:mid]) + r.randbytes(insert) + bytes(b[mid:])


# ---- the pure parts --------------------------------------------------------------------------------
def chunks_of(tmp: Path, data: bytes, avg: int = AVG) -> list:
    p = tmp / f"c{h(data)[:8]}"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        records, whole, _, size = host_delta.chunk_list(fd, avg)
    finally:
        os.close(fd)
    assert whole == h(data) and size == len(data)
    return ft_delta.parse_list(records)


def test_an_insertion_or_removal_in_the_middle_moves_only_its_neighbourhood(tmp_path):
    old = rand(400_000, 1)
    new = old[:200_000] + rand(5000, 2) + old[200_000:]       # inserted
    copies, pieces = ft_delta.plan(chunks_of(tmp_path, new), chunks_of(tmp_path, old))
    fetched = sum(n for _, n, _ in pieces)
    assert 5000 <= fetched < 5000 + 4 * 4 * AVG    # the new bytes and at most the chunks they touch
    assert sum(n for _, _, n in copies) == len(new) - fetched
    # copies land at their new offsets and come from where the bytes are in the old copy
    for src, dst, n in copies:
        assert new[dst:dst + n] == old[src:src + n]
    cut = old[:150_000] + old[160_000:]                        # removed
    copies, pieces = ft_delta.plan(chunks_of(tmp_path, cut), chunks_of(tmp_path, old))
    assert sum(n for _, n, _ in pieces) < 4 * 4 * AVG
    assert len(copies) <= 3                                    # neighbours merged


def test_plan_covers_the_new_file_exactly_with_pieces_at_most_the_limit(tmp_path):
    old = rand(300_000, 3)
    new = edited(old, seed=4)
    new_list = chunks_of(tmp_path, new)
    copies, pieces = ft_delta.plan(new_list, chunks_of(tmp_path, old), piece_max=3 * AVG * 4)
    spans = sorted([(d, n) for _, d, n in copies] + [(o, n) for o, n, _ in pieces])
    pos = 0
    for off, n in spans:
        assert off == pos
        pos += n
    assert pos == len(new)
    for off, n, chunks in pieces:
        assert n <= 3 * AVG * 4 and sum(c[1] for c in chunks) == n and chunks[0][0] == off
        for c_off, c_n, digest in chunks:
            assert h(new[c_off:c_off + c_n]) == digest
    # nothing in common: every chunk fetched, no copy; an empty old copy is the same
    assert ft_delta.plan(new_list, chunks_of(tmp_path, rand(300_000, 9)))[0] == []
    assert sum(n for _, n, _ in ft_delta.plan(new_list, [])[1]) == len(new)


def test_batches_cut_the_want_list_into_messages():
    want = [[0, 10], [20, 10], [40, 30], [100, 5], [200, 100]]
    assert ft_delta.batches(want, limit=25) == [[0, 2], [2, 1], [3, 1], [4, 1]]
    assert ft_delta.batches(want, limit=1000) == [[0, 5]]
    assert ft_delta.batches([], limit=10) == []
    assert ft_delta.avg_for(1 << 30) == 64 << 10 and ft_delta.avg_for(64 << 30) == 512 << 10


def test_host_refuses_a_piece_that_does_not_match_and_writes_nothing(tmp_path):
    dst = tmp_path / "d"
    dst.write_bytes(bytes(100))
    fd = os.open(dst, os.O_WRONLY)
    try:
        good, bad = b"a" * 10, b"b" * 10
        with pytest.raises(host_delta.DeltaError, match="offset 50 .* failed its integrity check"):
            host_delta.write_ranges(fd, [[0, 10, h(good)], [50, 10, h(good)]], good + bad, 100)
        assert dst.read_bytes() == bytes(100)                   # nothing of the batch written
        host_delta.write_ranges(fd, [[0, 10, h(good)], [50, 10, h(bad)]], good + bad, 100)
        assert dst.read_bytes() == good + bytes(40) + bad + bytes(40)
    finally:
        os.close(fd)


def test_host_copy_refuses_an_old_copy_changed_since_it_was_chunked(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.write_bytes(rand(10_000, 5))
    dst.write_bytes(b"")
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        stamp = host_delta.stamp_of(os.fstat(sfd))
        assert host_delta.copy_ranges(sfd, dfd, [[100, 0, 500], [0, 500, 100]], stamp, 600) == 600
        assert dst.read_bytes() == src.read_bytes()[100:600] + src.read_bytes()[:100]
        with pytest.raises(host_delta.DeltaError, match="passes the old copy's end"):
            host_delta.copy_ranges(sfd, dfd, [[9_990, 0, 20]], stamp, 600)
        os.utime(src, ns=(1, 1))
        with pytest.raises(host_delta.DeltaError, match="changed since it was chunked"):
            host_delta.copy_ranges(sfd, dfd, [[0, 0, 10]], stamp, 600)
    finally:
        os.close(sfd)
        os.close(dfd)


@pytest.fixture
def reads(monkeypatch):
    """Every read of a file's bytes by the host's delta functions (they read with preadv)."""
    seen: list = []
    real = os.preadv

    def counting(fd, buffers, offset, *rest):
        seen.append(offset)
        return real(fd, buffers, offset, *rest)
    monkeypatch.setattr(os, "preadv", counting)
    return seen


def test_host_refuses_a_list_too_long_for_its_average_before_reading(tmp_path, reads, monkeypatch):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)
    fd = os.open(sparse, os.O_RDONLY)
    try:
        with pytest.raises(host_delta.DeltaError, match="too big for chunks of average size 4096"):
            host_delta.chunk_list(fd, 4096)
    finally:
        os.close(fd)
    assert reads == []
    # the average both ends use fits the bound for every size a delta download takes
    for size in (ft.DELTA_MAX, ft.DELTA_MAX - 1, 5 << 30, 1 << 30, (4 << 20) + 1):
        assert size // (ft_delta.avg_for(size) * 3 // 4) + 1 <= host_delta.MAX_CHUNKS == ft_delta.MAX_CHUNKS
    assert ft.DELTA_MAX <= host_delta.MAX_FILE
    # the bound is what refuses: with a small one, the same file is refused at one average, listed at another
    monkeypatch.setattr(host_delta, "MAX_CHUNKS", 100)
    small = tmp_path / "small"
    small.write_bytes(rand(400_000, 43))
    fd = os.open(small, os.O_RDONLY)
    try:
        with pytest.raises(host_delta.DeltaError, match="over 100 chunks"):
            host_delta.chunk_list(fd, 4096)
        assert reads == []
        records, whole, _, size = host_delta.chunk_list(fd, 16384)
    finally:
        os.close(fd)
    assert reads and whole == h(small.read_bytes())
    assert sum(n for n, _ in ft_delta.parse_list(records)) == size == 400_000


def test_host_keeps_a_files_whole_hash_by_its_stamp(tmp_path, reads):
    p = tmp_path / "f"
    data = rand(300_000, 44)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        stamp = host_delta.stamp_of(os.fstat(fd))
        assert host_delta.blake3_file(fd, want_stamp=stamp) == h(data) and reads   # read once
        reads.clear()
        assert host_delta.blake3_file(fd, want_stamp=stamp) == h(data) and reads == []   # then from memory
        os.utime(p, ns=(7, 7))      # a new stamp: read again
        with pytest.raises(host_delta.DeltaError, match="changed since it was opened"):
            host_delta.blake3_file(fd, want_stamp=stamp)
        assert host_delta.blake3_file(fd, want_stamp=host_delta.stamp_of(os.fstat(fd))) == h(data) and reads
    finally:
        os.close(fd)



def test_host_chunks_and_hashes_a_file_whole_in_one_read(tmp_path, reads):
    p = tmp_path / "f"
    data = rand(300_000, 51)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        records, whole, stamp, _ = host_delta.chunk_list(fd, AVG)
        assert whole == h(data) and reads.count(0) == 1          # the file read from its start once
        assert sorted(reads) == reads                            # one pass, in order
        reads.clear()                                            # and the provider's HashWhole finds it kept
        assert host_delta.blake3_file(fd, want_stamp=stamp) == h(data) and reads == []
        host_delta.forget(stamp)                                 # the control: not kept, it reads again
        assert host_delta.blake3_file(fd, want_stamp=stamp) == h(data) and reads
    finally:
        os.close(fd)


def test_host_builds_the_file_and_hashes_what_it_wrote(tmp_path, small_avg, monkeypatch):
    """build_file copies the old copy's ranges between the pieces already written and hashes the new
    file whole in order: a piece that was never written shows in the hash, and so does an old copy
    whose bytes are not what its chunk list said."""
    old = rand(400_000, 52)
    new = edited(old, seed=53, changes=5, insert=25_000)
    copies, pieces = ft_delta.plan(chunks_of(tmp_path, new), chunks_of(tmp_path, old))
    assert copies and len(pieces) >= 2
    src = tmp_path / "old"
    src.write_bytes(old)

    def build(skip: int | None = None, basis: bytes = old) -> tuple:
        src.write_bytes(basis)
        dst = tmp_path / "new.part"
        dst.write_bytes(b"")
        sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
        try:
            for i, (_, _, items) in enumerate(pieces):
                if i != skip:
                    host_delta.write_ranges(dfd, items, b"".join(new[o:o + n] for o, n, _ in items), len(new))
            stamp = host_delta.stamp_of(os.fstat(sfd))
            return host_delta.build_file(sfd, dfd, copies, stamp, len(new)), dst.read_bytes()
        finally:
            os.close(sfd)
            os.close(dfd)
    digest, built = build()
    assert built == new and digest == h(new)                    # the control
    skipped = pieces[1] if pieces[1][0] + pieces[1][1] < len(new) else pieces[0]
    digest, built = build(skip=pieces.index(skipped))           # a hole where a piece should be
    assert built != new and digest == h(built) != h(new)
    flipped = bytearray(old)
    flipped[copies[0][0] + 7] ^= 1                              # an old copy that is not what was listed
    digest, built = build(basis=bytes(flipped))
    assert digest == h(built) != h(new)
    # small buffers: the copy and the hash still run in order across many of them, written behind
    monkeypatch.setattr(host_delta, "BUILD_PIECE", 1000)
    monkeypatch.setattr(host_delta, "WRITE_BEHIND", 5000)
    digest, built = build()
    assert built == new and digest == h(new)


def test_host_build_refuses_a_changed_old_copy_and_ranges_out_of_order(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.write_bytes(rand(10_000, 54))
    dst.write_bytes(b"")
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    try:
        stamp = host_delta.stamp_of(os.fstat(sfd))
        with pytest.raises(host_delta.DeltaError, match="must not overlap"):
            host_delta.build_file(sfd, dfd, [[0, 500, 100], [0, 0, 100]], stamp, 600)
        with pytest.raises(host_delta.DeltaError, match="passes the new file's size"):
            host_delta.build_file(sfd, dfd, [[0, 0, 700]], stamp, 600)
        assert dst.read_bytes() == b""                          # nothing written
        assert host_delta.build_file(sfd, dfd, [[100, 0, 500], [0, 500, 100]], stamp, 600) == \
            h(src.read_bytes()[100:600] + src.read_bytes()[:100])   # the control
        os.utime(src, ns=(1, 1))
        with pytest.raises(host_delta.DeltaError, match="changed since it was chunked"):
            host_delta.build_file(sfd, dfd, [[0, 0, 10]], stamp, 600)
    finally:
        os.close(sfd)
        os.close(dfd)

def test_provider_takes_only_the_average_its_file_size_calls_for():
    size = 6 << 20

    def answered(avg: Any) -> list:
        prov = ft.Provider("f.bin", REQ_WORKER, PEER_MAIN, 0.0, extended=True)
        prov.handle(ft.Start())
        offer = prov.handle(ft.Opened(size, "1:2:3:4:5", 0.0, delta=True))
        assert offer[-1].metadata == {"ft": 1, "delta": 1, "multi": 1}
        return prov.handle(ft.GotResponse("size", None, {"ft": 1, "offset": 0, "delta": {"avg": avg}}, 0.0))
    for avg in (4096, 8192, ft_delta.avg_for(size) * 2, 1 << 20, 0, "65536"):
        actions = answered(avg)
        errors = [a.metadata["error"] for a in actions if isinstance(a, ft.Send) and (a.metadata or {}).get("error")]
        assert errors == ["bad delta request"], (avg, actions)
        assert isinstance(actions[-1], ft.Exit) and not any(isinstance(a, ft_delta.ChunkFile) for a in actions)
    actions = answered(ft_delta.avg_for(size))       # the control: the one average is taken
    assert ft_delta.ChunkFile(ft_delta.avg_for(size)) in actions and not isinstance(actions[-1], ft.Exit)


@pytest.mark.parametrize("multi", [False, True])
def test_provider_refuses_a_piece_longer_than_a_chunk_message(multi):
    """Honest pieces are whole chunks of at most EXT_CHUNK_SIZE: a longer one would be read whole into
    memory and sit in the send queue beyond the window's budget, so it is a bad list."""
    size = 64 << 20
    avg = ft_multi.MULTI_AVG if multi else ft_delta.avg_for(size)

    def asked(want: list) -> list:
        prov = ft.Provider("f.bin", REQ_WORKER, PEER_MAIN, 0.0, extended=True)
        prov.handle(ft.Start())
        prov.handle(ft.Opened(size, "1:2:3:4:5", 0.0, delta=True))
        delta = {"avg": avg, **({"multi": 1} if multi else {})}
        switch = prov.handle(ft.GotResponse("size", None, {"ft": 1, "offset": 0, "delta": delta}, 0.0))[0]
        machine = switch.machine
        machine.handle(ft_delta.FileChunked({"count": 64, "size": size, "stamp": "1:2:3:4:5"}, 0.0))
        return machine.handle(ft.GotResponse("chunks", None, {"ft": 1, "want": want}, 0.0))

    def refused(actions: list) -> bool:
        return any(isinstance(a, ft.Send) and (a.metadata or {}).get("error") == "bad list of pieces" for a in actions)
    for want in ([[0, EXT_CHUNK_SIZE + 1]], [[0, 100], [1 << 20, 10 << 20]]):
        actions = asked(want)
        assert refused(actions) and isinstance(actions[-1], ft.Exit), (want, actions)
    actions = asked([[0, EXT_CHUNK_SIZE], [8 << 20, 100]])   # the control: a whole message's worth is read
    assert not refused(actions) and not isinstance(actions[-1], ft.Exit), actions


@pytest.mark.parametrize("multi", [False, True])
def test_provider_waits_for_the_want_list_as_long_as_a_slow_disk_takes_to_chunk_the_old_copy(multi):
    """While the requestor's host chunks its old copy its worker is blocked (no keepalives): a provider
    with a big file waits longer than ACK_TIMEOUT for the first want list, then gives up."""
    size = 8 << 30
    wait = ft_delta.list_wait(size)
    assert wait == ft.ACK_TIMEOUT + size // ft_delta.LIST_RATE and wait > ft.STALL_TIMEOUT + 60

    def listed() -> tuple:
        prov = ft.Provider("f.bin", REQ_WORKER, PEER_MAIN, 0.0, extended=True)
        prov.handle(ft.Start())
        prov.handle(ft.Opened(size, "1:2:3:4:5", 0.0, delta=True))
        avg = ft_multi.MULTI_AVG if multi else ft_delta.avg_for(size)
        delta = {"avg": avg, **({"multi": 1} if multi else {})}
        machine = prov.handle(ft.GotResponse("size", None, {"ft": 1, "offset": 0, "delta": delta}, 0.0))[0].machine
        out = machine.handle(ft_delta.FileChunked({"count": 8192, "size": size, "stamp": "1:2:3:4:5"}, 0.0))
        return machine, next(a for a in out if isinstance(a, ft.Send) and a.context == "chunks")
    machine, sent = listed()
    assert sent.timeout == wait, sent
    tick = ft.SendFailed("tick", "timeout", ft.STALL_TIMEOUT + 1.0)
    assert not any(isinstance(a, ft.Exit) for a in machine.handle(tick)), machine.state   # still waiting
    late = machine.handle(ft.SendFailed("tick", "timeout", wait + 1.0))
    assert isinstance(late[-1], ft.Exit) and machine.state == machine.FAILED, late
    # the control: once the list is answered, the usual STALL_TIMEOUT holds again
    machine, _ = listed()
    machine.handle(ft.GotResponse("chunks", None, {"ft": 1, "want": [[0, 100]]}, 1.0))
    assert machine.state != machine.LISTED
    stalled = machine.handle(ft.SendFailed("tick", "timeout", ft.STALL_TIMEOUT + 2.0))
    assert isinstance(stalled[-1], ft.Exit), stalled


OWNER = ProcessId("p", "app", "pub.os")
DRIVE = "/app:pub.os/data"


def vfs_at(tmp_path: Path, delta: bool = True) -> tuple:
    """A VFS with one drive: -> (vfs, the drive's real folder)."""
    v = Vfs(tmp_path / "vfs", delta)
    assert vfs_call(v, DRIVE, "CreateDrive") == "Ok"
    return v, v.drive_path(PackageId("app", "pub.os"), "data")


def vfs_call(v: Vfs, path: str, action: Any, blob: bytes | None = None) -> Any:
    return json.loads(v.handle(OWNER, lambda params: False, json.dumps({"path": path, "action": action}).encode(),
                               blob).body)


def test_vfs_refuses_ranges_out_of_order_or_past_the_size_and_writes_nothing(tmp_path):
    v, real = vfs_at(tmp_path)
    old = rand(300_000, 45)
    new = edited(old, seed=46, insert=30_000)
    (real / "old").write_bytes(old)
    (real / "new.part").write_bytes(b"")
    copies, pieces = ft_delta.plan(chunks_of(tmp_path, new), chunks_of(tmp_path, old))
    assert copies and pieces
    stamp = vfs_call(v, f"{DRIVE}/old", {"ChunkList": {"avg": 0}})["ChunkList"]["stamp"]

    def copy(items: list, size: Any) -> Any:
        return vfs_call(v, f"{DRIVE}/new.part", {"CopyRanges": {"from": f"{DRIVE}/old", "stamp": stamp, "size": size,
                                                                "items": items}})
    for items, size, why in [
            ([[0, 0, 1000], [0, 1 << 40, 1000]], len(new), "passes the new file's size"),
            ([[0, 0, 100_000]] * 1000, 100_000_000, "must not overlap"),     # one message, gigabytes
            ([[0, 1000, 10], [0, 0, 10]], len(new), "must not overlap"),
            ([[0, 0, 10]], (8 << 30) + 1, "size must be between 0 and"),
            ([[0, 0, 10]], None, "size must be an integer")]:
        body = copy(items, size)
        assert "Err" in body and why in json.dumps(body), (items[:2], body)
        assert (real / "new.part").stat().st_size == 0          # untouched
    assert copy(copies, len(new)) == "Ok"                       # the control: plan's own output

    def write(items: list, data: bytes, size: Any = None) -> Any:
        size = len(new) if size is None else size
        return vfs_call(v, f"{DRIVE}/new.part", {"WriteRanges": {"size": size, "items": items}}, data)
    before = (real / "new.part").read_bytes()
    ten = b"x" * 10
    for items, size, why in [
            ([[1 << 62, 10, h(ten)]], len(new), "passes the new file's size"),
            ([[1 << 62, 10, h(ten)]], 1 << 63, "size must be between"),
            ([[0, 10, h(ten)], [5, 10, h(ten)]], len(new), "must not overlap")]:
        body = write(items, ten * len(items), size)
        assert "Err" in body and why in json.dumps(body), body
        assert (real / "new.part").read_bytes() == before       # untouched
    for _, _, chunks in pieces:                                 # the control: plan's own pieces
        data = b"".join(new[o:o + n] for o, n, _ in chunks)
        assert write(chunks, data) == "Ok"
    assert (real / "new.part").read_bytes() == new



def test_vfs_builds_the_file_whole_after_its_pieces_and_answers_its_hash(tmp_path):
    v, real = vfs_at(tmp_path)
    old = rand(300_000, 55)
    new = edited(old, seed=56, insert=30_000)
    (real / "old").write_bytes(old)
    copies, pieces = ft_delta.plan(chunks_of(tmp_path, new), chunks_of(tmp_path, old))
    stamp = vfs_call(v, f"{DRIVE}/old", {"ChunkList": {"avg": 0}})["ChunkList"]["stamp"]

    def build(items: list, skip_last: bool = False) -> tuple:
        (real / "new.part").write_bytes(b"")
        for _, _, chunks in pieces[:-1] if skip_last else pieces:
            data = b"".join(new[o:o + n] for o, n, _ in chunks)
            assert vfs_call(v, f"{DRIVE}/new.part", {"WriteRanges": {"size": len(new), "items": chunks}}, data) == "Ok"
        before = (real / "new.part").read_bytes()
        return vfs_call(v, f"{DRIVE}/new.part", {"CopyRanges": {"from": f"{DRIVE}/old", "stamp": stamp,
                                                                "size": len(new), "items": items, "whole": True}}), before
    assert build(copies)[0] == {"Blake3": h(new)} and (real / "new.part").read_bytes() == new   # the control
    # a piece missing: where the file is still short there, a refusal; where it is a hole, another hash
    body, _ = build(copies, skip_last=True)
    assert ("Err" in body and "before its size" in json.dumps(body)) or body["Blake3"] != h(new), body
    (real / "new.part").write_bytes(b"")
    os.truncate(real / "new.part", len(new))                    # all of it a hole but for one copied range
    one = [c for c in copies if c[1] > 0][0]
    body = vfs_call(v, f"{DRIVE}/new.part", {"CopyRanges": {"from": f"{DRIVE}/old", "stamp": stamp, "size": len(new),
                                                            "items": [one], "whole": True}})
    assert body["Blake3"] == h((real / "new.part").read_bytes()) != h(new)   # a hole reads as zeros, hashed so
    body, before = build([[0, 0, 10], [0, 5, 10]])              # the bounds hold with `whole` too
    assert "Err" in body and "must not overlap" in json.dumps(body)
    assert (real / "new.part").read_bytes() == before           # nothing written


def test_vfs_copies_the_old_copy_into_the_partial_while_chunking_it_and_builds_on_that(tmp_path, monkeypatch):
    monkeypatch.setattr(host_delta, "PRECOPY_STEP", 8192)     # many copies behind the reader
    monkeypatch.setattr(host_delta, "PRECOPY_LAG", 1000)      # however far behind, all of it (see the next test)
    v, real = vfs_at(tmp_path)
    old = rand(300_000, 61)
    new = edited(old, seed=62, insert=30_000)
    (real / "old").write_bytes(old)
    (real / "new.part").write_bytes(b"")

    def chunk(size: Any = None, **extra) -> Any:
        return vfs_call(v, f"{DRIVE}/old", {"ChunkList": {"avg": AVG, "whole": False, "copy_to": f"{DRIVE}/new.part",
                                                          "copy_size": len(new) if size is None else size, **extra}})
    for extra, why in [({"copy_to": f"{DRIVE}/old"}, "into itself"),
                       ({"copy_to": "/other:pub.os/data/x"}, "NoCap"),
                       ({"whole": True}, "without the whole hash"),
                       ({"copy_size": -1}, "copy_size must be between")]:
        body = chunk(**extra)
        assert "Err" in body and why in json.dumps(body), (extra, body)
        assert (real / "new.part").read_bytes() == b"" and (real / "old").read_bytes() == old   # untouched
    reads: list = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, at: reads.append(at) or real_preadv(fd, bufs, at))
    body = chunk()
    info = body["ChunkList"]
    assert info["copied"] == len(old) and (real / "new.part").read_bytes() == old   # all of it, where it was
    assert reads                                               # it was read to be chunked
    copies, pieces = ft_delta.plan(chunks_of(tmp_path, new), chunks_of(tmp_path, old))
    assert info["count"] == len(chunks_of(tmp_path, old))     # the same list as without the copy
    for _, _, items in pieces:
        data = b"".join(new[o:o + n] for o, n, _ in items)
        assert vfs_call(v, f"{DRIVE}/new.part", {"WriteRanges": {"size": len(new), "items": items}}, data) == "Ok"

    def build(in_place: int) -> Any:
        return vfs_call(v, f"{DRIVE}/new.part", {"CopyRanges": {"from": f"{DRIVE}/old", "stamp": info["stamp"],
                                                                "size": len(new), "items": copies, "whole": True,
                                                                "in_place": in_place}})
    assert build(info["copied"]) == {"Blake3": h(new)} and (real / "new.part").read_bytes() == new
    # the list is kept now: chunked again, the file is not read, so nothing is copied (the build copies)
    (real / "new.part").write_bytes(b"")
    reads.clear()
    again = chunk()["ChunkList"]
    monkeypatch.setattr(os, "preadv", real_preadv)
    assert again["copied"] == 0 and (real / "new.part").read_bytes() == b"" and not reads
    assert again["count"] == info["count"] and again["stamp"] == info["stamp"]
    # a claim of more in place than is there: the hash is of what is read back, so it cannot pass
    os.truncate(real / "new.part", len(new))
    assert build(len(new))["Blake3"] != h(new)
    # a new file shorter than the old copy: the copy stops at its size
    host_delta.forget(info["stamp"])
    (real / "new.part").write_bytes(b"")
    assert chunk(size=100_000)["ChunkList"]["copied"] == 100_000 and (real / "new.part").read_bytes() == old[:100_000]


def test_vfs_a_long_write_into_one_file_holds_up_no_other_file(tmp_path):
    v, real = vfs_at(tmp_path)
    # two files that shared a lock when 64 locks were shared by every file (by device and inode)
    seen: dict = {}
    for i in range(200):
        (real / f"f{i}").write_bytes(b"")
        st = (real / f"f{i}").stat()
        bucket = hash((st.st_dev, st.st_ino)) % 64
        if bucket in seen:
            a, b = seen[bucket], f"f{i}"
            break
        seen[bucket] = f"f{i}"
    fd = os.open(real / a, os.O_RDONLY)
    answers: list = []
    done = threading.Event()

    def write_b() -> None:
        answers.append(vfs_call(v, f"{DRIVE}/{b}", "Write", b"hi"))
        done.set()
    try:
        with v._ino_lock(fd):          # as a long CopyRanges or ChunkList copy_to into `a` holds it
            writer = threading.Thread(target=write_b)
            writer.start()
            assert done.wait(30), "a write into another file waited for this one's lock"
        writer.join(30)
    finally:
        os.close(fd)
    assert "Err" not in json.dumps(answers) and (real / b).read_bytes() == b"hi"
    # the control: the same file's lock is one lock, so a write into `a` takes its turn after it
    body = vfs_call(v, f"{DRIVE}/{a}", "Write", b"yo")
    assert "Err" not in json.dumps(body) and (real / a).read_bytes() == b"yo" and not v._ino_locks


def test_vfs_build_answers_the_files_hash_only_with_a_read_capability(tmp_path):
    v, real = vfs_at(tmp_path)
    (real / "old").write_bytes(b"old")
    (real / "secret").write_bytes(b"1234")
    stamp = vfs_call(v, f"{DRIVE}/old", {"ChunkList": {"avg": 0}})["ChunkList"]["stamp"]
    other = ProcessId("q", "spy", "pub.os")
    action = {"CopyRanges": {"from": f"{DRIVE}/old", "stamp": stamp, "size": 4, "items": [], "whole": True}}
    request = json.dumps({"path": f"{DRIVE}/secret", "action": action}).encode()

    def as_spy(caps: set) -> Any:
        return json.loads(v.handle(other, lambda p: (p.get("kind"), p.get("drive")) in caps, request, None).body)
    write_only = {("write", DRIVE), ("read", DRIVE + "-not")}
    body = as_spy(write_only)                   # a write capability alone does not tell the file's hash
    assert "NoCap" in json.dumps(body) and "Blake3" not in json.dumps(body), body
    body = as_spy({("write", DRIVE), ("read", DRIVE)})           # the control: with a read capability too
    assert body == {"Blake3": h(b"1234")}
    assert (real / "secret").read_bytes() == b"1234"


def test_host_copy_while_chunking_stops_when_it_falls_behind_and_the_build_copies_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(host_delta, "PRECOPY_STEP", 8192)
    monkeypatch.setattr(host_delta, "PRECOPY_LAG", 3)
    old = rand(200_000, 64)
    new = edited(old, seed=65, insert=20_000)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(b"")
    read_all = threading.Event()
    real_readinto = host_delta._Reader.readinto

    def readinto(self, buf) -> int:
        n = real_readinto(self, buf)
        if n == 0:
            read_all.set()
        return n
    real_copy = os.copy_file_range

    def slow_disk(*args):      # no copy gets done before the chunker has read the whole file
        assert read_all.wait(30)
        return real_copy(*args)
    monkeypatch.setattr(host_delta._Reader, "readinto", readinto)
    monkeypatch.setattr(os, "copy_file_range", slow_disk)
    src, dst = os.open(tmp_path / "old", os.O_RDONLY), os.open(tmp_path / "new", os.O_RDWR)
    try:
        records, stamp, size, copied = host_delta.chunk_and_copy(src, AVG, dst, len(new))
        monkeypatch.setattr(os, "copy_file_range", real_copy)
        assert 0 < copied < len(old) // 2 and (tmp_path / "new").read_bytes() == old[:copied]   # the steps queued
        assert ft_delta.parse_list(records) == chunks_of(tmp_path, old)                  # the list is whole
        copies, pieces = ft_delta.plan(chunks_of(tmp_path, new), ft_delta.parse_list(records))
        for _, _, items in pieces:
            host_delta.write_ranges(dst, items, b"".join(new[o:o + n] for o, n, _ in items), len(new))
        assert host_delta.build_file(src, dst, copies, stamp, len(new), copied) == h(new)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "new").read_bytes() == new


def test_host_copy_while_chunking_stops_at_a_full_disk_and_the_chunking_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(host_delta, "PRECOPY_STEP", 8192)
    old = rand(200_000, 63)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(b"")
    calls = []
    real_copy = os.copy_file_range

    def full_after_two(src, dst, n, a, b):
        calls.append(n)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, n, a, b)
    monkeypatch.setattr(os, "copy_file_range", full_after_two)
    src, dst = os.open(tmp_path / "old", os.O_RDONLY), os.open(tmp_path / "new", os.O_WRONLY)
    try:
        records, stamp, size, copied = host_delta.chunk_and_copy(src, AVG, dst, len(old))
    finally:
        os.close(src)
        os.close(dst)
    assert len(calls) > 2                                       # the disk did fill up mid-way
    assert 0 < copied < len(old) and (tmp_path / "new").read_bytes()[:copied] == old[:copied]
    assert ft_delta.parse_list(records) == chunks_of(tmp_path, old) and size == len(old)   # the list is whole


def test_vfs_rename_over_a_big_file_frees_it_after_answering(tmp_path, monkeypatch):
    import host.vfs.store as store
    monkeypatch.setattr(store, "RELEASE_LATER", 10_000)
    v, real = vfs_at(tmp_path)
    (real / "old").write_bytes(rand(20_000, 57))
    (real / "small").write_bytes(b"x")
    (real / "linked").write_bytes(rand(20_000, 58))
    os.link(real / "linked", real / "linked2")
    fd = store._hold_big_file(str(real / "old"))
    assert fd is not None                                        # the control: a big file is held
    os.close(fd)
    for name in ("small", "linked", "missing"):                  # small, or with another name: not held
        assert store._hold_big_file(str(real / name)) is None
    new = rand(30_000, 59)
    (real / "new").write_bytes(new)

    def open_deleted() -> list:
        found = []
        for name in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue
            if target.endswith(" (deleted)") and str(real) in target:
                found.append(target)
        return found
    (real / "gone").write_bytes(b"y")                            # the control: an open deleted file is seen
    held = os.open(real / "gone", os.O_RDONLY)
    os.unlink(real / "gone")
    assert open_deleted()
    os.close(held)
    assert open_deleted() == []
    assert vfs_call(v, f"{DRIVE}/new", {"Rename": {"new_path": f"{DRIVE}/old"}}) == "Ok"
    assert (real / "old").read_bytes() == new and not (real / "new").exists()
    v._releaser.submit(lambda: None).result()                    # the release ran: nothing of it is left open
    assert open_deleted() == []
    # the releaser held up: at most RELEASE_PENDING replaced files wait for it, the rest are freed at once
    gate = threading.Event()
    v._releaser.submit(gate.wait)
    try:
        for i in range(store.RELEASE_PENDING + 3):
            (real / f"old{i}").write_bytes(rand(20_000, 60 + i))
            (real / f"new{i}").write_bytes(b"n")
            assert vfs_call(v, f"{DRIVE}/new{i}", {"Rename": {"new_path": f"{DRIVE}/old{i}"}}) == "Ok"
        assert len(open_deleted()) == store.RELEASE_PENDING, open_deleted()   # the control: those wait, held
    finally:
        gate.set()
    v._releaser.submit(lambda: None).result()
    assert open_deleted() == [] and v._releasing == 0

def test_vfs_with_delta_off_answers_no_delta_action(tmp_path):
    for on in (False, True):
        v, real = vfs_at(tmp_path / str(on), delta=on)
        (real / "f").write_bytes(b"abc")
        body = vfs_call(v, f"{DRIVE}/f", {"Blake3": {"sync": False, "stamp": None}})
        if on:   # the control
            assert body == {"Blake3": h(b"abc")}
        else:
            assert "Err" in body and "turned off on this node (KINODE_DELTA=0)" in json.dumps(body), body
            assert "Err" in vfs_call(v, f"{DRIVE}/f", {"ChunkList": {"avg": 0}})


# ---- the machines, wired in memory ----------------------------------------------------------------
@dataclass
class Sim:
    """Both workers of a download of NAME, the requestor holding `old` (or nothing) as the file of that
    name, the provider `new`; the host's delta functions do the I/O on real files."""
    tmp: Path
    new: bytes
    old: bytes | None
    prov_delta: bool = True            # the provider's host can chunk
    lie_at: int | None = None          # the provider corrupts the piece holding this offset
    old_is_partial: bool = False       # the old copy is a partial download (of another version)
    sent: int = 0                      # blob bytes the provider sent
    logs: list = field(default_factory=list)
    progress: list = field(default_factory=list)
    exits: dict = field(default_factory=dict)
    queue: list = field(default_factory=list)

    def __post_init__(self):
        self.rdir = self.tmp / "req"
        self.rdir.mkdir()
        self.final = self.rdir / "f.bin"
        self.part = self.rdir / "f.bin.part"
        self.aside = self.rdir / "f.bin.basis"
        self.basis = self.final
        if self.old is not None:
            (self.part if self.old_is_partial else self.final).write_bytes(self.old)
        self.pfile = self.tmp / "prov.bin"
        self.pfile.write_bytes(self.new)
        self.machines: dict[str, Any] = {"req": ft.Requestor("f.bin", PEER_MAIN, REQ_PARENT, 0.0, extended=True)}
        self.blob: dict[str, bytes | None] = {"req": None, "prov": None}
        self.current: dict[str, Any] = {"req": None, "prov": None}
        self.chain = blake3()

    def run(self) -> Sim:
        self.act("req", self.machines["req"].handle(ft.Start()))
        while self.queue:
            who, ev, blob, msg = self.queue.pop(0)
            if who in self.exits:
                continue
            self.blob[who], self.current[who] = blob, msg
            self.act(who, self.machines[who].handle(ev))
        return self

    def post(self, me: str, target: Any, ev: Any, blob: bytes | None, msg: Any) -> None:
        if target == PEER_MAIN and me == "prov":
            pass                  # the provider's word to its parent about its serving slot
        elif target == PEER_MAIN:   # the provider's file_transfer: accepts and starts a worker
            self.queue.append(("req", ft.GotResponse("download", {"Download": {"Ok": None}}, {}, 0.0), None, None))
            # a new provider worker: what was on its way to the old one ends with it
            self.queue = [q for q in self.queue if q[0] != "prov"]
            self.exits.pop("prov", None)
            self.machines["prov"] = ft.Provider("f.bin", REQ_WORKER, PEER_MAIN, 0.0, extended=True)
            self.act("prov", self.machines["prov"].handle(ft.Start()))
        elif target == REQ_PARENT:
            self.progress.append(ev.meta)
        elif target in (REQ_WORKER, PROV_WORKER):
            if me == "prov" and blob is not None:
                self.sent += len(blob)
            self.queue.append(("req" if target == REQ_WORKER else "prov", ev, blob, msg))

    def act(self, who: str, actions: list) -> None:
        me, peer = (REQ_WORKER, PROV_WORKER) if who == "req" else (PROV_WORKER, REQ_WORKER)
        while actions:
            follow = None
            for a in actions:
                assert follow is None, "an action with a result must be the last of its list"
                if isinstance(a, ft.Exit):
                    self.exits[who] = a.error
                    return
                if isinstance(a, ft.Send):
                    blob = self.blob[who] if a.forward_blob else None
                    target = a.target
                    ev = ft.GotRequest(me, a.body, dict(a.metadata or {}), 0.0, a.timeout is not None,
                                       None if blob is None else len(blob))
                    self.post(who, target, ev, blob, (me, a.context))
                elif isinstance(a, ft.Reply):
                    source, context = self.current[who]
                    self.post(who, source, ft.GotResponse(context, a.body, dict(a.metadata or {}), 0.0), None, None)
                elif isinstance(a, ft.Log):
                    self.logs.append(a.text)
                elif isinstance(a, (ft.ArmTimer, ft.SaveState)):
                    pass
                elif isinstance(a, ft.SwitchToDelta):
                    self.machines[who] = a.machine
                else:
                    try:
                        follow = self.perform(who, a)
                    except (OSError, host_delta.DeltaError) as e:
                        follow = self.machines[who].handle(ft.IoFailed(str(e), 0.0))
                        break
            actions = follow

    def perform(self, who: str, a: Any) -> list | None:
        m = self.machines[who]
        if isinstance(a, ft.LoadState):
            basis = None
            for path, partial in ((self.final, False), (self.part, True)):
                if path.exists():
                    basis = {"size": path.stat().st_size, "stamp": host_delta.stamp_of(path.stat()), "partial": partial}
                    break
            return m.handle(ft.StateLoaded(None, None, 0.0, basis))
        if isinstance(a, ft_delta.MoveBasisAside):
            os.replace(self.part, self.aside)
            self.basis = self.aside
            return m.handle(ft_delta.BasisMoved(host_delta.stamp_of(self.aside.stat()), 0.0))
        if isinstance(a, ft_delta.RemoveBasis):
            self.aside.unlink(missing_ok=True)
            return None
        if isinstance(a, ft_delta.FetchWhole):
            self.machines["req"] = ft.Requestor("f.bin", PEER_MAIN, REQ_PARENT, 0.0, extended=True, delta=False)
            return self.machines["req"].handle(ft.Start())
        if isinstance(a, ft_delta.ForgetBasis):
            host_delta.forget(host_delta.stamp_of(self.basis.stat()))
            return None
        if isinstance(a, ft_delta.RestoreBasis):
            if self.aside.exists():
                os.replace(self.aside, self.part)
            return None
        if isinstance(a, ft.OpenPartial):
            self.part.write_bytes(b"")
            return m.handle(ft.PartialOpened(0.0))
        if isinstance(a, ft_delta.ChunkBasis):
            fd = os.open(self.basis, os.O_RDONLY)
            try:
                if a.copy_size:   # as the host does: the old copy into the partial as it is chunked
                    dst = os.open(self.part, os.O_WRONLY)
                    try:
                        records, stamp, size, copied = host_delta.chunk_and_copy(fd, AVG, dst, a.copy_size)
                    finally:
                        os.close(dst)
                    info = {"stamp": stamp, "copied": copied}
                else:
                    records, whole, stamp, size = host_delta.chunk_list(fd, AVG)
                    info = {"stamp": stamp, "blake3": whole}
            finally:
                os.close(fd)
            return m.handle(ft_delta.BasisChunked(records, info, None, 0.0))
        if isinstance(a, ft_delta.ReadChunkList):
            return m.handle(ft_delta.ListRead(self.blob["req"], 0.0))
        if isinstance(a, ft_delta.CopyRanges):
            src, dst = os.open(self.basis, os.O_RDONLY), os.open(self.part, os.O_RDWR)
            try:
                if a.whole:
                    return m.handle(ft_delta.RangesCopied(0.0, host_delta.build_file(src, dst, a.items, a.stamp,
                                                                                     a.size, a.in_place)))
                host_delta.copy_ranges(src, dst, a.items, a.stamp, a.size)
            finally:
                os.close(src)
                os.close(dst)
            return m.handle(ft_delta.RangesCopied(0.0))
        if isinstance(a, ft_delta.WriteRanges):
            fd = os.open(self.part, os.O_WRONLY)
            try:
                host_delta.write_ranges(fd, a.items, self.blob["req"] or b"", a.size)
            finally:
                os.close(fd)
            return m.handle(ft.ChunkWritten(0.0))
        if isinstance(a, ft_delta.VerifyWhole):
            return m.handle(ft.FileVerified(h(self.part.read_bytes()), 0.0))
        if isinstance(a, ft.HashChunk):
            if a.restart:
                self.chain = blake3()
            self.chain.update(self.blob["req"] or b"")
            return m.handle(ft.ChunkHashed(self.chain.hexdigest(), 0.0))
        if isinstance(a, ft.WriteChunk):
            with open(self.part, "r+b") as f:
                f.seek(a.offset)
                f.write(self.blob["req"] or b"")
            return m.handle(ft.ChunkWritten(0.0))
        if isinstance(a, ft.VerifyFile):
            return m.handle(ft.FileVerified(h(self.part.read_bytes()) if a.read_back else None, 0.0))
        if isinstance(a, ft.Rename):
            replaced = self.final.exists() and self.final.read_bytes() != self.part.read_bytes()
            os.replace(self.part, self.final)
            return m.handle(ft.Renamed(replaced, 0.0))
        if isinstance(a, ft.RemoveFiles):
            if a.partial and self.part.exists():
                self.part.unlink()
            return None
        # the provider
        if isinstance(a, ft.OpenFile):
            st = self.pfile.stat()
            return m.handle(ft.Opened(st.st_size, host_delta.stamp_of(st), 0.0, delta=self.prov_delta))
        if isinstance(a, ft.ReadChunk):
            self.blob["prov"] = self.new[self.pcursor:self.pcursor + a.length] if hasattr(self, "pcursor") else \
                self.new[:a.length]
            self.pcursor = getattr(self, "pcursor", 0) + len(self.blob["prov"] or b"")
            digest = None
            if a.hash == ft.HASH_WHOLE:
                digest = h(self.blob["prov"] or b"")
            elif a.hash in (ft.HASH_CHAIN, ft.HASH_CHAIN_RESTART):
                if a.hash == ft.HASH_CHAIN_RESTART:
                    self.pchain = blake3()
                self.pchain.update(self.blob["prov"] or b"")
                digest = self.pchain.hexdigest()
            return m.handle(ft.ChunkRead(len(self.blob["prov"] or b""), digest, 0.0))
        if isinstance(a, ft.CheckFile):
            return m.handle(ft.FileChecked(host_delta.stamp_of(self.pfile.stat()),
                                           h(self.new) if a.read_back else None, 0.0))
        if isinstance(a, ft_delta.ChunkFile):
            fd = os.open(self.pfile, os.O_RDONLY)
            try:
                records, whole, stamp, size = host_delta.chunk_list(fd, AVG)
            finally:
                os.close(fd)
            self.blob["prov"] = records
            return m.handle(ft_delta.FileChunked({"count": len(records) // 36, "size": size, "stamp": stamp}, 0.0))
        if isinstance(a, ft_delta.HashWhole):
            assert a.stamp == host_delta.stamp_of(self.pfile.stat())
            return m.handle(ft_delta.WholeHashed(h(self.new), 0.0))
        if isinstance(a, ft_delta.ReadPieces):
            data = bytearray()
            for off, n in a.items:
                piece = bytearray(self.new[off:off + n])
                if self.lie_at is not None and off <= self.lie_at < off + n:
                    piece[self.lie_at - off] ^= 0xFF
                data += piece
            self.blob["prov"] = bytes(data)
            return m.handle(ft_delta.PiecesRead(0.0))
        raise AssertionError(f"unexpected action {a}")


@pytest.fixture
def small_avg(monkeypatch):
    """Both ends chunk with AVG."""
    monkeypatch.setattr(ft_delta, "avg_for", lambda size: AVG)


def big(n: int = 6 << 20, seed: int = 7) -> bytes:
    """Over DELTA_MIN: a file small enough for a test, big enough to be offered delta."""
    return rand(n, seed)


def test_machines_move_only_what_changed_and_verify_the_whole(tmp_path, small_avg):
    old = big()
    new = edited(old, seed=8, changes=6, insert=50_000)
    sim = Sim(tmp_path, new, old).run()
    assert sim.exits == {"req": None, "prov": None}
    assert sim.final.read_bytes() == new and not sim.part.exists()
    done = sim.progress[-1]
    assert done["done"] and done["hash"] == h(new) and done["replaced"] is True
    # moved: the inserted block, the changed chunks around it and the six edits, and the list
    assert 50_000 < sim.sent < 50_000 + 8 * 4 * AVG * 4 + 40 * len(new) // AVG
    assert done["moved"] == sim.sent
    assert sim.sent < len(new) * 0.05


def test_a_partial_download_of_another_version_serves_as_the_old_copy(tmp_path, small_avg):
    old = big(seed=30)
    new = edited(old, seed=31)
    sim = Sim(tmp_path, new, old[:len(old) * 2 // 3], old_is_partial=True).run()   # two thirds of the old one
    assert sim.exits == {"req": None, "prov": None} and sim.final.read_bytes() == new
    assert sim.sent < len(new) // 2                                  # the partial's part came from it
    assert not sim.aside.exists() and not sim.part.exists()          # moved aside, then removed
    assert "replaced" not in sim.progress[-1]                        # no file of that name was there


def test_identical_copy_moves_only_the_list(tmp_path, small_avg):
    old = big(seed=9)
    sim = Sim(tmp_path, old, old).run()
    assert sim.exits == {"req": None, "prov": None} and sim.final.read_bytes() == old
    assert sim.sent < 40 * len(old) // AVG and "replaced" not in sim.progress[-1]


def test_a_first_download_is_the_plain_extended_one(tmp_path, small_avg):
    """No older copy: the delta offer is declined by answering with a plain offset; every byte moves."""
    new = big(seed=10)
    sim = Sim(tmp_path, new, None).run()
    assert sim.exits == {"req": None, "prov": None} and sim.final.read_bytes() == new
    assert sim.sent == len(new) and "moved" not in sim.progress[-1]
    assert type(sim.machines["req"]) is ft.Requestor and type(sim.machines["prov"]) is ft.Provider


def test_a_provider_that_cannot_chunk_sends_all_as_today(tmp_path, small_avg):
    old = big(seed=11)
    new = edited(old, seed=12)
    sim = Sim(tmp_path, new, old, prov_delta=False).run()
    assert sim.exits == {"req": None, "prov": None} and sim.final.read_bytes() == new
    assert sim.sent == len(new) and sim.progress[-1]["replaced"] is True


def test_a_lying_provider_is_caught_and_the_old_copy_kept(tmp_path, small_avg):
    old = big(seed=13)
    new = edited(old, seed=14, changes=0, insert=30_000)
    mid = len(old) // 2 + 100    # inside the inserted block: a piece that is fetched
    sim = Sim(tmp_path, new, old, lie_at=mid).run()
    assert sim.exits["req"] is not None and "does not match its chunk list" in sim.exits["req"]
    assert "integrity check" in sim.exits["req"]
    assert "bob.os sent data" in sim.progress[-1]["error"]
    assert sim.final.read_bytes() == old and not sim.part.exists()   # nothing lost, nothing left
    assert sim.exits["prov"] is not None                              # told, it stopped
    # from a partial download of another version: it is put back, for the next run
    tmp3 = tmp_path / "partial"
    tmp3.mkdir()
    sim = Sim(tmp3, new, old, lie_at=mid, old_is_partial=True).run()
    assert "does not match its chunk list" in (sim.exits["req"] or "")
    assert sim.part.read_bytes() == old and not sim.aside.exists() and not sim.final.exists()
    # the positive control: the same download without the lie arrives
    tmp2 = tmp_path / "again"
    tmp2.mkdir()
    assert Sim(tmp2, new, old).run().exits == {"req": None, "prov": None}


def test_an_old_copy_that_changes_meanwhile_is_fetched_whole(tmp_path, small_avg):
    old = big(seed=15)
    new = edited(old, seed=16)
    sim = Sim(tmp_path, new, old)
    real = sim.perform

    def touching(who, a):
        if isinstance(a, ft_delta.CopyRanges):
            os.utime(sim.final, ns=(5, 5))   # changed after it was chunked
        return real(who, a)
    sim.perform = touching  # type: ignore[method-assign]
    sim.run()
    assert any("changed since it was chunked" in ln and ln.endswith("; fetching it whole") for ln in sim.logs)
    # once more, plain: every byte moves, and it arrives
    assert sim.exits == {"req": None, "prov": None} and sim.final.read_bytes() == new and not sim.part.exists()
    assert sim.sent >= len(new) and type(sim.machines["req"]) is ft.Requestor and not sim.machines["req"].delta


def test_a_write_that_fails_here_is_not_blamed_on_the_peer(tmp_path, small_avg):
    old = big(seed=47)
    new = edited(old, seed=48, changes=0, insert=30_000)
    sim = Sim(tmp_path, new, old)
    real = sim.perform

    def full(who, a):
        if isinstance(a, ft_delta.WriteRanges):
            raise OSError(28, "No space left on device")
        return real(who, a)
    sim.perform = full  # type: ignore[method-assign]
    sim.run()
    failed = [ln for ln in sim.logs if "fetching only what changed failed" in ln]
    assert len(failed) == 1 and "No space left on device" in failed[0], sim.logs
    assert "does not match" not in failed[0] and "bob.os" not in failed[0]
    assert sim.exits == {"req": None, "prov": None} and sim.final.read_bytes() == new   # then fetched whole
    # the control: a piece the host's check refuses is the peer's, and ends the download
    tmp2 = tmp_path / "lie"
    tmp2.mkdir()
    sim = Sim(tmp2, new, old, lie_at=len(old) // 2 + 100).run()
    assert "bob.os sent data that does not match its chunk list" in (sim.exits["req"] or "")
    assert not any("fetching it whole" in ln for ln in sim.logs)


def test_a_stale_kept_list_of_the_old_copy_fails_once_and_is_dropped(tmp_path, small_avg):
    old = big(seed=49)
    new = edited(old, seed=50, changes=6, insert=0)       # the same size
    sim = Sim(tmp_path, new, old)
    # what a coarse timestamp could leave: a list kept under the old copy's stamp that is not its own
    stamp = host_delta.stamp_of(sim.final.stat())
    new_records = chunks_of(tmp_path, new)
    host_delta._remember((stamp, AVG), (b"".join(ft_delta.RECORD.pack(n, d) for n, d in new_records), "0" * 64))
    sim.run()
    assert "does not match the provider's hash" in (sim.exits["req"] or "")
    assert sim.final.read_bytes() == old and not sim.part.exists()
    assert host_delta.stamp_of(sim.final.stat()) == stamp and host_delta._cached((stamp, AVG)) is None
    # the control: the same download again, on the same untouched file, chunks it afresh and arrives
    sim.exits, sim.progress = {}, []
    sim.machines = {"req": ft.Requestor("f.bin", PEER_MAIN, REQ_PARENT, 0.0, extended=True)}
    sim.run()
    assert sim.exits == {"req": None, "prov": None} and sim.final.read_bytes() == new


def test_the_machines_visit_every_state(tmp_path, small_avg, monkeypatch):
    seen: dict = {"DeltaRequestor": set(), "DeltaProvider": set()}

    def tracked(cls):
        class Tracked(cls):
            def __setattr__(self, key, value):
                if key == "state":
                    seen[cls.__name__].add(value)
                super().__setattr__(key, value)
        return Tracked
    monkeypatch.setitem(ft.DELTA_MACHINES, "requestor", tracked(ft_delta.DeltaRequestor))
    monkeypatch.setitem(ft.DELTA_MACHINES, "provider", tracked(ft_delta.DeltaProvider))
    for n, (seed, lie, partial) in enumerate([(17, None, False), (19, len(big()) // 2 + 9, True)]):
        d = tmp_path / str(n)
        d.mkdir()
        Sim(d, edited(big(seed=seed), seed=seed + 1, changes=0), big(seed=seed), lie_at=lie, old_is_partial=partial).run()
    assert seen["DeltaRequestor"] == ft_delta.DeltaRequestor.STATES
    assert seen["DeltaProvider"] == ft_delta.DeltaProvider.STATES



def test_requestor_compares_the_built_files_hash_whichever_comes_first(small_avg):
    """The host builds and hashes the file after the last piece; the provider's hash may come before
    or after that: either way the two are compared before the rename, and a mismatch renames nothing."""
    good, bad = "ab" * 32, "cd" * 32

    def built_machine() -> ft_delta.DeltaRequestor:
        req = ft.Requestor("f.bin", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
        req.size = 6 << 20
        m = ft_delta.DeltaRequestor(req, {"size": 6 << 20, "stamp": "s"}, 0.0)
        m.state, m.file_open, m.copies, m.provider = m.RECEIVING, True, [[0, 0, 6 << 20]], PROV_WORKER
        actions = m._maybe_finish([])          # no piece left: build from the old copy
        assert m.state == m.COPYING and [type(a) for a in actions] == [ft_delta.CopyRanges] and actions[0].whole
        return m

    def final(m: ft_delta.DeltaRequestor, digest: str) -> list:
        return m.handle(ft.GotRequest(PROV_WORKER, {"Progress": {"name": "f.bin", "progress": 100}},
                                      {"ft": 1, "final": True, "blake3": digest}, 0.0))

    def renames(actions: list) -> list:
        return [a for a in actions if isinstance(a, ft.Rename)]
    m = built_machine()                        # the file built first, then the provider's hash
    assert not renames(m.handle(ft_delta.RangesCopied(0.0, good))) and m.state == m.BUILT
    assert [a.digest for a in renames(final(m, good))] == [good] and m.state == m.VERIFYING
    m = built_machine()                        # the provider's hash first
    assert final(m, good) == [] and m.state == m.COPYING
    assert [a.digest for a in renames(m.handle(ft_delta.RangesCopied(0.0, good)))] == [good]
    for first in ("built", "final"):           # a mismatch either way: nothing renamed, the kept list dropped
        m = built_machine()
        if first == "built":
            m.handle(ft_delta.RangesCopied(0.0, bad))
            actions = final(m, good)
        else:
            final(m, good)
            actions = m.handle(ft_delta.RangesCopied(0.0, bad))
        assert not renames(actions) and any(isinstance(a, ft_delta.ForgetBasis) for a in actions)
        assert m.state == m.FAILED and any(isinstance(a, ft.Exit) and "provider's hash" in (a.error or "")
                                           for a in actions)

@pytest.fixture
def worker(monkeypatch):
    """The file_transfer_worker's module, imported here with stand-ins for its Wasm bindings (its
    machines are the ones this file imports), and put back out of sys.modules afterwards."""
    before = set(sys.modules)
    standard = types.ModuleType("wit_world.imports.standard")
    standard.get_blob = lambda: None  # type: ignore[attr-defined]
    world = types.ModuleType("wit_world")
    world.WitWorld = type("WitWorld", (), {})  # type: ignore[attr-defined]
    imports = types.ModuleType("wit_world.imports")
    imports.standard = standard  # type: ignore[attr-defined]
    cpt = types.ModuleType("componentize_py_types")
    cpt.Err = type("Err", (Exception,), {})  # type: ignore[attr-defined]
    for name, mod in (("wit_world", world), ("wit_world.imports", imports), ("componentize_py_types", cpt)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.syspath_prepend(str(REPO / "components"))
    spec = importlib.util.spec_from_file_location("ft_worker_main", REPO / "components/file_transfer/"
                                                  "file_transfer_worker/main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_worker_turns_a_vfs_timeout_into_a_clear_failure(worker, monkeypatch, small_avg):
    """A VFS call that outlasts its timeout (SendError) is a failure like any other: the partial removed,
    the old copy moved aside put back, then the file fetched whole once; where it cannot be, the
    download ends with the error, the worker alive to say so."""
    from process_lib import SendError, vfs

    def stuck(path, action, **kw):
        raise SendError("timeout", Address.parse("alice.os@vfs:distro:sys"), b"", None)
    monkeypatch.setattr(vfs, "vfs_request", stuck)
    for state, action in (("copying", ft_delta.CopyRanges([[0, 0, 10]], "s", 6 << 20)),
                          ("moving", ft_delta.MoveBasisAside())):
        w = worker.Worker(REQ_WORKER)
        w.name, w.requestor, w.parent, w.drive = "f.bin", True, REQ_PARENT, "/file_transfer:template.os/files"
        w.partial, w.state_path, w.basis_path = "/p/f.bin.part", "/p/f.bin.state", "/p/f.bin.basis"
        w.partial_dir = "/p"
        req = ft.Requestor("f.bin", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
        req.size = 6 << 20
        m = ft_delta.DeltaRequestor(req, {"size": 6 << 20, "stamp": "s", "partial": True}, 0.0)
        m.state, m.file_open = state, state == "copying"
        w.machine = m
        done: list = []
        for kind in (ft.Send, ft.Log, ft.RemoveFiles, ft_delta.RestoreBasis, ft.ArmTimer):
            w.perform[kind] = done.append
        ended = w.run([action])
        assert m.state == m.FAILED
        name = type(action).__name__
        if state == "copying":
            assert not ended and ft.RemoveFiles(state=True, partial=True) in done and ft_delta.RestoreBasis() in done
            assert ft.Log(f"f.bin: fetching only what changed failed (the node did not finish {name} in time "
                          f"(timeout)); fetching it whole") in done
            assert type(w.machine) is ft.Requestor and not w.machine.delta           # plain, once
            assert any(isinstance(a, ft.Send) and a.target == PEER_MAIN and "Download" in a.body for a in done)
        else:
            assert ended and ft_delta.RestoreBasis() not in done      # not moved: nothing to put back
            error = next(a.metadata["error"] for a in done if isinstance(a, ft.Send) and a.target == REQ_PARENT)
            assert error == f"the node did not finish {name} in time (timeout)", error


def worker_on_vfs(worker: Any, monkeypatch, tmp_path: Path) -> tuple:
    """A requestor worker of f.bin from bob.os whose VFS calls reach a real host VFS: -> (worker, its
    files drive's real folder)."""
    from process_lib import vfs
    v = Vfs(tmp_path / "vfs")
    me = ProcessId("w1", "file_transfer", "template.os")
    last: dict = {"blob": None}

    def request(path, action, blob=None, forward_blob=False, timeout=30):
        res = v.handle(me, lambda params: False, json.dumps({"path": path, "action": action}).encode(), blob)
        last["blob"] = res.blob
        answer = json.loads(res.body)
        if isinstance(answer, dict) and "Err" in answer:
            raise vfs._error(path, answer["Err"])
        return answer
    monkeypatch.setattr(vfs, "vfs_request", request)
    monkeypatch.setattr(sys.modules["wit_world.imports"].standard, "get_blob",
                        lambda: None if last["blob"] is None else types.SimpleNamespace(mime=None, bytes=last["blob"]))
    request("/file_transfer:template.os/files", "CreateDrive")
    w = worker.Worker(REQ_WORKER)
    w.name, w.requestor, w.parent = "f.bin", True, REQ_PARENT
    w.partial_dir = f"{w.drive}/.partial/bob.os"
    w.partial, w.state_path = f"{w.partial_dir}/f.bin.part", f"{w.partial_dir}/f.bin.state"
    w.basis_path = f"{w.drive}/f.bin"
    files = v.drive_path(PackageId("file_transfer", "template.os"), "files")
    (files / ".partial" / "bob.os").mkdir(parents=True)
    return w, files


class Recorder:
    """A machine that records the events the worker gives it."""
    FAILED = "failed"
    state = None

    def __init__(self):
        self.events: list = []

    def handle(self, ev):
        self.events.append(ev)
        return []


def test_worker_after_a_kill_mid_delta_starts_from_the_old_partial_again(worker, monkeypatch, tmp_path):
    w, files = worker_on_vfs(worker, monkeypatch, tmp_path)
    part, aside = files / ".partial/bob.os/f.bin.part", files / ".partial/bob.os/f.bin.basis"
    old = rand(300_000, 51)
    part.write_bytes(old)
    w.machine = Recorder()
    w.load_state(ft.LoadState())
    basis = w.machine.events[-1].basis
    assert basis["partial"] and not basis.get("aside") and basis["size"] == len(old)   # the partial, first
    # the delta download moves it aside and builds the new file in its place; the node is killed there
    w.move_basis_aside(ft_delta.MoveBasisAside())
    part.write_bytes(b"the first bytes of the new version")
    assert aside.read_bytes() == old
    # the next run takes the old partial moved aside, not the half-built one (which is removed)
    w2 = worker.Worker(REQ_WORKER)
    w2.__dict__.update({k: v for k, v in w.__dict__.items() if k not in ("machine", "basis_path", "perform")})
    w2.basis_path = f"{w2.drive}/f.bin"
    w2.machine = Recorder()
    w2.load_state(ft.LoadState())
    basis = w2.machine.events[-1].basis
    assert basis["partial"] and basis["aside"] and basis["size"] == len(old)
    assert not part.exists() and aside.read_bytes() == old
    # the delta machine starts from it where it is (no second move over it), and drops any resume state
    req = ft.Requestor("f.bin", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    req.size = 6 << 20
    actions = ft_delta.DeltaRequestor(req, basis, 0.0).start()
    assert ft.OpenPartial(0) in actions and ft.RemoveFiles(state=True, partial=False) in actions
    assert not any(isinstance(a, ft_delta.MoveBasisAside) for a in actions)
    # a failure puts it back
    w2.restore_basis(ft_delta.RestoreBasis())
    assert part.read_bytes() == old and not aside.exists()
    # a leftover beside a file of that name: the file is the old copy, the leftover removed
    w2.move_basis_aside(ft_delta.MoveBasisAside())
    (files / "f.bin").write_bytes(old[:1000])
    w2.machine = Recorder()
    w2.load_state(ft.LoadState())
    basis = w2.machine.events[-1].basis
    assert basis["partial"] is False and basis["size"] == 1000 and "aside" not in basis
    assert not aside.exists() and not part.exists()


def test_worker_leaves_the_partial_alone_when_it_cannot_move_it_aside(worker, monkeypatch, tmp_path):
    w, files = worker_on_vfs(worker, monkeypatch, tmp_path)
    part, aside = files / ".partial/bob.os/f.bin.part", files / ".partial/bob.os/f.bin.basis"
    old = rand(300_000, 52)
    part.write_bytes(old)
    (aside / "in the way").mkdir(parents=True)      # a folder where it would go: the rename fails
    req = ft.Requestor("f.bin", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    req.size = 6 << 20
    m = ft_delta.DeltaRequestor(req, {"size": len(old), "stamp": "s", "partial": True}, 0.0)
    m.state = m.MOVING
    w.machine = m
    sent: list = []
    w.perform[ft.Send] = sent.append
    assert w.run([ft_delta.MoveBasisAside()]) is True
    assert m.state == m.FAILED and part.read_bytes() == old and (aside / "in the way").is_dir()
    error = next(a.metadata["error"] for a in sent if a.target == REQ_PARENT)
    assert "f.bin.basis" in error, error
    # the control: with the way clear it is moved, and the machine goes on to open the new partial
    (aside / "in the way").rmdir()
    aside.rmdir()
    m = ft_delta.DeltaRequestor(req, {"size": len(old), "stamp": "s", "partial": True}, 0.0)
    m.state = m.MOVING
    w.machine = m
    opened: list = []
    w.perform[ft.OpenPartial] = opened.append
    assert w.run([ft_delta.MoveBasisAside()]) is False
    assert opened == [ft.OpenPartial(0)] and aside.read_bytes() == old and not part.exists()


# ---- real nodes ------------------------------------------------------------------------------------
DL = "download:file_transfer:template.os"


def bytes_written(node) -> int:
    """What the node process has sent over TCP (its established connections), as the kernel counts it."""
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True, check=True).stdout
    total = 0
    for head, info in zip(out.splitlines()[::2], out.splitlines()[1::2]):
        if f"pid={node.proc.pid}," in head + info:
            m = re.search(r"bytes_sent:(\d+)", info)
            total += int(m.group(1)) if m else 0
    return total


def test_nodes_move_only_what_changed(two_nodes):
    fake, fake2 = two_nodes
    size = 24 << 20
    old = rand(size, 21)
    new = edited(old, seed=22, changes=8, insert=1 << 20)
    (fake.files / "big.bin").write_bytes(old)
    (fake2.files / "big.bin").write_bytes(new)
    (fake2.files / "first.bin").write_bytes(rand(size, 23))
    # the control: a first download (no older copy here) moves the whole file
    before = bytes_written(fake2)
    code, lines = fake.run(f"{DL} first.bin fake2.dev", until=r"first\.bin downloaded|error:", timeout=120)
    assert code == 0 and any("first.bin downloaded" in ln and "moved" not in ln for ln in lines), lines
    first = bytes_written(fake2) - before
    assert first >= size
    before = bytes_written(fake2)
    code, lines = fake.run(f"{DL} big.bin fake2.dev", until=r"big\.bin downloaded|error:", timeout=120)
    sent = bytes_written(fake2) - before
    assert code == 0, lines
    assert h((fake.files / "big.bin").read_bytes()) == h(new)
    done = next(ln for ln in lines if "big.bin downloaded" in ln)
    assert re.search(r"only \d+\.\d MiB moved, the rest came from the copy this node had; it replaced", done), done
    # the inserted MiB, the chunks the eight changes touched, the list: a small part of the file
    assert (1 << 20) < sent < size // 5, (sent, first)
    assert not (fake.files / ".partial" / "fake2.dev" / "big.bin.part").exists()


def test_nodes_catch_a_provider_that_lies_and_keep_the_old_copy(node_factory):
    fake = node_factory("fake.dev")
    fake2 = node_factory("fake2.dev", start=False)
    fake2.env = dict(fake2.env, KINODE_TEST_LIE_AFTER_READS="0")   # its first piece read has a byte flipped
    fake2.start()
    old = rand(12 << 20, 24)
    new = edited(old, seed=25, changes=2, insert=300_000)
    (fake.files / "big.bin").write_bytes(old)
    (fake2.files / "big.bin").write_bytes(new)
    code, lines = fake.run(f"{DL} big.bin fake2.dev", until=r"big\.bin downloaded|error:", timeout=120)
    fake2.expect(r"test lie: .* flipped a byte of read 1 of /file_transfer:template\.os/files$", 10)   # the lie was told
    err = next(ln for ln in lines if "error:" in ln)
    assert "fake2.dev sent data that does not match its chunk list" in err and "integrity check" in err, err
    assert (fake.files / "big.bin").read_bytes() == old          # nothing lost
    assert not (fake.files / ".partial" / "fake2.dev" / "big.bin.part").exists()


def test_nodes_with_delta_turned_off_move_the_whole_file(node_factory):
    fake = node_factory("fake.dev")
    fake2 = node_factory("fake2.dev", start=False)
    fake2.env = dict(fake2.env, KINODE_DELTA="0")
    fake2.start()
    old = rand(8 << 20, 26)
    new = edited(old, seed=27)
    (fake.files / "big.bin").write_bytes(old)
    (fake2.files / "big.bin").write_bytes(new)
    before = bytes_written(fake2)
    code, lines = fake.run(f"{DL} big.bin fake2.dev", until=r"big\.bin downloaded|error:", timeout=120)
    assert code == 0 and any("replaced the big.bin" in ln and "moved" not in ln for ln in lines), lines
    assert bytes_written(fake2) - before >= len(new)
    assert (fake.files / "big.bin").read_bytes() == new


def test_nodes_start_from_a_partial_download_of_another_version(two_nodes):
    fake, fake2 = two_nodes
    old = rand(12 << 20, 28)
    new = edited(old, seed=29, changes=4, insert=200_000)
    partial = fake.files / ".partial" / "fake2.dev" / "big.bin.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(old[:10 << 20])     # an interrupted download of the old version, no resume state
    (fake2.files / "big.bin").write_bytes(new)
    before = bytes_written(fake2)
    code, lines = fake.run(f"{DL} big.bin fake2.dev", until=r"big\.bin downloaded|error:", timeout=120)
    assert code == 0 and any("only" in ln and "moved" in ln for ln in lines), lines
    assert bytes_written(fake2) - before < len(new) // 2
    assert (fake.files / "big.bin").read_bytes() == new
    assert not partial.exists() and not partial.with_name("big.bin.basis").exists()


def test_nodes_a_kill_mid_delta_keeps_the_old_partial_for_the_next_run(node_factory):
    fake = node_factory("fake.dev")
    fake2 = node_factory("fake2.dev", pause_after=1)     # its providers hold before their second read
    old = rand(12 << 20, 53)
    new = old[:6 << 20] + rand(10 << 20, 54) + old[6 << 20:]   # the pieces take more than one message
    partial = fake.files / ".partial" / "fake2.dev" / "big.bin.part"
    aside = partial.with_name("big.bin.basis")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(old[:10 << 20])     # an interrupted download of the old version, no resume state
    (fake2.files / "big.bin").write_bytes(new)
    fake.type(f"{DL} big.bin fake2.dev")
    paused(fake2)
    wait_for(lambda: aside.exists() and partial.exists() and partial.stat().st_size > 0, 60,
             "the partial moved aside and the new one begun")
    fake.kill()                              # no chance to put it back
    assert aside.read_bytes() == old[:10 << 20]
    fake.start()
    fake.type(f"{DL} big.bin fake2.dev")
    paused(fake2)                            # the second run held part way too
    wait_for(lambda: partial.exists(), 60, "the new partial begun")
    assert aside.read_bytes() == old[:10 << 20]   # the old partial still, not the first run's half-built one
    release(fake2)
    fake.expect(r"big\.bin downloaded", 120)
    done = next(ln for ln in fake.lines if "big.bin downloaded" in ln)
    assert "only" in done and "moved" in done, done     # built from the old partial
    assert (fake.files / "big.bin").read_bytes() == new
    assert not aside.exists() and not partial.exists()
