"""From every node that has it (components/file_transfer/common/ft_multi.py): the machines wired in
memory with the host's real chunking and checks on real files; then real nodes, each provider's
share counted, one paused then killed in network namespaces, one lying, one of other content."""
from __future__ import annotations

import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from conftest import paused, sha256, wait_for, write_random

REPO = Path(__file__).resolve().parent.parent
COMMON = str(REPO / "components/file_transfer/common")
if COMMON not in sys.path:
    sys.path.insert(0, COMMON)

import ft_delta  # noqa: E402
import ft_multi  # noqa: E402
import ft_protocol as ft  # noqa: E402

from host.kinode_types import Address  # noqa: E402
from host.vfs import delta as host_delta  # noqa: E402

REQ_WORKER = Address.parse("alice.os@w1:file_transfer:template.os")
REQ_PARENT = Address.parse("alice.os@file_transfer:file_transfer:template.os")
AVG = 4096
DL = "download:file_transfer:template.os"


def h(data: bytes) -> str:
    return blake3(data).hexdigest()


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def main_of(node: str) -> Address:
    return Address.parse(f"{node}@file_transfer:file_transfer:template.os")


# ---- the machines, wired in memory ----------------------------------------------------------------
@dataclass
class Sim:
    """A multi-source download of f.bin by alice.os from `files` {node: bytes or None (no such
    file)}; `plain`: nodes speaking the seed's protocol; `lie`: nodes whose first read of pieces has a byte flipped."""
    tmp: Path
    files: dict
    plain: set = field(default_factory=set)
    lie: set = field(default_factory=set)
    logs: list = field(default_factory=list)
    progress: list = field(default_factory=list)
    exits: dict = field(default_factory=dict)
    queue: list = field(default_factory=list)
    sent: dict = field(default_factory=dict)

    def __post_init__(self):
        self.part = self.tmp / "f.bin.part"
        self.final = self.tmp / "f.bin"
        self.workers = {n: Address.parse(f"{n}@w{i}:file_transfer:template.os") for i, n in enumerate(self.files)}
        self.paths = {}
        for n, data in self.files.items():
            if data is not None:
                self.paths[n] = self.tmp / f"{n}.bin"
                self.paths[n].write_bytes(data)
        key = ",".join(self.files)
        self.machines: dict[str, Any] = {"req": ft_multi.MultiRequestor("f.bin", Address(key, REQ_PARENT.process),
                                                                         REQ_PARENT, 0.0)}
        self.blob: dict[str, Any] = {}
        self.current: dict[str, Any] = {}

    def run(self) -> Sim:
        self.act("req", self.machines["req"].handle(ft.Start()))
        while self.queue:
            who, ev, blob, msg = self.queue.pop(0)
            if who in self.exits:
                continue
            self.blob[who], self.current[who] = blob, msg
            self.act(who, self.machines[who].handle(ev))
        return self

    def me(self, who: str) -> Address:
        return REQ_WORKER if who == "req" else self.workers[who]

    def post(self, who: str, target: Any, ev: Any, blob: bytes | None, msg: Any) -> None:
        if who == "req" and target.process.process_name == "file_transfer" and target.node in self.files:
            node = target.node
            if self.files[node] is None:
                self.queue.append(("req", ft.GotResponse(msg[1], {"Download": {"Err": f"no such file: f.bin"}}, {}, 0.0),
                                   None, None))
                return
            self.queue.append(("req", ft.GotResponse(msg[1], {"Download": {"Ok": None}}, {}, 0.0), None, None))
            self.machines[node] = ft.Provider("f.bin", REQ_WORKER, main_of(node), 0.0, extended=node not in self.plain)
            self.act(node, self.machines[node].handle(ft.Start()))
        elif target == REQ_PARENT:
            self.progress.append(ev.meta)
        elif who != "req" and target == main_of(who):
            pass
        elif target == REQ_WORKER:
            self.sent[who] = self.sent.get(who, 0) + len(blob or b"")
            self.queue.append(("req", ev, blob, msg))
        else:
            node = next(n for n, w in self.workers.items() if w == target)
            self.queue.append((node, ev, blob, msg))

    def act(self, who: str, actions: list) -> None:
        while actions:
            follow = None
            for a in actions:
                assert follow is None, "an action with a result must be the last of its list"
                if isinstance(a, ft.Exit):
                    self.exits[who] = a.error
                    return
                if isinstance(a, ft.Send):
                    blob = self.blob.get(who) if a.forward_blob else None
                    ev = ft.GotRequest(self.me(who), a.body, dict(a.metadata or {}), 0.0, a.timeout is not None,
                                       None if blob is None else len(blob))
                    self.post(who, a.target, ev, blob, (self.me(who), a.context))
                elif isinstance(a, ft.Reply):
                    source, context = self.current[who]
                    self.post(who, source, ft.GotResponse(context, a.body, dict(a.metadata or {}), 0.0), None, None)
                elif isinstance(a, ft.Log):
                    self.logs.append(a.text)
                elif isinstance(a, ft.ArmTimer):
                    pass
                elif isinstance(a, ft.SwitchToDelta):
                    self.machines[who] = a.machine
                elif isinstance(a, ft_multi.FetchSingle):
                    self.machines["req"] = ft_multi.AloneRequestor(
                        "f.bin", main_of(a.node), REQ_PARENT, 0.0, extended=True, delta=False, key=a.key)
                    follow = self.machines["req"].handle(ft.Start())
                else:
                    try:
                        follow = self.perform(who, a)
                    except (OSError, host_delta.DeltaError) as e:
                        follow = self.machines[who].handle(ft.IoFailed(str(e), 0.0))
                        break
            actions = follow

    def perform(self, who: str, a: Any) -> list | None:
        m = self.machines[who]
        if who == "req":
            if isinstance(a, ft.OpenPartial):
                self.part.write_bytes(b"")
                return m.handle(ft.PartialOpened(0.0))
            if isinstance(a, ft_delta.ReadChunkList):
                return m.handle(ft_delta.ListRead(self.blob["req"], 0.0))
            if isinstance(a, ft_delta.WriteRanges):
                fd = os.open(self.part, os.O_WRONLY)
                try:
                    host_delta.write_ranges(fd, a.items, self.blob["req"] or b"", a.size)
                finally:
                    os.close(fd)
                return m.handle(ft.ChunkWritten(0.0))
            if isinstance(a, ft_delta.VerifyWhole):
                return m.handle(ft.FileVerified(h(self.part.read_bytes()), 0.0))
            if isinstance(a, ft.WriteChunk):
                with open(self.part, "r+b") as f:
                    f.seek(a.offset)
                    f.write(self.blob["req"] or b"")
                return m.handle(ft.ChunkWritten(0.0))
            if isinstance(a, ft.HashChunk):
                if a.restart:
                    self.chain = blake3()
                self.chain.update(self.blob["req"] or b"")
                return m.handle(ft.ChunkHashed(self.chain.hexdigest(), 0.0))
            if isinstance(a, ft.VerifyFile):
                return m.handle(ft.FileVerified(h(self.part.read_bytes()) if a.read_back else None, 0.0))
            if isinstance(a, ft.Rename):
                os.replace(self.part, self.final)
                return m.handle(ft.Renamed(False, 0.0))
            if isinstance(a, ft.RemoveFiles):
                if a.partial and self.part.exists():
                    self.part.unlink()
                return None
            if isinstance(a, (ft.SaveState, ft.LoadState)):
                return m.handle(ft.StateLoaded(None, None, 0.0)) if isinstance(a, ft.LoadState) else None
            raise AssertionError(f"unexpected action {a}")
        data, path = self.files[who], self.paths[who]
        if isinstance(a, ft.OpenFile):
            st = path.stat()
            return m.handle(ft.Opened(st.st_size, host_delta.stamp_of(st), 0.0, delta=True))
        if isinstance(a, ft_delta.ChunkFile):
            fd = os.open(path, os.O_RDONLY)
            try:
                records, whole, stamp, size = host_delta.chunk_list(fd, AVG)
            finally:
                os.close(fd)
            self.blob[who] = records
            return m.handle(ft_delta.FileChunked({"count": len(records) // 36, "size": size, "stamp": stamp}, 0.0))
        if isinstance(a, ft_delta.HashWhole):
            return m.handle(ft_delta.WholeHashed(h(data), 0.0))
        if isinstance(a, ft_delta.ReadPieces):
            out = bytearray()
            for off, n in a.items:
                out += data[off:off + n]
            if who in self.lie:
                self.lie.discard(who)
                out[len(out) // 2] ^= 0xFF
            self.blob[who] = bytes(out)
            return m.handle(ft_delta.PiecesRead(0.0))
        if isinstance(a, ft.ReadChunk):
            cur = getattr(m, "next_offset", 0)
            self.blob[who] = data[cur:cur + a.length]
            digest = h(self.blob[who]) if a.hash == ft.HASH_WHOLE else None
            return m.handle(ft.ChunkRead(len(self.blob[who]), digest, 0.0))
        if isinstance(a, ft.Seek):
            return None
        raise AssertionError(f"unexpected action {a}")


@pytest.fixture
def small(monkeypatch):
    """Both ends chunk with AVG, pieces of at most 64 KiB, the seed's chunk 16 KiB: a file of a few
    hundred KiB is offered in pieces and has many."""
    monkeypatch.setattr(ft_delta, "avg_for", lambda size: AVG)
    monkeypatch.setattr(ft_multi, "avg_for", lambda size: AVG)
    monkeypatch.setattr(ft_multi, "plan", lambda new, old: ft_delta.plan(new, old, piece_max=64 << 10))
    monkeypatch.setattr(ft, "EXT_CHUNK_SIZE", 64 << 10)
    monkeypatch.setattr(ft, "CHUNK_SIZE", 16 << 10)


def test_machines_fetch_disjoint_pieces_from_every_provider(tmp_path, small):
    data = rand(600_000, 1)
    sim = Sim(tmp_path, {"a.os": data, "b.os": data, "c.os": data}).run()
    assert sim.exits["req"] is None, sim.logs
    assert sim.final.read_bytes() == data
    served = sim.progress[-1]["served"]
    assert set(served) == {"a.os", "b.os", "c.os"} and sum(served.values()) == len(data), served
    assert not [ln for ln in sim.logs if "dropped" in ln or "different" in ln or "skipped" in ln], sim.logs
    assert all(sim.exits.get(n) is None and n in sim.exits for n in ("a.os", "b.os", "c.os")), sim.exits


def test_machines_drop_a_liar_and_fetch_its_piece_elsewhere(tmp_path, small):
    data = rand(600_000, 2)
    sim = Sim(tmp_path, {"a.os": data, "b.os": data, "c.os": data}, lie={"b.os"}).run()
    assert sim.exits["req"] is None, sim.logs
    assert sim.final.read_bytes() == data
    assert any("b.os sent a chunk that failed its integrity check; dropped" in ln for ln in sim.logs), sim.logs
    assert "b.os" not in sim.progress[-1]["served"] or sim.progress[-1]["served"]["b.os"] < len(data)


def test_machines_name_a_node_of_other_content_and_a_missing_file(tmp_path, small):
    data = rand(600_000, 3)
    sim = Sim(tmp_path, {"a.os": rand(600_000, 4), "b.os": data, "c.os": data, "d.os": None}).run()
    assert sim.exits["req"] is None, sim.logs
    assert sim.final.read_bytes() == data
    assert any(ln.startswith("f.bin: a.os has different content") for ln in sim.logs), sim.logs
    assert any("d.os: no such file" in ln for ln in sim.logs), sim.logs
    assert set(sim.progress[-1]["served"]) == {"b.os", "c.os"}
    # none usable: a clear error naming each
    (tmp_path / "x").mkdir()
    sim = Sim(tmp_path / "x", {"d.os": None, "e.os": None}).run()
    assert "no listed node can send f.bin" in (sim.exits["req"] or ""), sim.exits


def test_machines_skip_a_plain_peer(tmp_path, small):
    data = rand(600_000, 5)
    sim = Sim(tmp_path, {"a.os": data, "p.os": data, "b.os": data}, plain={"p.os"}).run()
    assert sim.exits["req"] is None, sim.logs
    assert sim.final.read_bytes() == data
    assert any("p.os does not support multi-source downloads of f.bin (it speaks the seed's plain protocol)" in ln
               for ln in sim.logs), sim.logs
    assert set(sim.progress[-1]["served"]) == {"a.os", "b.os"}


def test_machines_fall_back_to_one_node_when_none_can_send_pieces(tmp_path, small):
    data = rand(600_000, 6)
    sim = Sim(tmp_path, {"p.os": data, "q.os": data}, plain={"p.os", "q.os"}).run()
    assert sim.exits["req"] is None, sim.logs
    assert sim.final.read_bytes() == data
    assert any("fetching it whole from p.os alone" in ln for ln in sim.logs), sim.logs
    assert sim.progress[-1]["peer"] == "p.os,q.os" and sim.progress[-1]["done"]
