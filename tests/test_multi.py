"""From every node that has it (components/file_transfer/common/ft_multi.py): the machines wired in
memory with the host's real chunking and checks on real files; then real nodes, each provider's
share counted, one paused then killed in network namespaces, one lying, one of other content."""
from __future__ import annotations

import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from conftest import paused, release, sha256, wait_for, write_random

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
    mute: set = field(default_factory=set)   # nodes whose reads of pieces never end (a stalled provider)
    fake_hash: set = field(default_factory=set)   # nodes that send a wrong hash of the whole file
    hold_hash: set = field(default_factory=set)   # nodes whose hash of the whole file is kept in `held`
    unlisted: set = field(default_factory=set)    # nodes that answer Size but never send their chunk list
    busy: dict = field(default_factory=dict)      # nodes that serve others first: {node: place in its queue}
    held: dict = field(default_factory=dict)
    logs: list = field(default_factory=list)
    progress: list = field(default_factory=list)
    exits: dict = field(default_factory=dict)
    queue: list = field(default_factory=list)
    sent: dict = field(default_factory=dict)
    state: Any = None    # the resume point on "disk": what LoadState finds and SavePieces writes (parsed)
    old: bytes | None = None   # the requestor's older copy of f.bin (the file of that name), used as the worker does
    old_changes: bool = False  # the old copy is touched after it was chunked (its stamp changes: the copy refused)
    stale_list: bytes | None = None   # the old copy's list is of these bytes (a stale list kept by its stamp)

    def __post_init__(self):
        self.part = self.tmp / "f.bin.part"
        self.final = self.tmp / "f.bin"
        self.workers = {n: Address.parse(f"{n}@w{i}:file_transfer:template.os") for i, n in enumerate(self.files)}
        self.paths = {}
        if self.old is not None:
            self.final.write_bytes(self.old)
        for n, data in self.files.items():
            if data is not None:
                self.paths[n] = self.tmp / f"{n}.bin"
                self.paths[n].write_bytes(data)
        key = ",".join(self.files)
        self.machines: dict[str, Any] = {"req": ft_multi.MultiRequestor("f.bin", Address(key, REQ_PARENT.process),
                                                                         REQ_PARENT, 0.0)}
        self.blob: dict[str, Any] = {}
        self.current: dict[str, Any] = {}

    def send_held(self, who: str) -> Sim:
        """Deliver the hash of the whole file `who` sent and `held` kept."""
        source, a = self.held.pop(who)
        self.queue.append(("req", ft.GotRequest(source, a.body, dict(a.metadata), 0.0, False, None), None,
                           (source, a.context)))
        return self.run(start=False)

    def unmute(self, who: str) -> Sim:
        """Let `who` read pieces again, finishing the read it was held in."""
        self.mute.discard(who)
        m = self.machines[who]
        if m.state == m.READING:
            self.act(who, self.perform(who, ft_delta.ReadPieces([m.want[i] for i in range(m.reading[0], sum(m.reading))],
                                                                m.stamp)))
        return self.run(start=False)

    def send_pieces(self, who: str, ids: list, first: int) -> Sim:
        """`who` sends the pieces `ids` in one message, as the entries from `first` of what it was asked."""
        req = self.machines["req"]
        blob = b"".join(self.files[who][req.pieces[i][0]:req.pieces[i][0] + req.pieces[i][1]] for i in ids)
        body = {"Chunk": {"name": "f.bin", "offset": req.pieces[ids[0]][0], "length": len(blob)}}
        ev = ft.GotRequest(self.workers[who], body, {"ft": 1, "pieces": [first, len(ids)]}, 0.0, True, len(blob))
        self.queue.append(("req", ev, blob, (self.workers[who], "piece")))
        return self.run(start=False)

    def run(self, start: bool = True) -> Sim:
        if start:
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
            if "Download" not in ev.body:   # leaving a busy node's queue
                return
            node = target.node
            if node in self.busy:
                self.queue.append(("req", ft.GotResponse(msg[1], {"Download": {"Ok": None}}, {"queued": self.busy[node]},
                                                         0.0), None, None))
                return
            if self.files[node] is None:
                self.queue.append(("req", ft.GotResponse(msg[1], {"Download": {"Err": "no such file: f.bin"}}, {}, 0.0),
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
                if isinstance(a, ft.Send) and isinstance(a.metadata, dict) and a.metadata.get("final"):
                    if who in self.fake_hash:
                        a.metadata["blake3"] = "0" * 64
                    if who in self.hold_hash:
                        self.held[who] = (self.me(who), a)
                        continue
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
                with open(self.part, "ab") as f:   # the worker's: cut to the offset (0: truncated)
                    f.truncate(a.offset)
                return m.handle(ft.PartialOpened(0.0))
            if isinstance(a, ft_delta.ReadChunkList):
                return m.handle(ft_delta.ListRead(self.blob["req"], 0.0, h(self.blob["req"] or b"")))
            if isinstance(a, ft_multi.SavePieces):
                self.state = json.loads(a.data)
                return None
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
                if a.state:
                    self.state = None
                return None
            if isinstance(a, ft.LoadState):
                size = self.part.stat().st_size if self.part.exists() else None
                basis = None
                if self.old is not None and self.final.exists():
                    st = self.final.stat()
                    basis = {"size": st.st_size, "stamp": host_delta.stamp_of(st), "partial": False}
                return m.handle(ft.StateLoaded(self.state, size, 0.0, basis))
            if isinstance(a, ft_delta.ChunkBasis):
                assert a.avg == ft_multi.MULTI_AVG
                if self.stale_list is not None:
                    (self.tmp / "stale").write_bytes(self.stale_list)
                fd = os.open(self.tmp / "stale" if self.stale_list is not None else self.final, os.O_RDONLY)
                try:
                    records, _, stamp, _ = host_delta.chunk_list(fd, a.avg, whole=False)
                finally:
                    os.close(fd)
                stamp = host_delta.stamp_of(self.final.stat())
                if self.old_changes:
                    os.utime(self.final, ns=(1, 1))
                return m.handle(ft_delta.BasisChunked(records, {"stamp": stamp}, None, 0.0))
            if isinstance(a, ft_delta.CopyRanges):
                src, dst = os.open(self.final, os.O_RDONLY), os.open(self.part, os.O_RDWR)
                try:
                    assert a.whole
                    return m.handle(ft_delta.RangesCopied(0.0, host_delta.build_file(src, dst, a.items, a.stamp,
                                                                                     a.size)))
                finally:
                    os.close(src)
                    os.close(dst)
            if isinstance(a, ft_delta.ForgetBasis):
                self.forgot = True
                return None
            if isinstance(a, ft.SaveState):
                return None
            raise AssertionError(f"unexpected action {a}")
        data, path = self.files[who], self.paths[who]
        if isinstance(a, ft.OpenFile):
            st = path.stat()
            return m.handle(ft.Opened(st.st_size, host_delta.stamp_of(st), 0.0, delta=True))
        if isinstance(a, ft_delta.ChunkFile) and who in self.unlisted:
            return None
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
        if isinstance(a, ft_delta.ReadPieces) and who in self.mute:
            return None
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
    monkeypatch.setattr(ft_multi, "MULTI_AVG", AVG)
    monkeypatch.setattr(ft_multi, "plan", lambda new, old: ft_delta.plan(new, old, piece_max=64 << 10))
    monkeypatch.setattr(ft, "EXT_CHUNK_SIZE", 64 << 10)
    monkeypatch.setattr(ft, "CHUNK_SIZE", 16 << 10)
    monkeypatch.setattr(ft, "DELTA_MIN", 64 << 10)
    monkeypatch.setattr(ft_multi, "DELTA_MIN", 64 << 10)


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
    # two of three agree before the third has listed: they start, and the third is named when it lists
    (tmp_path / "y").mkdir()
    sim = Sim(tmp_path / "y", {"b.os": data, "c.os": data, "a.os": rand(600_000, 4)}).run()
    assert sim.exits["req"] is None and (tmp_path / "y" / "f.bin").read_bytes() == data, sim.logs
    assert any(ln.startswith("f.bin: a.os has different content") for ln in sim.logs), sim.logs
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


# ---- real nodes ------------------------------------------------------------------------------------
PORTABLE = REPO / "build" / "portable"


def served_by(node, name: str) -> dict:
    """{provider: pieces} from the requestor's line "NAME: served by A 3 pieces (12.0 MiB), B ..."."""
    line = wait_for(lambda: next((ln for ln in node.lines if f"{name}: served by" in ln), None), 30,
                    f"the served line of {name}")
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"(\S+) (\d+) pieces", line.split("served by", 1)[1])}


def download(node, name: str, nodes: str, timeout: float = 120) -> list[str]:
    code, lines = node.run(f"{DL} {name} {nodes}", until=rf"{re.escape(name)} downloaded|error:", timeout=timeout)
    assert code == 0, lines
    return lines


def test_nodes_three_providers_each_serve_a_part_and_a_liar_is_dropped(node_factory):
    req = node_factory("fake.dev")
    provs = [node_factory(f"p{i}.dev") for i in (1, 2, 3)]
    liar = node_factory("liar.dev", start=False)
    liar.env = dict(liar.env, KINODE_TEST_LIE_AFTER_READS="0")   # each provider's first read of pieces has a byte flipped
    liar.start()
    src = provs[0].files / "big.bin"
    digest = write_random(src, 16 << 20)
    for p in [*provs[1:], liar]:
        (p.files / "big.bin").write_bytes(src.read_bytes())
    # three honest providers: each serves a part, and nobody is named (the control for the liar below)
    lines = download(req, "big.bin", "p1.dev,p2.dev,p3.dev")
    assert any("big.bin downloaded from p1.dev,p2.dev,p3.dev" in ln for ln in lines), lines
    assert sha256(req.files / "big.bin") == digest
    served = served_by(req, "big.bin")
    assert set(served) == {"p1.dev", "p2.dev", "p3.dev"} and all(served.values()), served
    assert not [ln for ln in req.lines if re.search(r"dropped|skipped|different content|error", ln)], req.lines[-20:]
    partial = req.files / ".partial"   # its partial folder removed (then .partial, empty, by file_transfer)
    assert not partial.exists() or not list(partial.iterdir()), list(partial.iterdir())
    # a liar among them: caught by the piece's hash, named, dropped; its piece fetched from another
    (req.files / "big.bin").unlink()
    download(req, "big.bin", "p1.dev,liar.dev,p2.dev")
    liar.expect(r"test lie: .* flipped a byte of read 1 of", 10)
    assert sha256(req.files / "big.bin") == digest
    named = [ln for ln in req.lines if "liar.dev sent a chunk that failed its integrity check; dropped" in ln]
    assert len(named) == 1, req.lines[-20:]
    assert not [ln for ln in req.lines if re.search(r"big\.bin: p[12]\.dev .*dropped", ln)], req.lines[-20:]


def test_nodes_other_content_missing_file_and_unknown_node(node_factory):
    req = node_factory("fake.dev")
    p1, p2, p3 = (node_factory(f"p{i}.dev") for i in (1, 2, 3))
    digest = write_random(p1.files / "f.bin", 12 << 20)
    (p2.files / "f.bin").write_bytes((p1.files / "f.bin").read_bytes())
    write_random(p3.files / "f.bin", 12 << 20)                       # same name, other content
    download(req, "f.bin", "p3.dev,p1.dev,ghost.dev,p2.dev")
    assert sha256(req.files / "f.bin") == digest
    assert any("f.bin: p3.dev has different content" in ln and "not used" in ln for ln in req.lines), req.lines[-20:]
    assert any("f.bin: ghost.dev" in ln and "dropped" in ln for ln in req.lines), req.lines[-20:]
    assert set(served_by(req, "f.bin")) == {"p1.dev", "p2.dev"}
    # nobody can send it: one clear error naming each
    code, lines = req.run(f"{DL} none.bin p1.dev,ghost.dev", until=r"none\.bin downloaded|error:", timeout=120)
    err = next(ln for ln in lines if "error:" in ln)
    assert "no listed node can send none.bin" in err and "p1.dev: no such file" in err and "ghost.dev" in err, err
    assert not (req.files / "none.bin").exists()
    # a file too small to split: fetched whole from the first node that has it, as an ordinary download
    (p2.files / "small.txt").write_bytes(b"hello world\n")
    (p1.files / "small.txt").write_bytes(b"hello world\n")
    lines = download(req, "small.txt", "p2.dev,p1.dev")
    assert (req.files / "small.txt").read_bytes() == b"hello world\n"
    assert any("small.txt: no listed node can send pieces of it; fetching it whole from p2.dev alone" in ln
               for ln in req.lines), req.lines[-20:]
    assert any("small.txt downloaded from p2.dev,p1.dev" in ln for ln in lines), lines
    # a folder comes from one node: refused as soon as a Size shows it, nothing saved
    for p in (p1, p2):
        (p.files / "docs").mkdir()
        (p.files / "docs" / "a.txt").write_bytes(b"a\n")
    code, lines = req.run(f"{DL} docs p1.dev,p2.dev", until=r"docs downloaded|error:", timeout=60)
    assert any("docs is a folder on p" in ln and "download a folder from one node" in ln for ln in lines), lines
    assert not (req.files / "docs").exists()
    # the list is checked before anything starts
    code, lines = req.run(f"{DL} f.bin p1.dev,,p2.dev", until=r"error|downloaded", timeout=30)
    assert any("a name between two commas is missing" in ln for ln in lines), lines
    code, lines = req.run(f"{DL} f.bin p1.dev,fake.dev", until=r"error|downloaded", timeout=30)
    assert any("fake.dev is this node" in ln for ln in lines), lines


@pytest.mark.skipif(not (PORTABLE / "file_transfer" / "pkg" / "file_transfer_worker.wasm").exists()
                    and not os.environ.get("CI"),
                    reason="no portable build: run PORTABLE=1 PORTABLE_PACKAGES=file_transfer ./build.sh")
def test_nodes_a_plain_peer_in_the_list_is_named_and_skipped(node_factory):
    req = node_factory("fake.dev")
    p1 = node_factory("p1.dev", pause_after=1)   # holds before its second piece: the plain peer answers meanwhile
    plain = node_factory("plain.dev", extra_args=["--packages", str(PORTABLE)])
    p2 = node_factory("p2.dev")
    digest = write_random(p1.files / "f.bin", 24 << 20)   # three pieces or more: two asked of p1
    for p in (plain, p2):
        p.files.mkdir(parents=True, exist_ok=True)
        (p.files / "f.bin").write_bytes((p1.files / "f.bin").read_bytes())
    req.type(f"{DL} f.bin p1.dev,plain.dev,p2.dev")
    paused(p1)
    req.expect(r"plain\.dev does not support multi-source downloads of f\.bin \(it speaks the seed's plain "
               r"protocol\); skipped", 60)
    release(p1)
    req.expect(r"f\.bin downloaded from p1\.dev,plain\.dev,p2\.dev", 120)
    assert sha256(req.files / "f.bin") == digest
    assert set(served_by(req, "f.bin")) == {"p1.dev", "p2.dev"}


@pytest.fixture
def multi_net(tmp_path, monkeypatch):
    """tests/netns.py's namespaces, named multi<pid>...: a requestor and three providers on one bridge."""
    import netns as netns_mod
    why = netns_mod._can_make_namespaces()
    if why:
        pytest.skip(f"network namespaces cannot be made: {why}")
    monkeypatch.setattr(netns_mod, "PREFIX", f"multi{os.getpid()}")
    net = netns_mod.Netns(tmp_path)
    try:
        yield net
    finally:
        net.cleanup()


def test_netns_a_provider_paused_then_killed_mid_way_the_others_finish(multi_net):
    hosts = [multi_net.host(n) for n in ("r", "a", "b", "c")]
    names = ["req.dev", "a.dev", "b.dev", "c.dev"]
    # b holds before its second read of pieces, however fast the machine
    nodes = [multi_net.node(h, n, env={"KINODE_TEST_PAUSE_AFTER_CHUNKS": "1"} if n == "b.dev" else None)
             for h, n in zip(hosts, names)]
    entries = [n.entry(h.addr4) for n, h in zip(nodes, hosts)]
    nodes[0].set_peers(entries[1:])
    for n in nodes[1:]:
        n.set_peers(entries[:1])
    req, a, b, c = (n.start() for n in nodes)
    digest = write_random(a.files / "big.bin", 48 << 20)   # more pieces than the three are asked for at first
    for p in (b, c):
        p.files.mkdir(parents=True, exist_ok=True)
        (p.files / "big.bin").write_bytes((a.files / "big.bin").read_bytes())
    req.type(f"{DL} big.bin a.dev,b.dev,c.dev")
    paused(b)                # it sent its first piece and holds before the next
    code, lines = req.run("transfers:file_transfer:template.os", until=r"big\.bin from")
    rows = [m.group(1) for ln in lines if (m := re.search(r"(big\.bin from \S+):", ln))]
    assert code == 0 and rows == ["big.bin from a.dev,b.dev,c.dev"], lines   # one download, its providers in it
    b.kill()                 # then it vanishes, owing pieces
    req.expect(r"big\.bin downloaded from a\.dev,b\.dev,c\.dev", 120)
    assert sha256(req.files / "big.bin") == digest
    assert any("big.bin: b.dev" in ln and "dropped" in ln for ln in req.lines), req.lines[-20:]
    served = served_by(req, "big.bin")
    assert served.get("a.dev") and served.get("c.dev"), served
    # it held before its second read, and one read is at most the pieces asked of it at once
    assert served.get("b.dev", 0) <= ft_multi.DEPTH, served


def test_machines_drop_a_provider_that_stalls_and_finish_from_the_others(tmp_path, small):
    data = rand(600_000, 7)
    sim = Sim(tmp_path, {"a.os": data, "b.os": data, "c.os": data}, mute={"b.os"}).run()
    req = sim.machines["req"]
    assert "req" not in sim.exits and req.state == req.RECEIVING      # held by b's pieces
    owed = next(s for s in req.sources if s.node == "b.os").outstanding
    assert owed
    sim.act("req", req.handle(ft.SendFailed("tick", "timeout", ft_multi.PROVIDER_STALL - 1.0)))
    assert req.state == req.RECEIVING and not [ln for ln in sim.logs if "dropped" in ln]   # not yet
    sim.act("req", req.handle(ft.SendFailed("tick", "timeout", ft_multi.PROVIDER_STALL + 1.0)))
    sim.run(start=False)
    assert sim.exits["req"] is None and sim.final.read_bytes() == data, sim.logs
    assert any(f"b.os sent nothing for {ft_multi.PROVIDER_STALL} s; dropped" in ln for ln in sim.logs), sim.logs
    assert "b.os" not in sim.progress[-1]["served"]
    # one that goes offline is dropped at once
    (tmp_path / "z").mkdir()
    sim = Sim(tmp_path / "z", {"a.os": data, "b.os": data}, mute={"b.os"}).run()
    req = sim.machines["req"]
    sim.act("req", req.handle(ft.SendFailed("keepalive:b.os", "offline", 1.0)))
    sim.run(start=False)
    assert sim.exits["req"] is None and sim.final.read_bytes() == data, sim.logs
    assert any("b.os went offline; dropped" in ln for ln in sim.logs), sim.logs


def test_machines_a_fake_hash_of_the_whole_file_drops_its_sender_not_the_download(tmp_path, small):
    data = rand(600_000, 8)
    # the liar's hash is the only one in when the file is built: it is named, and an honest one awaited
    sim = Sim(tmp_path, {"l.os": data, "a.os": data, "b.os": data}, fake_hash={"l.os"},
              hold_hash={"a.os", "b.os"}).run()
    req = sim.machines["req"]
    assert "req" not in sim.exits and req.state == req.CHECKED, sim.logs   # every piece in, not renamed
    assert any("l.os sent a hash of the whole file that does not match the file its chunk list built; dropped"
               in ln for ln in sim.logs), sim.logs
    assert sim.part.exists() and not sim.final.exists()
    sim.send_held("a.os")
    assert sim.exits["req"] is None and sim.final.read_bytes() == data, sim.logs
    assert set(sim.progress[-1]["served"]) == {"l.os", "a.os", "b.os"}   # its pieces were good
    # every provider's hash differs: the download fails, naming them
    (tmp_path / "x").mkdir()
    sim = Sim(tmp_path / "x", {"l.os": data, "m.os": data}, fake_hash={"l.os", "m.os"}).run()
    err = sim.exits["req"] or ""
    assert "the hash of the whole file from l.os, m.os does not match" in err, (err, sim.logs)
    assert not sim.final.exists() and not sim.part.exists()


def test_machines_no_hash_of_the_whole_file_fails_clearly_after_the_stall_time(tmp_path, small):
    data = rand(600_000, 9)
    sim = Sim(tmp_path, {"a.os": data, "b.os": data}, hold_hash={"a.os", "b.os"}).run()
    req = sim.machines["req"]
    assert req.state == req.CHECKED and sim.part.read_bytes() == data, sim.logs   # built and checked
    sim.act("req", req.handle(ft.SendFailed("tick", "timeout", req.checked + ft.STALL_TIMEOUT - 1.0)))
    assert "req" not in sim.exits and req.state == req.CHECKED                  # not yet
    sim.act("req", req.handle(ft.SendFailed("tick", "timeout", req.checked + ft.STALL_TIMEOUT + 1.0)))
    err = sim.exits["req"] or ""
    assert (f"every piece was written and passed its check, but a.os, b.os sent no hash of the whole file within "
            f"{ft.STALL_TIMEOUT} s") in err, (err, sim.logs)


def test_machines_pieces_out_of_order_in_one_message_drop_the_sender_not_the_download(tmp_path, small):
    data = rand(600_000, 10)
    sim = Sim(tmp_path, {"x.os": data, "a.os": data, "b.os": data}, mute={"x.os", "a.os", "b.os"}).run()
    req = sim.machines["req"]
    x = next(s for s in req.sources if s.node == "x.os")
    sim.act("req", req.handle(ft.SendFailed("keepalive:a.os", "offline", 1.0)))   # its pieces back in the pool
    sim.send_pieces("x.os", [x.asked[0]], 0)    # one piece written: x is asked for one of a's, lower in the file
    assert sim.exits.get("req", "") == "" and req.left < len(req.pieces), sim.logs   # the control: written
    k = next(k for k in range(len(x.asked) - 1) if x.asked[k] > x.asked[k + 1])
    sim.send_pieces("x.os", x.asked[k:k + 2], k)   # two it owes, out of file order, in one message
    assert any("x.os sent pieces out of file order in one message; dropped" in ln for ln in sim.logs), sim.logs
    assert "req" not in sim.exits, sim.exits
    sim.unmute("b.os")
    assert sim.exits["req"] is None and sim.final.read_bytes() == data, sim.logs


def test_machines_a_local_disk_error_fails_the_download_without_blaming_a_provider(tmp_path, small, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(host_delta, "write_ranges", full)
    sim = Sim(tmp_path, {"a.os": rand(600_000, 11), "b.os": rand(600_000, 11)}).run()
    err = sim.exits["req"] or ""
    assert "writing f.bin on this node failed: [Errno 28] No space left on device" in err, (err, sim.logs)
    assert not [ln for ln in sim.logs if "dropped" in ln], sim.logs


def test_machines_a_node_that_never_lists_is_dropped_before_the_choice(tmp_path, small):
    data = rand(600_000, 12)
    sim = Sim(tmp_path, {"s.os": data, "a.os": data}, unlisted={"s.os"}).run()
    req = sim.machines["req"]
    assert req.state == req.ASKING and req.first_ready is not None, sim.logs   # a listed; s is awaited
    sim.act("req", req.handle(ft.SendFailed("tick", "timeout", req.first_ready + ft_multi.PROVIDER_STALL - 1.0)))
    assert req.state == req.ASKING and not [ln for ln in sim.logs if "dropped" in ln]   # not yet
    sim.act("req", req.handle(ft.SendFailed("tick", "timeout", req.first_ready + ft_multi.PROVIDER_STALL + 1.0)))
    sim.run(start=False)
    assert any(f"s.os sent no list of f.bin within {ft_multi.PROVIDER_STALL} s of the others; dropped" in ln
               for ln in sim.logs), sim.logs
    assert sim.exits["req"] is None and sim.final.read_bytes() == data, sim.logs
    assert set(sim.progress[-1]["served"]) == {"a.os"}


def test_machines_a_provider_idle_but_for_keepalives_ends(tmp_path, small):
    data = rand(600_000, 13)
    # every piece sent; the requestor waits for a hash and never says it is done
    sim = Sim(tmp_path, {"a.os": data, "b.os": data}, hold_hash={"a.os", "b.os"}).run()
    prov = sim.machines["a.os"]
    assert isinstance(prov, ft_multi.MultiProvider) and prov.state == prov.SENDING, prov.state
    since = prov.last_activity

    def keepalive(now: float) -> list:
        return prov.handle(ft.GotRequest(REQ_WORKER, {"Progress": {"name": "f.bin", "progress": 99}}, {"ft": 1},
                                         now, True, None))

    def tick(now: float) -> list:
        return prov.handle(ft.SendFailed("tick", "timeout", now))

    assert keepalive(since + ft.STALL_TIMEOUT - 5.0) == [ft.Reply("Progress")]   # answered
    assert not [a for a in tick(since + ft.STALL_TIMEOUT - 1.0) if isinstance(a, ft.Exit)]   # not yet
    out = tick(since + ft.STALL_TIMEOUT + 1.0)   # keepalives alone do not hold it
    assert isinstance(out[-1], ft.Exit) and prov.state == prov.FAILED, out
    told = next(a for a in out if isinstance(a, ft.Send) and a.target == REQ_WORKER)
    assert "asked for nothing for" in told.metadata["error"], told
    # the control: a new want list is activity
    (tmp_path / "y").mkdir()
    sim = Sim(tmp_path / "y", {"a.os": data, "b.os": data}, hold_hash={"a.os", "b.os"}).run()
    prov = sim.machines["a.os"]
    since = prov.last_activity
    prov.handle(ft.GotRequest(REQ_WORKER, {"Progress": {"name": "f.bin", "progress": 99}},
                              {"ft": 1, "want": [[0, 100]]}, since + ft.STALL_TIMEOUT - 5.0, True, None))
    assert not [a for a in prov.handle(ft.SendFailed("tick", "timeout", since + ft.STALL_TIMEOUT + 1.0))
                if isinstance(a, ft.Exit)] and prov.state != prov.FAILED


def test_machines_a_tie_between_different_contents_fails_naming_each(tmp_path, small):
    one, two = rand(600_000, 14), rand(600_000, 15)
    sim = Sim(tmp_path, {"a.os": one, "b.os": two}).run()
    err = sim.exits["req"] or ""
    assert "the listed nodes have different content of f.bin and none is in the majority (a.os and b.os)" in err, err
    assert not sim.final.exists()
    (tmp_path / "x").mkdir()
    sim = Sim(tmp_path / "x", {"a.os": one, "b.os": two, "c.os": one, "d.os": two}).run()
    assert "(a.os, c.os and b.os, d.os); list only nodes with the same file" in (sim.exits["req"] or ""), sim.exits
    # the control: a majority is followed
    (tmp_path / "y").mkdir()
    sim = Sim(tmp_path / "y", {"a.os": one, "b.os": two, "c.os": two}).run()
    assert sim.exits["req"] is None and (tmp_path / "y" / "f.bin").read_bytes() == two, sim.logs


def test_machines_every_listed_node_busy_is_a_clear_error(tmp_path, small):
    data = rand(600_000, 16)
    sim = Sim(tmp_path, {"a.os": data, "b.os": data}, busy={"a.os": 2, "b.os": 1}).run()
    err = sim.exits["req"] or ""
    assert "every listed node is busy serving others (a.os place 2, b.os place 1 in its queue); try again later" \
        in err, err
    # the control: one free node serves it all, the busy one is named
    (tmp_path / "y").mkdir()
    sim = Sim(tmp_path / "y", {"a.os": data, "b.os": data}, busy={"a.os": 2}).run()
    assert sim.exits["req"] is None and (tmp_path / "y" / "f.bin").read_bytes() == data, sim.logs
    assert any("a.os is busy serving others (place 2 in its queue); skipped" in ln for ln in sim.logs), sim.logs


def test_machines_a_folder_with_a_list_of_nodes_is_refused(tmp_path, small):
    parent = REQ_PARENT
    req = ft_multi.MultiRequestor("docs", Address("a.os,b.os", parent.process), parent, 0.0)
    req.handle(ft.Start())
    a = Address.parse("a.os@w1:file_transfer:template.os")
    b = Address.parse("b.os@w2:file_transfer:template.os")
    # the control: a file's Size is answered (its chunk list asked for)
    out = req.handle(ft.GotRequest(a, {"Size": 5 << 20}, {"ft": 1, "delta": 1, "multi": 1}, 0.0, True, None))
    assert isinstance(out[0], ft.Reply) and out[0].metadata["delta"]["multi"] == 1, out
    out = req.handle(ft.GotRequest(b, {"Size": 3}, {"ft": 1, "folder": {"files": 3}}, 0.0, True, None))
    assert isinstance(out[-1], ft.Exit), out
    assert out[-1].error == "docs is a folder on b.os: download a folder from one node (a list of nodes is for a file)"
    assert {a.target.node for a in out if isinstance(a, ft.Send) and a.metadata.get("error")} >= {"a.os", "b.os"}


def test_partial_folder_of_a_list_is_short_and_stable():
    many = ",".join(f"node-with-a-long-name-{i:03d}.os" for i in range(40))
    assert len(many) > 255
    name = ft_multi.partial_folder(many)
    assert re.fullmatch(r"multi-[0-9a-f]{16}", name), name
    assert name == ft_multi.partial_folder(",".join(reversed(many.split(","))))   # any order: the same
    assert name != ft_multi.partial_folder(many + ",other.os")                   # other nodes: another


def test_web_api_lists_and_downloads_from_a_list_of_nodes(node_factory):
    from test_http import FT, get_json, token_of
    req = node_factory("fake.dev")
    p1, p2 = node_factory("p1.dev"), node_factory("p2.dev")
    digest = write_random(p1.files / "w.bin", 12 << 20)
    (p2.files / "w.bin").write_bytes((p1.files / "w.bin").read_bytes())
    token = token_of(req)
    # the page lists a list's files from its first node, and a bad list is refused with the reason
    status, listing = get_json(req, f"{FT}/files?node=p1.dev,p2.dev", token)
    assert status == 200 and {"name": "w.bin", "size": 12 << 20} in listing["ListFiles"], listing
    status, out = get_json(req, f"{FT}/files?node=p1.dev,p1.dev", token)
    assert status == 400 and "named twice" in out["error"], out
    status, out = get_json(req, f"{FT}/download", token, "POST", {"name": "w.bin", "node": "p1.dev,,p2.dev"})
    assert status == 400 and "missing" in out["error"], out
    # one click downloads from both: each serves a part, one download in the history
    status, out = get_json(req, f"{FT}/download", token, "POST", {"name": "w.bin", "node": "p1.dev,p2.dev"})
    assert status == 200 and out == {"Download": {"Ok": None}}, out
    history = wait_for(lambda: get_json(req, f"{FT}/transfers", token)[1]["history"], 120, "the download's end")
    assert len(history) == 1 and "p1.dev,p2.dev" in json.dumps(history), history
    assert sha256(req.files / "w.bin") == digest
    served = served_by(req, "w.bin")
    assert set(served) == {"p1.dev", "p2.dev"} and all(served.values()), served


def test_machines_resume_skips_the_pieces_saved_and_another_list_starts_from_zero(tmp_path, small):
    data = rand(600_000, 17)
    # b never sends: a writes the rest, a tick saves the resume point, then the node "dies" (the Sim is left)
    sim = Sim(tmp_path, {"a.os": data, "b.os": data}, mute={"b.os"}).run()
    req = sim.machines["req"]
    assert req.state == req.RECEIVING and 0 < req.left < len(req.pieces), sim.logs
    assert sim.state is None                                   # saved only on a tick (each save syncs first)
    sim.act("req", req.handle(ft.SendFailed("tick", "timeout", 1.0)))
    saved = sim.state
    assert saved and saved["multi"] == 1 and saved["size"] == len(data) and saved["written"], saved
    part = sim.part.read_bytes()
    held = sum(n for _, n in saved["written"])
    assert all(part[o:o + n] == data[o:o + n] for o, n in saved["written"]) and 0 < held < len(data), saved
    # the same download again: the saved pieces are not asked for; the file is whole and checked
    again = Sim(tmp_path, {"b.os": data, "a.os": data}, state=saved).run()
    assert again.exits["req"] is None and again.final.read_bytes() == data, again.logs
    assert any(f"f.bin: resuming, {ft_multi.human_size(held)} of {ft_multi.human_size(len(data))} already here"
               in ln for ln in again.logs), again.logs
    served = again.progress[-1]["served"]
    assert sum(served.values()) == len(data) - held, (served, held)
    assert any(ln.endswith("was here already") for ln in again.logs if "served by" in ln), again.logs
    assert again.state is None                                 # removed with the download done
    # another file under the name: the point names another list, so it is dropped and all is fetched
    other = rand(600_000, 18)
    sim.part.write_bytes(part)
    (tmp_path / "f.bin").unlink()
    fresh = Sim(tmp_path, {"a.os": other, "b.os": other}, state=saved).run()
    assert fresh.exits["req"] is None and fresh.final.read_bytes() == other, fresh.logs
    assert any("the resume point here is for other content (another chunk list); starting from zero" in ln
               for ln in fresh.logs), fresh.logs
    assert not [ln for ln in fresh.logs if "resuming" in ln]
    assert sum(fresh.progress[-1]["served"].values()) == len(other)
    # a point that claims more than the partial holds, or that is not one, is not used either
    for bad, why in ((saved, "more than the partial on disk holds"), ({"multi": 1, "written": "x"}, "unreadable"),
                     (ft_multi.UNREADABLE, "unreadable")):
        sim.part.write_bytes(part[:saved["written"][-1][0]])
        (tmp_path / "f.bin").unlink()
        run = Sim(tmp_path, {"a.os": data, "b.os": data}, state=bad).run()
        assert run.exits["req"] is None and run.final.read_bytes() == data, run.logs
        assert any(f"the resume point here is {why}; starting from zero" in ln for ln in run.logs), run.logs
        assert sum(run.progress[-1]["served"].values()) == len(data)


def test_machines_a_stop_keeps_the_point_and_a_wrong_whole_file_removes_it(tmp_path, small):
    data = rand(600_000, 19)
    # every provider gone mid-way: the partial and a point naming what was written stay
    sim = Sim(tmp_path, {"a.os": data, "b.os": data}, mute={"b.os"}).run()
    req = sim.machines["req"]
    sim.act("req", req.handle(ft.SendFailed("keepalive:b.os", "offline", 1.0)))
    sim.act("req", req.handle(ft.SendFailed("keepalive:a.os", "offline", 1.0)))
    err = sim.progress[-1].get("error", "")
    assert "every provider dropped out" in err and err.endswith("(run the download again to resume)"), err
    assert sim.part.exists() and sim.state and sim.state["written"], sim.state
    # the point is right, the file is not (the providers' hash differs): all removed
    bad = Sim(tmp_path, {"a.os": data, "b.os": data}, state=sim.state, fake_hash={"a.os", "b.os"}).run()
    assert "does not match" in (bad.exits["req"] or ""), bad.exits
    assert bad.state is None and not bad.part.exists() and not bad.final.exists()


def test_nodes_the_requestor_killed_mid_way_resumes_without_fetching_again(node_factory):
    req = node_factory("fake.dev")
    p1, p2 = node_factory("p1.dev", pause_after=1), node_factory("p2.dev", pause_after=1)   # one piece each, then hold
    digest = write_random(p1.files / "big.bin", 48 << 20)   # six pieces or more (of up to 8 MiB)
    (p2.files / "big.bin").write_bytes((p1.files / "big.bin").read_bytes())
    state = req.files / ".partial" / ft_multi.partial_folder("p1.dev,p2.dev") / "big.bin.state"
    req.type(f"{DL} big.bin p1.dev,p2.dev")
    paused(p1)
    paused(p2)

    def point() -> dict | None:   # the resume point once it names a piece (saved each tick, after a sync)
        try:
            saved = json.loads(state.read_bytes())
        except (OSError, ValueError):
            return None
        return saved if saved.get("written") else None
    saved = wait_for(point, 30, "the resume point naming a written piece")
    req.kill()                    # kill -9, mid-way: the partial and its resume point stay
    held = sum(n for _, n in saved["written"])
    assert 0 < held < 48 << 20, saved
    part = (state.parent / "big.bin.part").read_bytes()
    src = (p1.files / "big.bin").read_bytes()
    assert all(part[o:o + n] == src[o:o + n] for o, n in saved["written"])   # what it names is on disk
    req.start()
    release(p1)
    release(p2)
    first = len(req.lines)
    lines = download(req, "big.bin", "p2.dev,p1.dev")   # any order: the same partial
    assert any("big.bin downloaded from p2.dev,p1.dev" in ln for ln in lines), lines
    assert sha256(req.files / "big.bin") == digest
    after = req.lines[first:]
    resumed = [m for ln in after if (m := re.search(r"big\.bin: resuming, ([\d.]+) MiB of 48\.0 MiB already here", ln))]
    assert resumed and float(resumed[0].group(1)) > 0, after[-20:]
    pieces = next(int(m.group(1)) for ln in after if (m := re.search(r"big\.bin: 48\.0 MiB in (\d+) pieces", ln)))
    served = served_by(req, "big.bin")
    assert served and 0 < sum(served.values()) < pieces, (served, pieces)   # the pieces here were not fetched again
    assert any("was here already" in ln for ln in after if "big.bin: served by" in ln), after[-20:]
    assert not state.exists()


def test_machines_every_piece_here_but_no_hash_came_resumes_by_fetching_one_piece(tmp_path, small):
    data = rand(600_000, 20)
    sim = Sim(tmp_path, {"a.os": data, "b.os": data}, hold_hash={"a.os", "b.os"}).run()
    req = sim.machines["req"]
    sim.act("req", req.handle(ft.SendFailed("tick", "timeout", req.checked + ft.STALL_TIMEOUT + 1.0)))
    assert "sent no hash of the whole file" in (sim.exits["req"] or ""), sim.exits
    assert sim.state and sim.state["written"] == [[0, len(data)]] and sim.part.read_bytes() == data, sim.state
    again = Sim(tmp_path, {"a.os": data, "b.os": data}, state=sim.state).run()
    assert again.exits["req"] is None and again.final.read_bytes() == data, again.logs
    last = again.machines["req"].pieces[-1][1]   # fetched again, so a provider hashes the file whole
    assert sum(again.progress[-1]["served"].values()) == last, again.progress[-1]
    assert any(f"resuming, {ft_multi.human_size(len(data) - last)} of" in ln for ln in again.logs), again.logs


# ---- an older copy here: only what changed is fetched ----------------------------------------------
def changed(data: bytes, seed: int, n: int = 3) -> bytes:
    """`data` with `n` short stretches overwritten (a few chunks differ)."""
    out = bytearray(data)
    r = random.Random(seed)
    for k in range(n):
        at = (k + 1) * len(data) // (n + 1)
        out[at:at + 50] = r.randbytes(50)
    return bytes(out)


def test_machines_an_old_copy_gives_its_chunks_and_only_the_changes_are_fetched(tmp_path, small):
    old = rand(600_000, 30)
    new = changed(old, 31)
    sim = Sim(tmp_path, {"a.os": new, "b.os": new, "c.os": new}, old=old).run()
    assert sim.exits["req"] is None, sim.logs
    assert sim.final.read_bytes() == new
    done = sim.progress[-1]
    served = sum(done["served"].values())
    assert 0 < served < len(new) // 5, done   # a few chunks around three changes
    assert done["moved"] >= served and done["bytes"] == len(new), done
    line = next(ln for ln in sim.logs if "served by" in ln)
    assert line.endswith(f"{ft_multi.human_size(len(new) - served)} came from the copy this node had"), line
    assert any("are in the copy this node has; fetching" in ln for ln in sim.logs), sim.logs
    # the control: no old copy, the same providers serve the whole file
    (tmp_path / "x").mkdir()
    plain = Sim(tmp_path / "x", {"a.os": new, "b.os": new, "c.os": new}).run()
    assert plain.final.read_bytes() == new and sum(plain.progress[-1]["served"].values()) == len(new)
    assert "moved" not in plain.progress[-1]
    # the old copy is the new content already: one piece is fetched all the same (its provider then
    # hashes the file whole), and the old copy counts as the same content
    (tmp_path / "y").mkdir()
    same = Sim(tmp_path / "y", {"a.os": new, "b.os": new}, old=new).run()
    assert same.exits["req"] is None and same.final.read_bytes() == new, same.logs
    assert 0 < sum(same.progress[-1]["served"].values()) <= 64 << 10, same.progress[-1]
    assert "replaced" not in same.progress[-1]


def test_machines_an_old_copy_chunked_when_the_last_size_comes_or_when_the_list_is_chosen(tmp_path, small):
    old = rand(600_000, 37)
    new = changed(old, 38)
    # a missing file named last: every Size is in before its refusal, so the old copy is chunked at the
    # choice; named first, after the last Size; a plain peer: at the choice
    for i, (files, plain) in enumerate((({"a.os": new, "b.os": new, "d.os": None}, set()),
                                        ({"d.os": None, "a.os": new, "b.os": new}, set()),
                                        ({"a.os": new, "p.os": new, "b.os": new}, {"p.os"}))):
        (tmp_path / str(i)).mkdir()
        sim = Sim(tmp_path / str(i), files, old=old, plain=plain).run()
        assert sim.exits["req"] is None and sim.final.read_bytes() == new, sim.logs
        assert 0 < sum(sim.progress[-1]["served"].values()) < len(new) // 5, sim.progress[-1]


def test_machines_an_old_copy_with_a_liar_a_changed_copy_and_a_stale_list(tmp_path, small):
    old = rand(600_000, 32)
    new = changed(old, 33)
    # a liar among the providers: named and dropped, its pieces fetched from the others, the file whole
    sim = Sim(tmp_path, {"a.os": new, "b.os": new, "c.os": new}, old=old, lie={"b.os"}).run()
    assert sim.exits["req"] is None and sim.final.read_bytes() == new, sim.logs
    assert any("b.os sent a chunk that failed its integrity check; dropped" in ln for ln in sim.logs), sim.logs
    assert sum(sim.progress[-1]["served"].values()) < len(new) // 5
    # every provider lies: the download fails and the old copy is as it was
    (tmp_path / "x").mkdir()
    bad = Sim(tmp_path / "x", {"a.os": new, "b.os": new}, old=old, lie={"a.os", "b.os"}).run()
    assert "every provider dropped out" in (bad.exits["req"] or ""), bad.logs
    assert bad.final.read_bytes() == old
    # the old copy changed after it was chunked: the host refuses the copy, those chunks are fetched instead
    (tmp_path / "y").mkdir()
    moved = Sim(tmp_path / "y", {"a.os": new, "b.os": new}, old=old, old_changes=True).run()
    assert moved.exits["req"] is None and moved.final.read_bytes() == new, moved.logs
    assert any("copying from the copy this node has failed (the old copy changed since it was chunked); fetching "
               "those" in ln for ln in moved.logs), moved.logs
    assert sum(moved.progress[-1]["served"].values()) == len(new) and "moved" not in moved.progress[-1]
    # a stale list kept for the old copy: the file built matches no provider's hash; nobody is blamed, the
    # copied chunks are fetched instead and the file passes
    (tmp_path / "z").mkdir()
    stale = Sim(tmp_path / "z", {"a.os": new, "b.os": new}, old=old, stale_list=new).run()
    assert stale.exits["req"] is None and stale.final.read_bytes() == new, stale.logs
    assert any("matches no provider's hash of the whole file; fetching those" in ln for ln in stale.logs), stale.logs
    assert not [ln for ln in stale.logs if "dropped" in ln] and stale.forgot, stale.logs


def test_machines_a_resumed_download_still_copies_from_the_old_copy(tmp_path, small):
    old = rand(600_000, 35)
    new = changed(old, 36, n=8)
    sim = Sim(tmp_path, {"a.os": new, "b.os": new}, old=old, mute={"b.os"}).run()
    req = sim.machines["req"]
    assert req.state == req.RECEIVING and 0 < req.left < len(req.pieces), sim.logs
    sim.act("req", req.handle(ft.SendFailed("tick", "timeout", 1.0)))
    saved = sim.state
    held = sum(n for _, n in saved["written"])
    assert sim.final.read_bytes() == old and held > 0, saved   # the old copy untouched meanwhile
    again = Sim(tmp_path, {"b.os": new, "a.os": new}, old=old, state=saved).run()
    assert again.exits["req"] is None and again.final.read_bytes() == new, again.logs
    line = next(ln for ln in again.logs if "served by" in ln)
    assert "was here already" in line and "came from the copy this node had" in line, line
    pieces = sum(p[1] for p in again.machines["req"].pieces)
    assert sum(again.progress[-1]["served"].values()) == pieces - held


UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def size_of(text: str) -> float:
    n, unit = text.split()
    return float(n) * UNITS[unit]


def test_nodes_an_old_copy_here_moves_only_the_changes_from_three_and_a_liar_is_dropped(node_factory):
    req = node_factory("fake.dev")
    provs = [node_factory(f"p{i}.dev") for i in (1, 2, 3)]
    liar = node_factory("liar.dev", start=False)
    liar.env = dict(liar.env, KINODE_TEST_LIE_AFTER_READS="0")   # its first read of pieces has a byte flipped
    liar.start()
    size = 24 << 20
    new = rand(size, 41)   # fixed bytes: the same chunks each run (their sizes vary, 768 KiB to 4 MiB)
    for p in [*provs, liar]:
        (p.files / "big.bin").write_bytes(new)
    digest = sha256(provs[0].files / "big.bin")
    old = changed(new, 40, n=4)   # four stretches of 50 bytes differ: a few chunks of about 1 MiB

    def fetch(nodes: str) -> tuple[str, float]:
        """Download big.bin from `nodes`; -> (its done line, bytes the providers served)."""
        first = len(req.lines)
        lines = download(req, "big.bin", nodes)
        done = next(ln for ln in lines if "big.bin downloaded from" in ln)
        line = wait_for(lambda: next((ln for ln in req.lines[first:] if "big.bin: served by" in ln), None), 30,
                        "the served line")
        return done, sum(size_of(m.group(1)) for m in re.finditer(r"\d+ pieces \(([\d.]+ \w+)\)", line))

    # the old copy here: only the changed chunks travel, the rest is copied from it
    (req.files / "big.bin").write_bytes(old)
    done, served = fetch("p1.dev,p2.dev,p3.dev")
    assert sha256(req.files / "big.bin") == digest
    moved = re.search(r"only ([\d.]+ \w+) moved, the rest came from the copy this node had", done)
    assert moved and 0 < served < size // 3 and 0 < size_of(moved.group(1)) < size // 3, (done, served)
    assert "it replaced the big.bin this node had" in done, done
    assert not [ln for ln in req.lines if re.search(r"dropped|skipped|different content|error", ln)], req.lines[-20:]
    # the control: no old copy, the same three serve the whole file
    (req.files / "big.bin").unlink()
    done, served = fetch("p1.dev,p2.dev,p3.dev")
    assert sha256(req.files / "big.bin") == digest and served > size * 0.99 and "moved" not in done, (done, served)
    # a liar among them while the old copy is used: named, dropped, its piece fetched from another
    (req.files / "big.bin").write_bytes(old)
    done, served = fetch("p1.dev,liar.dev,p2.dev")
    liar.expect(r"test lie: .* flipped a byte of read 1 of", 10)
    assert sha256(req.files / "big.bin") == digest and served < size // 3, (done, served)
    assert len([ln for ln in req.lines if "liar.dev sent a chunk that failed its integrity check; dropped" in ln]) == 1
    # the liar alone (the other listed node does not exist): the download fails, the old copy untouched
    (req.files / "big.bin").write_bytes(old)
    code, lines = req.run(f"{DL} big.bin liar.dev,ghost.dev", until=r"big\.bin downloaded|error:", timeout=120)
    assert any("error:" in ln and "liar.dev sent a chunk that failed its integrity check" in ln for ln in lines), lines
    liar.expect(r"test lie: .* flipped a byte of read 1 of", 10)
    assert (req.files / "big.bin").read_bytes() == old


def test_nodes_an_old_copy_changed_mid_way_is_refused_and_its_chunks_fetched_instead(node_factory):
    req = node_factory("fake.dev")
    p1 = node_factory("p1.dev", pause_after=1)   # holds before its second read of pieces
    size = 24 << 20
    new = rand(size, 41)
    (p1.files / "big.bin").write_bytes(new)
    digest = sha256(p1.files / "big.bin")
    old = changed(new, 40, n=4)   # four pieces, more than one read of up to 4 MiB
    (req.files / "big.bin").write_bytes(old)
    req.type(f"{DL} big.bin p1.dev,ghost.dev")   # ghost.dev does not exist: p1 serves alone
    paused(p1)
    req.expect(r"big\.bin: [\d.]+ MiB of 24\.0 MiB are in the copy this node has; fetching", 30)
    os.utime(req.files / "big.bin", ns=(10**18, 10**18))   # the old copy "changes" after it was chunked
    release(p1)
    req.expect(r"big\.bin: copying from the copy this node has failed \(.*changed.*\); fetching those", 60)
    done = req.expect(r"big\.bin downloaded from p1\.dev,ghost\.dev", 60)
    assert sha256(req.files / "big.bin") == digest and "moved" not in done, done
    served = served_by(req, "big.bin")
    assert served.get("p1.dev", 0) > 4, served   # the changed pieces, then the copied chunks' pieces


def test_machines_a_resume_point_lists_pieces_in_file_order_when_copies_were_fetched_after():
    """Pieces fetched instead of copied from the old copy have later ids but lower offsets: the saved
    point still lists its ranges in file order, so the next run resumes them."""
    req = ft_multi.MultiRequestor("f.bin", Address.parse("a.os,b.os@file_transfer:file_transfer:template.os"),
                                  REQ_PARENT, 0.0)
    req.size, req.list_digest, req.file_open, req.unsaved = 150, "ab" * 32, True, True
    req.pieces = [(100, 50, []), (0, 100, [])]   # id 1: a copy fetched after the old copy failed
    req.done = {0, 1}
    actions: list = []
    req._save(actions)
    saved = json.loads(next(a for a in actions if isinstance(a, ft_multi.SavePieces)).data)
    assert saved["written"] == [[0, 150]], saved
    req.saved, req.partial_len = saved, 150   # the next run reads it back
    assert req._resume_point() == ({0, 1}, ""), req._resume_point()


def test_machines_an_old_copy_too_big_to_chunk_in_time_is_not_used(tmp_path, small, monkeypatch):
    old = rand(600_000, 40)
    new = changed(old, 41)
    monkeypatch.setattr(ft_multi, "DELTA_MAX", len(old) - 1)
    sim = Sim(tmp_path, {"a.os": new, "b.os": new}, old=old).run()
    assert sim.exits["req"] is None and sim.final.read_bytes() == new, sim.logs
    assert sum(sim.progress[-1]["served"].values()) == len(new) and "moved" not in sim.progress[-1]
    # the control: at the limit, it is used
    monkeypatch.setattr(ft_multi, "DELTA_MAX", len(old))
    (tmp_path / "x").mkdir()
    used = Sim(tmp_path / "x", {"a.os": new, "b.os": new}, old=old).run()
    assert used.exits["req"] is None and sum(used.progress[-1]["served"].values()) < len(new) // 5, used.progress
