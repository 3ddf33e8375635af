"""The transfer protocol's state machines (components/file_transfer/common/ft_protocol.py) on plain
CPython: a requestor and a provider wired together through an in-memory network and file store,
with BLAKE3 computed here, plus each machine fed a lying or silent peer directly."""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
COMMON = str(REPO / "components/file_transfer/common")   # the guests' shared modules, top-level as in a guest
if COMMON not in sys.path:
    sys.path.insert(0, COMMON)

import ft_common  # noqa: E402
import ft_protocol as ft  # noqa: E402

from host.kinode_types import Address  # noqa: E402
from host.net.noise import MAX_MESSAGE  # noqa: E402

REQ_WORKER = Address.parse("alice.os@w1:file_transfer:template.os")
REQ_PARENT = Address.parse("alice.os@file_transfer:file_transfer:template.os")
PEER_MAIN = Address.parse("bob.os@file_transfer:file_transfer:template.os")
PROV_WORKER = Address.parse("bob.os@w2:file_transfer:template.os")
PROV_PARENT = PEER_MAIN
STRANGER = Address.parse("bob.os@other:file_transfer:template.os")

VISITED: dict[str, set] = {"Requestor": set(), "Provider": set()}


def _tracked(cls):
    class Tracked(cls):
        def __setattr__(self, key, value):
            if key == "state":
                VISITED[cls.__name__].add(value)
                self.__dict__.setdefault("trail", []).append(value)  # this machine's states, in order
            super().__setattr__(key, value)
    Tracked.__name__ = cls.__name__
    return Tracked


Requestor = _tracked(ft.Requestor)
Provider = _tracked(ft.Provider)


def h(data: bytes) -> str:
    return blake3(data).hexdigest()


@contextlib.contextmanager
def small_chunks(chunk: int = 16, ext_chunk: int = 64, window: int = ft_common.WINDOW, state_every: int = 2):
    """Shrink the chunk sizes so a file of a few hundred bytes has many chunks."""
    saved = {k: getattr(ft, k) for k in ("CHUNK_SIZE", "EXT_CHUNK_SIZE", "WINDOW", "STATE_EVERY")}
    ft.CHUNK_SIZE, ft.EXT_CHUNK_SIZE, ft.WINDOW, ft.STATE_EVERY = chunk, ext_chunk, window, state_every
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ft, k, v)


@dataclass
class Msg:
    source: Any
    target: Any
    is_request: bool
    body: Any
    meta: dict
    expects: int | None = None
    context: str | None = None
    blob: bytes | None = None
    raw_meta: Any = None  # the metadata as the machine gave it (None: the message has none)


def wire(x: Any) -> Any:
    """What the other side parses: the value through JSON."""
    return json.loads(json.dumps(x))


class RequestorSide:
    """A requestor worker's I/O, in memory: the partial, its state file, the finished file.
    Not `extended` (a portable worker): it cannot hash, and a hashing action fails the test."""

    def __init__(self, store: dict | None = None, extended: bool = True):
        self.extended = extended
        self.store = store if store is not None else {}  # "part", "state", "file"
        self.chain = None
        self.blob: bytes | None = None
        self.cursor = 0
        self.fail_io: set = set()  # action types that raise

    def perform(self, m, a) -> list | None:
        if type(a).__name__ in self.fail_io:
            raise OSError(f"{type(a).__name__} failed")
        if not self.extended:
            assert not isinstance(a, ft.HashChunk) and not (isinstance(a, ft.VerifyFile) and a.read_back), \
                f"a portable requestor cannot hash: {a}"
        s = self.store
        if isinstance(a, ft.LoadState):
            saved = json.loads(s["state"]) if "state" in s else None
            return m.state_loaded(saved, len(s["part"]) if "part" in s else None, 0.0)
        if isinstance(a, ft.OpenPartial):
            if a.offset:
                s.setdefault("part", bytearray())
                del s["part"][a.offset:]
            else:
                s["part"] = bytearray()
            self.cursor = a.offset
            return m.partial_opened(0.0)
        if isinstance(a, ft.SaveState):
            s["state"] = json.dumps({"size": a.size, "verified": a.verified})
        elif isinstance(a, ft.HashChunk):
            if a.restart:
                self.chain = blake3()
            self.chain.update(self.blob)
            return m.chunk_hashed(self.chain.hexdigest(), 0.0)
        elif isinstance(a, ft.WriteChunk):
            if a.seek:
                self.cursor = a.offset
            part = s["part"]
            if len(part) < self.cursor:
                part.extend(bytes(self.cursor - len(part)))
            part[self.cursor:self.cursor + len(self.blob)] = self.blob
            self.cursor += len(self.blob)
            return m.chunk_written(0.0)
        elif isinstance(a, ft.VerifyFile):
            return m.file_verified(h(bytes(s["part"])) if a.read_back else None, 0.0)
        elif isinstance(a, ft.Rename):
            new = bytes(s.pop("part"))
            replaced = "file" in s and s["file"] != new
            s["file"] = new
            return m.renamed(replaced, 0.0)
        elif isinstance(a, ft.RemoveFiles):
            if a.state:
                s.pop("state", None)
            if a.partial:
                s.pop("part", None)
        elif isinstance(a, ft.KeepForResume):
            s["state"] = json.dumps({"size": a.size, "verified": a.verified})
        else:
            raise AssertionError(f"unexpected requestor action {a}")
        return None


class ProviderSide:
    """A provider worker's I/O, in memory: the file being sent and its stamp. Not `extended`: it
    cannot hash, as RequestorSide."""

    def __init__(self, data: bytes | None, stamp: int = 1, extended: bool = True):
        self.extended = extended
        self.data, self.stamp = data, stamp
        self.cursor = 0
        self.chain = None
        self.blob: bytes | None = None
        self.short_read = False

    def perform(self, m, a) -> list | None:
        if not self.extended:
            assert not (isinstance(a, ft.ReadChunk) and a.hash != ft.HASH_NONE) and \
                not (isinstance(a, ft.CheckFile) and a.read_back), f"a portable provider cannot hash: {a}"
        if isinstance(a, ft.OpenFile):
            if self.data is None:
                return m.io_failed("no such file", 0.0)
            return m.opened(len(self.data), self.stamp, 0.0)
        if isinstance(a, ft.Seek):
            self.cursor = a.offset
        elif isinstance(a, ft.ReadChunk):
            self.blob = self.data[self.cursor:self.cursor + a.length]
            if self.short_read:
                self.blob = self.blob[:-1]
            self.cursor += len(self.blob)
            digest = None
            if a.hash == ft.HASH_WHOLE:
                digest = h(self.blob)
            elif a.hash in (ft.HASH_CHAIN, ft.HASH_CHAIN_RESTART):
                if a.hash == ft.HASH_CHAIN_RESTART:
                    self.chain = blake3()
                self.chain.update(self.blob)
                digest = self.chain.hexdigest()
            return m.chunk_read(len(self.blob), digest, 0.0)
        elif isinstance(a, ft.CheckFile):
            return m.file_checked(self.stamp, h(self.data) if a.read_back else None, 0.0)
        else:
            raise AssertionError(f"unexpected provider action {a}")
        return None


class Net:
    """Both workers and their parents, messages delivered in order; each worker extended (built
    with the blobs extension) or portable."""

    def __init__(self, data: bytes | None, store: dict | None = None, name: str = "f.bin",
                 stall_acks: bool = False, req_extended: bool = True, prov_extended: bool = True):
        self.name = name
        self.prov_extended = prov_extended
        self.req = Requestor(name, PEER_MAIN, REQ_PARENT, 0.0, extended=req_extended)
        self.rside = RequestorSide(store, req_extended)
        self.pside = ProviderSide(data, extended=prov_extended)
        self.prov: ft.Provider | None = None
        self.queue: list[Msg] = []
        self.sent: list[Msg] = []       # every message, in order
        self.logs: list[str] = []
        self.exits: dict[str, str | None] = {}
        self.progress: list[dict] = []  # what the requestor told its parent
        self.serving: list[dict] = []   # what the provider told its parent (its slot)
        self.queued_at: int | None = None  # the peer's main queues the Download at this place
        self.queue_asks: list[Msg] = []  # the requestor's asks about its place
        self.max_in_flight = 0
        self.stall_acks = stall_acks

    # the actions of one side, results fed back, messages queued
    def act(self, who: str, actions: list, current: Msg | None) -> None:
        me = REQ_WORKER if who == "req" else PROV_WORKER
        machine = self.req if who == "req" else self.prov
        side = self.rside if who == "req" else self.pside
        while actions:
            follow = None
            for i, a in enumerate(actions):
                if follow is not None:
                    raise AssertionError("an action with a result must be the last of its list")
                if isinstance(a, ft.Exit):
                    self.exits[who] = a.error
                    assert i == len(actions) - 1
                    return
                if isinstance(a, ft.Send):
                    blob = side.blob if a.forward_blob else None
                    self.post(Msg(me, a.target, True, wire(a.body), wire(a.metadata or {}), a.timeout, a.context, blob,
                                  a.metadata))
                elif isinstance(a, ft.Reply):
                    self.post(Msg(me, current.source, False, wire(a.body), wire(a.metadata or {}), None,
                                  current.context, raw_meta=a.metadata))
                elif isinstance(a, ft.Log):
                    self.logs.append(a.text)
                elif isinstance(a, ft.ArmTimer):
                    assert a.seconds == ft_common.TICK
                else:
                    try:
                        follow = side.perform(machine, a)
                    except OSError as e:  # as the driver does with a VfsError: the rest is not done
                        follow = machine.io_failed(str(e), 0.0)
                        break
            actions = follow
        if self.prov is not None:
            self.max_in_flight = max(self.max_in_flight, self.prov.in_flight)

    def post(self, m: Msg) -> None:
        self.sent.append(m)
        if m.target == REQ_PARENT:
            self.progress.append(m.meta)
        elif m.target == PROV_PARENT and m.source == PROV_WORKER:
            self.serving.append(m.meta)
        elif m.target == PEER_MAIN and m.meta.get(ft.QUEUE_META):
            self.queue_asks.append(m)
        elif m.target == PEER_MAIN and "Download" in m.body and self.queued_at:
            # the peer's file_transfer serves others first: it answers with our place
            self.queue.append(Msg(PEER_MAIN, REQ_WORKER, False, {"Download": {"Ok": None}},
                                  {"ft": 1, "queued": self.queued_at}, None, "download"))
        elif m.target == PEER_MAIN and "Download" in m.body:
            # the peer's file_transfer accepts and starts a provider worker
            self.queue.append(Msg(PEER_MAIN, REQ_WORKER, False, {"Download": {"Ok": None}}, {}, None, "download"))
            self.start_provider(m.body["Download"]["name"])
        else:
            self.queue.append(m)

    def start_provider(self, name: str) -> None:
        self.prov = Provider(name, REQ_WORKER, PROV_PARENT, 0.0, extended=self.prov_extended)
        self.act("prov", self.prov.start(), None)

    def deliver(self, m: Msg, now: float = 0.0) -> None:
        if m.target == REQ_WORKER:
            who, machine = "req", self.req
            self.rside.blob = m.blob
            if m.is_request:
                actions = machine.request(m.source, m.body, m.meta, m.expects is not None,
                                          None if m.blob is None else len(m.blob), now)
            else:
                actions = machine.response(m.context, m.body, now, m.meta)
        else:
            who, machine = "prov", self.prov
            if m.is_request:
                actions = machine.request(m.source, m.body, m.meta, now)
            elif self.stall_acks and m.context == "chunk":
                return
            else:
                actions = machine.response(m.context, m.meta, now)
        if who in self.exits:
            return
        self.act(who, actions, m)

    def run(self, limit: int = 100_000) -> Net:
        self.act("req", self.req.start(), None)
        steps = 0
        while self.queue and steps < limit:
            self.deliver(self.queue.pop(0))
            steps += 1
        return self

    def chunks(self) -> list[Msg]:
        return [m for m in self.sent if isinstance(m.body, dict) and "Chunk" in m.body]


def download(data: bytes, **kw) -> Net:
    return Net(data, **kw).run()


# ---- whole transfers -------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=700))
def test_any_file_arrives_whole_and_verified(data):
    with small_chunks():
        net = download(data)
    assert net.exits == {"req": None, "prov": None}
    assert net.rside.store == {"file": data}  # no partial, no state left behind
    assert net.req.state == ft.Requestor.DONE and net.prov.state == ft.Provider.DONE
    assert net.progress[-1]["done"] is True and net.progress[-1]["hash"] == h(data)
    assert net.max_in_flight <= 8


def test_window_keeps_a_full_window_in_flight_and_chains_hashes():
    data = bytes(range(256)) * 8  # 2048 bytes: 32 chunks of 64
    with small_chunks():
        net = download(data)
    assert net.rside.store == {"file": data}
    assert net.max_in_flight == ft_common.WINDOW > 1
    chunks = net.chunks()
    assert [c.body["Chunk"]["offset"] for c in chunks] == list(range(0, 2048, 64))
    for c in chunks:  # each chunk's `upto` is the hash of the file from 0 to its end
        end = c.body["Chunk"]["offset"] + c.body["Chunk"]["length"]
        assert c.meta["upto"] == h(data[:end]) and c.expects == ft_common.ACK_TIMEOUT
    final = [m for m in net.sent if m.meta.get("final")]
    assert len(final) == 1 and final[0].meta["blake3"] == h(data)
    # the final hash is the chunks' running hash: no read-back on either side
    assert net.sent.index(final[0]) > net.sent.index(chunks[-1])


def test_real_sizes_ext_chunks_and_state_saves():
    size = ft_common.EXT_CHUNK_SIZE
    assert size > ft_common.CHUNK_SIZE
    data = (b"0123456789abcdef" * 65536) * (2 * size // (1 << 20) + 1) + b"tail"  # three chunks: two whole
    net = download(data)
    assert net.rside.store == {"file": data}
    assert [c.body["Chunk"]["length"] for c in net.chunks()] == [size, size, (1 << 20) + 4]


def test_one_chunk_file_is_sent_behind_size_with_its_hash():
    data = b"hello world\n"
    net = download(data)
    size = [m for m in net.sent if "Size" in m.body][0]
    assert size.meta == {"ft": 1, "blake3": h(data)}
    first_chunk = net.chunks()[0]
    assert net.sent.index(first_chunk) == net.sent.index(size) + 1  # right behind Size, before its answer
    assert first_chunk.expects is None
    assert net.rside.store == {"file": data} and net.exits == {"req": None, "prov": None}


def test_empty_file_completes_at_100_percent():
    net = download(b"")
    assert net.rside.store == {"file": b""}
    assert net.progress[-1]["done"] is True and net.progress[-1]["hash"] == h(b"")


def test_missing_file_is_refused_and_nothing_is_kept():
    net = Net(None).run()
    assert "cannot read f.bin" in net.exits["req"]
    assert net.rside.store == {}
    assert net.logs[-1].startswith("upload of f.bin to alice.os stopped")


# ---- resume ----------------------------------------------------------------------------------------
def interrupted(data: bytes, after_chunks: int) -> dict:
    """Run a download until the requestor took `after_chunks` chunks, then lose the provider."""
    net = Net(data)
    net.act("req", net.req.start(), None)
    taken = 0
    while net.queue:
        m = net.queue.pop(0)
        if m.target == REQ_WORKER and "Chunk" in m.body:
            if taken == after_chunks:
                break
            taken += 1
        net.deliver(m)
    net.act("req", net.req.request_failed("keepalive", "offline", 1.0), None)
    assert "alice" not in (net.exits["req"] or "") and "went offline" in net.exits["req"]
    assert "run the download again to resume" in net.progress[-1]["error"]
    return net.rside.store


@pytest.mark.parametrize("after", [1, 3, 5, 9])
def test_resume_continues_from_the_saved_offset(after):
    data = bytes((i * 7) % 251 for i in range(1000))
    with small_chunks():
        store = interrupted(data, after)
        saved = json.loads(store["state"])
        assert saved["size"] == 1000 and saved["verified"] == after * 64
        net = Net(data, store=store).run()
    answer = [m for m in net.sent if m.context == "size" and not m.is_request][0]
    assert answer.meta == {"ft": 1, "offset": after * 64}
    assert net.chunks()[0].body["Chunk"]["offset"] == after * 64
    # the running hash restarts at the resume point
    assert net.chunks()[0].meta["upto"] == h(data[after * 64:after * 64 + 64])
    assert store == {"file": data} and net.exits == {"req": None, "prov": None}
    assert f"resuming at {after * 64} of 1000 bytes" in " ".join(net.logs)


def test_resume_of_a_changed_file_fails_and_removes_the_partial():
    data = bytes(1000)
    with small_chunks():
        store = interrupted(data, 4)
        changed = b"\x01" * 1000  # same size: the resume is allowed, the final check catches it
        net = Net(changed, store=store).run()
    assert "does not match the provider's hash" in net.exits["req"]
    assert store == {}


def test_a_state_that_does_not_fit_the_partial_starts_over():
    data = bytes(range(200)) * 5
    with small_chunks():
        store = {"part": bytearray(10), "state": json.dumps({"size": 1000, "verified": 500})}
        net = Net(data, store=store).run()
    answer = [m for m in net.sent if m.context == "size" and not m.is_request][0]
    assert answer.meta["offset"] == 0  # verified 500 > partial's 10 bytes
    assert store == {"file": data}


# ---- timeouts --------------------------------------------------------------------------------------
def test_requestor_gives_up_when_the_handshake_never_comes():
    r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    r.start()
    assert isinstance(r.tick(5.0)[-1], ft.ArmTimer)
    actions = r.tick(ft_common.HANDSHAKE_TIMEOUT + 0.5)
    assert actions[-1] == ft.Exit(f"bob.os did not start sending within {ft_common.HANDSHAKE_TIMEOUT} s")
    assert r.state == ft.Requestor.FAILED and r.tick(100.0) == []


def test_requestor_stalls_out_and_keeps_its_partial():
    data = bytes(300)
    with small_chunks():
        net = Net(data)
        net.act("req", net.req.start(), None)
        for _ in range(6):
            net.deliver(net.queue.pop(0))
        r = net.req
        assert r.state == ft.Requestor.RECEIVING
        net.act("req", r.tick(ft_common.STALL_TIMEOUT), None)  # just within the limit
        assert "req" not in net.exits
        net.act("req", r.tick(ft_common.STALL_TIMEOUT + 1), None)
    assert net.exits["req"] == f"no progress for {ft_common.STALL_TIMEOUT} s; giving up"
    assert "part" in net.rside.store and "state" in net.rside.store


def test_tick_sends_a_keepalive_when_none_is_outstanding():
    with small_chunks():
        net = Net(bytes(300))
        net.act("req", net.req.start(), None)
        while net.queue and not net.req.keepalive_out:
            net.deliver(net.queue.pop(0))
        assert net.req.tick(1.0) == [ft.ArmTimer(ft_common.TICK)]  # one is out: no second
        net.req.keepalive_out = False
        actions = net.req.tick(1.0)
    assert actions[0].context == "keepalive" and actions[0].target == PROV_WORKER


def test_provider_fails_when_acks_stop():
    with small_chunks():
        net = Net(bytes(1000), stall_acks=True).run()
        assert net.prov.in_flight == ft_common.WINDOW and "prov" not in net.exits
        net.act("prov", net.prov.tick(ft_common.STALL_TIMEOUT + 1), None)
    assert net.exits["prov"] == f"no progress for {ft_common.STALL_TIMEOUT} s; giving up"
    p = Provider("f", REQ_WORKER, PROV_PARENT, 0.0, extended=True)
    p.state, p.in_flight = ft.Provider.SENDING, 3
    assert p.request_failed("chunk", "timeout", 5.0)[-1] == ft.Exit("alice.os stopped acknowledging chunks (timeout)")


def test_requestor_fails_when_the_peer_never_answers_download():
    r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    r.start()
    assert r.request_failed("download", "offline", 1.0)[-1] == ft.Exit("bob.os is offline")
    r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    assert r.request_failed("download", "timeout", 1.0)[-1].error.endswith("did not answer within 10 s")
    assert r.request_failed("progress", "timeout", 1.0) == []  # advisory, and already failed anyway


def test_requestor_failing_before_the_size_leaves_an_older_partial_for_a_resume():
    """A retry while the provider is offline (or gone from its queue) must not cost the partial an
    earlier attempt kept; a provider that answers "no such file" may."""
    def fails(how):
        r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
        r.start()
        return how(r)
    out = fails(lambda r: r.request_failed("download", "offline", 1.0))
    assert out[-1] == ft.Exit("bob.os is offline")
    assert not any(isinstance(a, ft.RemoveFiles) and a.partial for a in out), out
    # positive control: the provider says the file is not there: the partial is of no use
    out = fails(lambda r: r.response("download", {"Download": {"Err": "no such file: f"}}, 1.0))
    assert isinstance(out[-1], ft.Exit)
    assert any(isinstance(a, ft.RemoveFiles) and a.partial for a in out), out


# ---- plain peers -----------------------------------------------------------------------------------
def test_provider_pushes_seed_sized_chunks_to_a_plain_requestor():
    data = bytes(range(100)) * 3
    with small_chunks():
        p = Provider("f.bin", REQ_WORKER, PROV_PARENT, 0.0, extended=True)
        side = ProviderSide(data)
        sent = []

        def run(actions):
            while actions:
                follow = None
                for a in actions:
                    if isinstance(a, ft.Send):
                        sent.append((a, side.blob if a.forward_blob else None))
                    elif not isinstance(a, (ft.ArmTimer, ft.Exit, ft.Log)):
                        follow = side.perform(p, a)
                actions = follow
        run(p.start())
        assert p.state == ft.Provider.OFFERED
        run(p.request_failed("size", "timeout", 10.0))  # no answer to Size
    assert p.state == ft.Provider.DONE
    chunks = [(a, b) for a, b in sent if "Chunk" in a.body]
    assert [a.body["Chunk"]["length"] for a, _ in chunks] == [16] * 18 + [12]  # the seed's chunk size
    assert all(a.metadata is None and a.timeout is None for a, _ in chunks)  # unacked, no hash
    assert b"".join(b for _, b in chunks) == data


def test_requestor_takes_a_plain_provider():
    data = b"a" * 40 + b"b" * 40
    with small_chunks():
        r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
        side = RequestorSide()
        net = Net(None)
        net.req, net.rside = r, side
        net.act("req", r.start(), None)
        net.queue.clear()
        net.deliver(Msg(PROV_WORKER, REQ_WORKER, True, {"Size": 80}, {}))
        assert not [m for m in net.sent if not m.is_request]  # a plain Size expects no answer
        for off in range(0, 80, 16):
            net.deliver(Msg(PROV_WORKER, REQ_WORKER, True, {"Chunk": {"name": "f", "offset": off, "length": 16}},
                            {}, blob=data[off:off + 16]))
    assert net.exits["req"] is None and side.store == {"file": data}
    assert not [m for m in net.sent if m.context == "keepalive"]  # keepalives are for our peers only


# ---- portable workers (built without the blobs extension: the seed's plain protocol) ----------------
MIXES = {"portable requestor, extended provider": (False, True),
         "extended requestor, portable provider": (True, False),
         "portable requestor, portable provider": (False, False)}


def between_workers(net: Net) -> list[Msg]:
    return [m for m in net.sent if not (m.target in (REQ_PARENT, PROV_PARENT) and m.source == REQ_WORKER)
            and not (m.target == PROV_PARENT and m.source == PROV_WORKER)]


@pytest.mark.parametrize("mix", MIXES)
@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=300))
def test_portable_worker_with_any_peer_moves_any_file_plainly(mix, data):
    req_ext, prov_ext = MIXES[mix]
    with small_chunks():  # the seed's chunk: 16 bytes here
        net = Net(data, req_extended=req_ext, prov_extended=prov_ext).run()
    assert net.exits == {"req": None, "prov": None}
    assert net.rside.store == {"file": data}  # no partial, no state file
    assert net.progress[-1]["done"] is True and net.progress[-1]["hash"] is None  # nothing was hashed
    # the plain protocol: Size answered without metadata, chunks of the seed's size, unacked
    answer = [m for m in net.sent if m.context == "size" and not m.is_request]
    assert len(answer) == 1 and answer[0].raw_meta is None
    one_chunk = req_ext is False and prov_ext and 0 < len(data) <= 16  # sent behind Size, hash ignored
    for c in net.chunks():
        assert c.expects is None and c.body["Chunk"]["length"] <= 16
        assert (c.raw_meta is None) is not one_chunk
    assert b"".join(c.blob for c in net.chunks()) == data
    assert not [m for m in net.sent if m.context == "keepalive" or m.meta.get("final")]
    download_request = [m for m in net.sent if m.target == PEER_MAIN][0]
    assert (download_request.raw_meta is None) is not req_ext  # {"ft": 1} only when it can speak it
    size = [m for m in net.sent if "Size" in m.body][0]
    assert size.expects == ft_common.HANDSHAKE_TIMEOUT and (size.raw_meta is None) is not prov_ext
    if not req_ext and not prov_ext:  # no extension in any message between the workers
        assert all(m.raw_meta is None for m in between_workers(net) if m.source != PEER_MAIN)


def test_portable_machines_take_the_plain_path_through_their_states():
    data = bytes(range(100))
    with small_chunks():
        net = Net(data, req_extended=False, prov_extended=False).run()
    R, P = ft.Requestor, ft.Provider

    def path(trail):  # a state set again is no step
        return [s for i, s in enumerate(trail) if i == 0 or trail[i - 1] != s]
    assert path(net.req.trail) == [R.REQUESTING, R.OPENING, R.RECEIVING] + [R.WRITING, R.RECEIVING] * 6 + \
        [R.WRITING, R.VERIFYING, R.DONE]  # no HASHING, no AWAITING_HASH
    assert path(net.prov.trail) == [P.OPENING, P.OFFERED, P.PUSHING, P.DONE]
    assert [c.body["Chunk"]["length"] for c in net.chunks()] == [16] * 6 + [4]


def test_extended_provider_goes_plain_on_a_plain_size_answer_whatever_it_holds():
    with small_chunks():
        p, side, out, run = offered(bytes(range(40)))
        run(p.response("size", {"offset": 7}, 0.0))  # no ft: a portable requestor's answer
    assert p.state == ft.Provider.DONE and out[-1] == ft.Exit()
    chunks = [a for a in out if isinstance(a, ft.Send) and "Chunk" in a.body]
    assert [c.body["Chunk"]["offset"] for c in chunks] == [0, 16, 32]  # from 0, the seed's chunks
    assert all(c.metadata is None and c.timeout is None for c in chunks)


def test_portable_provider_ignores_an_extended_size_answer():
    with small_chunks():
        p = Provider("f.bin", REQ_WORKER, PROV_PARENT, 0.0, extended=False)
        side = ProviderSide(bytes(40), extended=False)
        sends = []

        def run(actions):
            while actions:
                follow = None
                for a in actions:
                    if isinstance(a, ft.Send):
                        sends.append(a)
                    elif not isinstance(a, (ft.ArmTimer, ft.Exit, ft.Log)):
                        follow = side.perform(p, a)
                actions = follow
        run(p.start())
        assert sends[0].target == PROV_PARENT and sends[0].metadata["serving"] is True  # it tells its parent at once
        assert sends[1:] == [ft.Send(REQ_WORKER, {"Size": 40}, None, ft_common.HANDSHAKE_TIMEOUT, "size")]
        run(p.response("size", {"ft": 1, "offset": 16}, 0.0))  # it cannot resume nor hash
    assert p.state == ft.Provider.DONE
    assert [a.body["Chunk"]["offset"] for a in sends[2:-1]] == [0, 16, 32]
    assert sends[-1].target == PROV_PARENT and sends[-1].metadata["serving"] is False  # its slot is free


def test_portable_requestor_ignores_extensions_in_size_and_keeps_no_partial():
    r = Requestor("f.bin", PEER_MAIN, REQ_PARENT, 0.0, extended=False)
    assert r.start()[1].metadata is None
    with small_chunks():
        net = Net(bytes(200), req_extended=False)
        net.req = r
        net.act("req", [], None)
        net.deliver(Msg(PROV_WORKER, REQ_WORKER, True, {"Size": 200}, {"ft": 1}, 10, "size"))
        assert not r.ext and r.state == ft.Requestor.RECEIVING
        assert net.sent[-1].raw_meta is None and not net.sent[-1].is_request  # the plain answer
        net.deliver(Msg(PROV_WORKER, REQ_WORKER, True, {"Chunk": {"name": "f.bin", "offset": 0, "length": 16}},
                        {}, blob=bytes(16)))
        assert "req" not in net.exits and r.received == 16
        net.act("req", r.tick(ft_common.STALL_TIMEOUT + 1), None)
    assert net.exits["req"] == f"no progress for {ft_common.STALL_TIMEOUT} s; giving up"
    # no resume in the plain protocol: the partial goes, no error is sent to the provider
    assert net.rside.store == {} and "run the download again" not in net.progress[-1]["error"]
    assert not [m for m in net.sent if m.target == PROV_WORKER and m.meta.get("error")]


@pytest.mark.parametrize("extended", [True, False])
def test_provider_pushes_plainly_when_size_gets_no_answer(extended):
    """A seed requestor answers nothing: the provider's Size times out and it pushes."""
    with small_chunks():
        net = Net(bytes(range(50)), prov_extended=extended)
        net.act("req", net.req.start(), None)
        net.queue = [m for m in net.queue if m.target != REQ_WORKER]  # the requestor hears nothing
        net.act("prov", net.prov.request_failed("size", "timeout", 10.0), None)
    assert net.exits["prov"] is None
    assert [c.body["Chunk"]["length"] for c in net.chunks()] == [16, 16, 16, 2]


# ---- the one-chunk limit: the seed's chunk (1 MiB), which any requestor takes in one piece --------------
@pytest.mark.parametrize("req_ext", [True, False])
def test_file_of_one_seed_chunk_goes_behind_size(req_ext):
    data = bytes(range(256)) * 4096
    assert len(data) == ft_common.CHUNK_SIZE == 1 << 20
    net = Net(data, req_extended=req_ext).run()
    size = [m for m in net.sent if "Size" in m.body][0]
    assert size.meta == {"ft": 1, "blake3": h(data)}
    assert len(net.chunks()) == 1 and net.sent.index(net.chunks()[0]) == net.sent.index(size) + 1
    assert net.chunks()[0].expects is None and net.chunks()[0].body["Chunk"]["length"] == 1 << 20
    assert net.rside.store == {"file": data} and net.exits == {"req": None, "prov": None}
    assert net.progress[-1]["hash"] == (h(data) if req_ext else None)


def test_file_over_one_seed_chunk_waits_for_the_size_answer():
    data = bytes(range(256)) * 4096 + b"!"
    net = Net(data).run()
    size = [m for m in net.sent if "Size" in m.body][0]
    assert size.meta == {"ft": 1}  # its hash follows the last chunk
    answer = [m for m in net.sent if m.context == "size" and not m.is_request][0]
    chunks = net.chunks()
    assert len(chunks) == 1 and net.sent.index(chunks[0]) > net.sent.index(answer)
    assert chunks[0].expects == ft_common.ACK_TIMEOUT and chunks[0].meta["upto"] == h(data)  # one 4 MiB chunk
    assert net.rside.store == {"file": data} and net.exits == {"req": None, "prov": None}
    # a portable requestor gets it in the seed's chunks
    net = Net(data, req_extended=False).run()
    assert [c.body["Chunk"]["length"] for c in net.chunks()] == [1 << 20, 1]
    assert net.rside.store == {"file": data}
    # and a portable provider never sends a chunk before the Size answer
    net = Net(b"tiny", prov_extended=False).run()
    assert [m for m in net.sent if "Size" in m.body][0].raw_meta is None
    answer = [m for m in net.sent if m.context == "size" and not m.is_request][0]
    assert net.sent.index(net.chunks()[0]) > net.sent.index(answer) and net.rside.store == {"file": b"tiny"}


# ---- a lying peer ------------------------------------------------------------------------------------
def sized(size: int, meta: dict | None = None) -> tuple[Net, Requestor]:
    """A requestor that has taken Size from PROV_WORKER."""
    net = Net(None)
    net.act("req", net.req.start(), None)
    net.queue.clear()
    net.deliver(Msg(PROV_WORKER, REQ_WORKER, True, {"Size": size}, {"ft": 1} if meta is None else meta, 10, "size"))
    return net, net.req


def chunk(offset: int, data: bytes, upto: str | None, length: int | None = None, source=PROV_WORKER,
          name: str = "f.bin") -> Msg:
    return Msg(source, REQ_WORKER, True, {"Chunk": {"name": name, "offset": offset,
                                                     "length": len(data) if length is None else length}},
               {"ft": 1, "upto": upto}, 60, "chunk", data)


def test_liar_wrong_hash_fails_and_tells_the_provider():
    net, r = sized(20)
    net.deliver(chunk(0, b"x" * 10, "00" * 32))
    assert net.exits["req"] == "chunk at offset 0 failed its integrity check"
    told = [m for m in net.sent if m.target == PROV_WORKER and m.meta.get("error")]
    assert told and told[0].meta["error"] == net.exits["req"]
    assert net.rside.store["part"] == b"" and json.loads(net.rside.store["state"]) == {"size": 20, "verified": 0}


def test_liar_hash_of_the_chunk_alone_fails_the_second_chunk():
    net, r = sized(20)
    net.deliver(chunk(0, b"x" * 10, h(b"x" * 10)))
    assert "req" not in net.exits and r.received == 10
    net.deliver(chunk(10, b"y" * 10, h(b"y" * 10)))  # not the hash from 0
    assert net.exits["req"] == "chunk at offset 10 failed its integrity check"


def test_liar_wrong_offset_oversize_short_blob_and_malformed():
    cases = [
        (chunk(10, b"x" * 10, h(b"x" * 10)), "chunk at offset 10, expected 0"),
        (chunk(15, b"x" * 10, None), "does not fit the file (offset 15, length 10, 10 bytes, size 20)"),
        (chunk(0, b"x" * 9, None, length=10), "does not fit the file (offset 0, length 10, 9 bytes, size 20)"),
        (chunk(-1, b"", None), "does not fit the file"),
        (chunk(0, b"x", None, name="other"), "peer sent a malformed chunk"),
        (Msg(PROV_WORKER, REQ_WORKER, True, {"Chunk": {"name": "f.bin", "offset": "0", "length": 1}}, {}, blob=b"x"),
         "peer sent a malformed chunk"),
    ]
    for msg, expected in cases:
        net, r = sized(20)
        net.deliver(msg)
        assert expected in net.exits["req"], (msg, net.exits)
        assert r.state == ft.Requestor.FAILED


def test_liar_a_chunk_over_the_largest_size_fails_before_it_is_hashed_or_written():
    big = ft.BIG_CHUNK_SIZE
    data = b"x" * (big + 1)
    net, r = sized(2 * big)
    net.deliver(chunk(0, data, h(data)))
    assert net.exits["req"] == f"peer sent a chunk of {big + 1} bytes, over the {big} a chunk may have", net.exits
    assert net.rside.store["part"] == b""
    # a plain peer's chunks may be at most EXT_CHUNK_SIZE
    ext = ft.EXT_CHUNK_SIZE
    net, r = sized(2 * big, meta={})
    net.deliver(chunk(0, b"y" * (ext + 1), None))
    assert f"over the {ext} a chunk may have" in net.exits["req"], net.exits
    # the control: a chunk of the largest size is taken
    net, r = sized(2 * big)
    net.deliver(chunk(0, data[:big], h(data[:big])))
    assert "req" not in net.exits and r.received == big


def test_liar_stranger_chunk_is_ignored_and_the_transfer_goes_on():
    net, r = sized(20)
    net.deliver(chunk(0, b"z" * 10, h(b"z" * 10), source=STRANGER))
    assert "req" not in net.exits and r.received == 0 and r.chain_digest is None
    assert net.logs[-1] == f"worker: ignored a bad message from {STRANGER}: a Chunk not from this transfer's provider"
    net.deliver(chunk(0, b"x" * 10, h(b"x" * 10)))
    net.deliver(chunk(10, b"x" * 10, h(b"x" * 20)))
    assert r.state == ft.Requestor.AWAITING_HASH
    net.deliver(Msg(PROV_WORKER, REQ_WORKER, True, {"Progress": {"name": "f.bin", "progress": 100}},
                    {"ft": 1, "final": True, "blake3": h(b"x" * 20)}))
    assert net.exits["req"] is None and net.rside.store == {"file": b"x" * 20}


def test_liar_chunk_before_size_and_from_another_node_are_ignored():
    net = Net(None)
    net.act("req", net.req.start(), None)
    net.deliver(chunk(0, b"x", None))
    assert "Chunk before Size" in net.logs[-1] and net.req.state == ft.Requestor.REQUESTING
    other = Address.parse("carol.os@w:file_transfer:template.os")
    net.deliver(Msg(other, REQ_WORKER, True, {"Size": 5}, {"ft": 1}))
    assert "not the peer of this transfer" in net.logs[-1] and net.req.size is None


@pytest.mark.parametrize("final,expected", [
    ("00" * 32, "does not match the provider's hash"),
    ("not a hash", "peer sent a malformed file hash"),
    ("AB" * 32, "peer sent a malformed file hash"),
])
def test_liar_bad_final_hash(final, expected):
    net, r = sized(10)
    net.deliver(chunk(0, b"x" * 10, h(b"x" * 10)))
    net.deliver(Msg(PROV_WORKER, REQ_WORKER, True, {"Progress": {"name": "f.bin", "progress": 100}},
                    {"ft": 1, "final": True, "blake3": final}))
    assert expected in net.exits["req"]
    assert "file" not in net.rside.store and "part" not in net.rside.store  # nothing saved, nothing kept


@pytest.mark.parametrize("size", [-1, 2**63, "10", None, 1.5])
def test_liar_invalid_size(size):
    net, r = sized(size)
    assert net.exits["req"] == f"peer sent an invalid size {size!r}"


def test_second_size_is_ignored():
    net, r = sized(20)
    net.deliver(Msg(PROV_WORKER, REQ_WORKER, True, {"Size": 5}, {"ft": 1}))
    assert r.size == 20 and "second Size" in net.logs[-1]


@pytest.mark.parametrize("keep", [True, False])
def test_provider_error_keeps_the_partial_only_when_allowed(keep):
    with small_chunks():
        net, r = sized(200)
        net.deliver(chunk(0, b"x" * 64, h(b"x" * 64)))
        net.deliver(Msg(PROV_WORKER, REQ_WORKER, True, {"Size": 0}, {"ft": 1, "error": "boom", "keep": keep}))
    assert net.exits["req"] == "bob.os: boom"
    assert ("part" in net.rside.store) is keep


def test_cancel_from_the_parent_removes_the_partial():
    with small_chunks():
        net, r = sized(200)
        net.deliver(chunk(0, b"x" * 64, h(b"x" * 64)))
        net.deliver(Msg(REQ_PARENT, REQ_WORKER, True, {"Cancel": None}, {"cancel": True}))
    assert net.exits["req"] == "cancelled" and net.rside.store == {}
    p = Provider("f", REQ_WORKER, PROV_PARENT, 0.0, extended=True)
    assert p.request(PROV_PARENT, {"Cancel": None}, {"cancel": True}, 0.0)[-1] == ft.Exit("cancelled")


def test_requestor_io_error_keeps_the_partial_for_a_resume():
    with small_chunks():
        net = Net(bytes(500))
        net.rside.fail_io = {"WriteChunk"}
        net.run()
    assert net.exits["req"] == "WriteChunk failed"
    assert "part" in net.rside.store and json.loads(net.rside.store["state"])["verified"] == 0


# ---- a lying requestor, seen by the provider ------------------------------------------------------------
def offered(data: bytes) -> tuple[Provider, ProviderSide, list]:
    p = Provider("f.bin", REQ_WORKER, PROV_PARENT, 0.0, extended=True)
    side = ProviderSide(data)
    out: list = []

    def run(actions):
        while actions:
            follow = None
            for a in actions:
                if isinstance(a, (ft.Send, ft.Log, ft.Exit)):
                    out.append(a)
                elif not isinstance(a, ft.ArmTimer):
                    follow = side.perform(p, a)
            actions = follow
    run(p.start())
    return p, side, out, run


@pytest.mark.parametrize("offset", [-1, 201, "5", True])
def test_provider_refuses_a_bad_resume_offset(offset):
    with small_chunks():
        p, side, out, run = offered(bytes(200))
        run(p.response("size", {"ft": 1, "offset": offset}, 0.0))
    assert out[-4] == ft.Send(REQ_WORKER, {"Size": 0}, {"ft": 1, "error": "bad resume offset", "keep": False})
    assert out[-2].target == PROV_PARENT and out[-2].metadata["serving"] is False
    assert out[-1] == ft.Exit(f"peer asked for a bad resume offset {offset!r}")


def test_provider_one_chunk_file_refuses_a_resume_and_ends_on_the_size_answer():
    p, side, out, run = offered(b"hello")
    assert p.pipelined and p.state == ft.Provider.OFFERED
    run(p.response("size", {"ft": 1, "offset": 3}, 0.0))
    assert out[-1] == ft.Exit("peer asked to resume a one-chunk file at 3")
    p, side, out, run = offered(b"hello")
    run(p.response("size", {"ft": 1, "offset": 0}, 0.0))
    assert out[-1] == ft.Exit() and p.state == ft.Provider.DONE
    p, side, out, run = offered(b"hello")
    run(p.request_failed("size", "timeout", 0.0))  # a plain requestor: it already has the chunk
    assert out[-1] == ft.Exit() and len([a for a in out if isinstance(a, ft.Send) and a.target == REQ_WORKER]) == 2


def test_provider_detects_a_file_changed_while_being_sent():
    with small_chunks():
        p, side, out, run = offered(bytes(1000))
        run(p.response("size", {"ft": 1, "offset": 0}, 0.0))
        side.stamp = 2  # the file changed under us
        while p.state not in (ft.Provider.DONE, ft.Provider.FAILED):
            run(p.response("chunk", {"ft": 1}, 0.0))
    assert out[-1] == ft.Exit("file changed while being sent")
    assert out[-4].metadata == {"ft": 1, "error": "f.bin changed on bob.os during the transfer; nothing was saved",
                                "keep": False}


def test_provider_short_read_and_unreadable_file():
    with small_chunks():
        p, side, out, run = offered(bytes(200))
        side.short_read = True
        run(p.response("size", {"ft": 1, "offset": 0}, 0.0))
    assert out[-1] == ft.Exit("file changed while being sent")
    p, side, out, run = offered(b"abc")
    assert p.state == ft.Provider.OFFERED
    p = Provider("f.bin", REQ_WORKER, PROV_PARENT, 0.0, extended=True)
    p.start()
    actions = p.io_failed("gone", 0.0)
    assert actions[0].metadata == {"ft": 1, "error": "cannot read f.bin", "keep": False}
    p = Provider("f.bin", REQ_WORKER, PROV_PARENT, 0.0, extended=True)
    p.state = ft.Provider.CHECKING
    assert p.io_failed("gone", 0.0)[0].metadata == {
        "ft": 1, "error": "f.bin changed on bob.os during the transfer (it is gone or unreadable); nothing was saved",
        "keep": False}


def test_provider_answers_keepalives_and_stops_on_the_requestors_error():
    p, side, out, run = offered(bytes(100))
    assert p.request(REQ_WORKER, {"Progress": {"name": "f.bin", "progress": 5}}, {"ft": 1}, 0.0) == \
        [ft.Reply("Progress")]
    assert "only keepalives" in p.request(STRANGER, {"Progress": {}}, {}, 0.0)[0].text
    assert p.request(REQ_WORKER, {"Progress": {}}, {"ft": 1, "error": "no space"}, 0.0)[-1] == \
        ft.Exit("the requestor stopped: no space")


# ---- the provider's queue ---------------------------------------------------------------------------
def test_queued_requestor_waits_asks_its_place_and_completes_when_its_turn_comes():
    data = bytes(range(256)) * 2
    with small_chunks():
        net = Net(data)
        net.queued_at = 3
        net.run()
        r = net.req
        assert r.state == ft.Requestor.QUEUED and "req" not in net.exits
        assert net.progress[-1]["queued"] == 3 and net.progress[-1]["peer"] == "bob.os"  # the parent shows it
        # past the handshake timeout, still queued: it asks its place instead of giving up
        t = ft_common.HANDSHAKE_TIMEOUT - 1
        actions = r.tick(t)
        net.act("req", actions, None)
        assert [m.meta for m in net.queue_asks] == [{"ft": 1, "queue": True}] and r.state == ft.Requestor.QUEUED
        assert net.queue_asks[0].context == "queue" and net.queue_asks[0].target == PEER_MAIN
        net.act("req", r.tick(t + 1), None)
        assert len(net.queue_asks) == 1  # one ask at a time
        net.deliver(Msg(PEER_MAIN, REQ_WORKER, False, "Progress", {"ft": 1, "queued": 1}, context="queue"), t + 2)
        assert net.progress[-1]["queued"] == 1  # moved up: the parent hears of it
        net.act("req", r.tick(t + ft_common.HANDSHAKE_TIMEOUT), None)  # within 10 s of the last word
        assert r.state == ft.Requestor.QUEUED and len(net.queue_asks) == 2
        net.deliver(Msg(PEER_MAIN, REQ_WORKER, False, "Progress", {"ft": 1, "queued": 0}, context="queue"), t + 20)
        # "your turn" again does not move the deadline: a worker that never comes fails the wait
        net.deliver(Msg(PEER_MAIN, REQ_WORKER, False, "Progress", {"ft": 1, "queued": 0}, context="queue"), t + 29)
        assert r.handshake_from == t + 20 and r.tick(t + 29)[-1] == ft.ArmTimer(ft_common.TICK)
        r.queue_ask_out = False
        # its turn: the provider's worker starts and the transfer runs as any other
        net.start_provider("f.bin")
        while net.queue:
            net.deliver(net.queue.pop(0))
    assert net.exits == {"req": None, "prov": None} and net.rside.store == {"file": data}
    assert net.progress[-1]["done"] is True
    assert net.serving[-1] == {"ft": 1, "serving": False, "peer": "alice.os"}  # the slot is given back


def test_queued_requestor_gives_up_when_the_provider_goes_silent_or_offline():
    r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    r.start()
    assert r.response("download", {"Download": {"Ok": None}}, 1.0, {"ft": 1, "queued": 2})[0].metadata["queued"] == 2
    assert r.state == ft.Requestor.QUEUED
    assert r.tick(1.0 + ft_common.HANDSHAKE_TIMEOUT)[-1] == ft.ArmTimer(ft_common.TICK)  # just within
    actions = r.tick(1.5 + ft_common.HANDSHAKE_TIMEOUT)
    assert actions[-1] == ft.Exit("bob.os stopped answering while we waited in its queue")
    # it leaves the queue, so the place goes to the next in line
    leave = [a for a in actions if isinstance(a, ft.Send) and a.target == PEER_MAIN]
    assert leave[0].metadata == {"ft": 1, "queue": True, "error": "bob.os stopped answering while we waited in its queue"}
    r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    r.response("download", {"Download": {"Ok": None}}, 1.0, {"ft": 1, "queued": 1})
    assert r.request_failed("queue", "timeout", 2.0) == [] and r.state == ft.Requestor.QUEUED
    assert r.request_failed("queue", "offline", 2.0)[-1] == ft.Exit("bob.os went offline while we waited in its queue")
    # its turn came, but no Size follows: the usual handshake failure, counted from "your turn"
    r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    r.response("download", {"Download": {"Ok": None}}, 1.0, {"ft": 1, "queued": 1})
    assert r.queue_answer({"ft": 1, "queued": 0}, 30.0) == []
    assert r.tick(30.0 + ft_common.HANDSHAKE_TIMEOUT)[-1] == ft.ArmTimer(ft_common.TICK)
    assert r.tick(31.0 + ft_common.HANDSHAKE_TIMEOUT)[-1] == ft.Exit(
        f"bob.os did not start sending within {ft_common.HANDSHAKE_TIMEOUT} s")


def test_a_long_wait_at_one_place_is_reported_on_every_tick():
    """The parent forgets a download it has not heard of for STALL_TIMEOUT: a requestor waiting at
    the same place for twice that still reports on every tick, and a move is reported too."""
    r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    r.start()
    first = r.response("download", {"Download": {"Ok": None}}, 1.0, {"ft": 1, "queued": 2})
    heard = [1.0] if first[0].target == REQ_PARENT else []
    now = 1.0
    while now < 1.0 + 2 * ft_common.STALL_TIMEOUT:
        now += ft_common.TICK
        actions = r.tick(now)
        assert actions[-1] == ft.ArmTimer(ft_common.TICK) and r.state == ft.Requestor.QUEUED
        assert any(isinstance(a, ft.Send) and a.target == PEER_MAIN and a.context == "queue" for a in actions)
        heard += [now for a in actions if isinstance(a, ft.Send) and a.target == REQ_PARENT and a.metadata.get("queued") == 2]
        assert r.queue_answer({"ft": 1, "queued": 2}, now + 0.1) == []  # the same place: no report of its own
        assert now - heard[-1] < ft_common.STALL_TIMEOUT, (now, heard)
    assert heard == [1.0] + [1.0 + ft_common.TICK * i for i in range(1, len(heard))]  # every tick
    moved = r.queue_answer({"ft": 1, "queued": 1}, now + 1)  # the control: a move is reported at once
    assert [a.metadata["queued"] for a in moved if isinstance(a, ft.Send) and a.target == REQ_PARENT] == [1]


def test_queue_answers_that_are_not_a_place_change_nothing():
    r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    r.response("download", {"Download": {"Ok": None}}, 0.0, {"ft": 1, "queued": 4})
    for bad in (None, -1, True, "2", 2.5):
        assert r.queue_answer({"queued": bad}, 5.0) == [] and r.queue_place == 4
    assert r.tick(0.0 + ft_common.HANDSHAKE_TIMEOUT + 1)[-1].error.endswith("waited in its queue")  # no word came
    # a portable requestor never queues (it has no way to ask), nor does a bad place
    for extended, place in ((False, 1), (True, 0), (True, True), (True, "1")):
        r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=extended)
        assert r.response("download", {"Download": {"Ok": None}}, 0.0, {"ft": 1, "queued": place}) == []
        assert r.state == ft.Requestor.REQUESTING


def test_a_queued_requestor_fails_with_the_providers_reason_when_its_worker_cannot_start():
    r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    r.response("download", {"Download": {"Ok": None}}, 0.0, {"ft": 1, "queued": 1})
    assert r.queue_answer({"ft": 1, "queued": 1}, 1.0) == [] and r.state == ft.Requestor.QUEUED  # the control
    actions = r.queue_answer({"ft": 1, "queued": None, "error": "bob.os could not start sending f: no-file-at-path"}, 2.0)
    assert actions[-1] == ft.Exit("bob.os could not start sending f: no-file-at-path")
    assert [a.metadata["error"] for a in actions if isinstance(a, ft.Send) and a.target == REQ_PARENT] == \
        ["bob.os could not start sending f: no-file-at-path"]


def test_cancel_while_queued_leaves_the_queue():
    r = Requestor("f", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    r.response("download", {"Download": {"Ok": None}}, 0.0, {"ft": 1, "queued": 1})
    actions = r.request(REQ_PARENT, {"Progress": {"name": "f", "progress": 0}}, {"ft": 1, "cancel": True}, True, None, 1.0)
    assert actions[0] == ft.Send(PEER_MAIN, {"Progress": {"name": "f", "progress": 0}},
                                 {"ft": 1, "queue": True, "error": "cancelled"})
    assert actions[-1] == ft.Exit("cancelled")


def test_provider_tells_its_parent_it_still_serves_on_every_tick():
    p = Provider("f", REQ_WORKER, PROV_PARENT, 0.0, extended=True)
    p.start()
    p.opened(100, 1, 0.0)
    report, timer = p.tick(5.0)
    assert report.target == PROV_PARENT and report.metadata == {"ft": 1, "serving": True, "peer": "alice.os"}
    assert report.timeout is None and timer == ft.ArmTimer(ft_common.TICK)  # no answer wanted


# ---- every state ------------------------------------------------------------------------------------
def test_every_declared_state_is_reached():
    """Run the scenarios above that reach each state, then compare with the declared states."""
    test_any_file_arrives_whole_and_verified()
    test_window_keeps_a_full_window_in_flight_and_chains_hashes()
    test_resume_continues_from_the_saved_offset(3)
    test_missing_file_is_refused_and_nothing_is_kept()
    test_provider_pushes_seed_sized_chunks_to_a_plain_requestor()
    test_liar_wrong_hash_fails_and_tells_the_provider()
    test_provider_detects_a_file_changed_while_being_sent()
    test_portable_machines_take_the_plain_path_through_their_states()
    test_queued_requestor_waits_asks_its_place_and_completes_when_its_turn_comes()
    assert VISITED["Requestor"] == ft.Requestor.STATES
    assert VISITED["Provider"] == ft.Provider.STATES


# ---- a folder's provider holds a serving slot as a file's does ------------------------------------
def test_folder_provider_reports_its_serving_slot_while_sending_and_gives_it_back():
    import ft_folder

    def walk_and_offer(p):
        p.start()
        p.walked({"dirs": ["d"], "files": [["d/a.txt", 3, 1], ["b.txt", 2, 1]]}, 0.0)
        return p.response("size", {"resume": [0, 0]}, 0.1)

    p = ft_folder.FolderProvider("docs", REQ_WORKER, PROV_PARENT, 0.0)
    read = walk_and_offer(p)
    assert [type(a).__name__ for a in read] == ["ReadBatch"]
    tick = p.tick(1.0)  # while sending: "still serving" to the parent, as Provider.tick says
    assert tick[0].target == PROV_PARENT and tick[0].metadata == {"ft": 1, "serving": True, "peer": "alice.os"}
    sent = p.batch_read(read[0].items, ["h1", "h2"], 1.1)
    assert sent[0].target == REQ_WORKER  # the batch goes to the requestor
    done = p.response("chunk", {}, 1.2)
    assert p.state == p.DONE and done[-1] == ft.Exit()
    assert done[-2].target == PROV_PARENT and done[-2].metadata == {"ft": 1, "serving": False, "peer": "alice.os"}
    # a failure gives the slot back too
    p = ft_folder.FolderProvider("docs", REQ_WORKER, PROV_PARENT, 0.0)
    walk_and_offer(p)
    failed = p.request(PROV_PARENT, {"Cancel": None}, {"cancel": True}, 2.0)
    assert failed[-1] == ft.Exit("cancelled")
    assert failed[-2].target == PROV_PARENT and failed[-2].metadata["serving"] is False


# ---- the node's budget for bytes in flight (ft_common.NODE_BUDGET) -----------------------------------
def test_window_shares_the_node_budget():
    chunk = ft_common.EXT_CHUNK_SIZE
    assert ft_common.window_for(1) == ft_common.WINDOW  # a lone transfer keeps its full window (its speed)
    for n in (2, 4, 8, 16, 50):
        w = ft_common.window_for(n)
        assert w >= 1 and (w == 1 or n * w * chunk <= ft_common.NODE_BUDGET), (n, w)
    assert ft_common.window_in({"window": 3}) == 3
    assert [ft_common.window_in({"window": v}) for v in (0, -1, True, "2", None)] == [None] * 5


def test_provider_keeps_the_smaller_of_its_parents_and_its_requestors_window_in_flight():
    def in_flight(out) -> int:
        return sum(1 for a in out if isinstance(a, ft.Send) and "Chunk" in a.body)
    with small_chunks(window=8):  # windows up to 8 here, whatever the real WINDOW
        p, side, out, run = offered(bytes(64 * 20))
        p.window = 2  # (the worker starts a provider at START_WINDOW)
        run(p.response("size", {"ft": 1, "offset": 0}, 0.0))
        assert in_flight(out) == 2
        run(p.request(PROV_PARENT, {"Progress": {"name": "f.bin", "progress": 0}}, {"ft": 1, "window": 6}, 0.0))
        assert in_flight(out) == 6  # the parent's share grew: the window fills at once
        run(p.response("chunk", {"ft": 1, "ack": 0, "window": 3}, 0.0))  # the requestor's node is busier
        assert in_flight(out) == 6  # one acked, none sent: 5 in flight, over the requestor's 3
        for _ in range(3):
            run(p.response("chunk", {"ft": 1, "ack": 0, "window": 3}, 0.0))
        assert in_flight(out) == 7 and p.in_flight == 3
    # a window from anyone but the parent is not taken
    p2, _, out2, run2 = offered(bytes(64 * 20))
    run2(p2.request(STRANGER, {"Progress": {"name": "f.bin", "progress": 0}}, {"ft": 1, "window": 1}, 0.0))
    assert p2.window == ft_common.WINDOW


def test_requestor_passes_its_parents_window_on_in_its_acks():
    r = Requestor("f.bin", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    r.start()
    assert r.request(REQ_PARENT, {"Progress": {"name": "f.bin", "progress": 0}}, {"ft": 1, "window": 2}, False,
                     None, 0.0) == []
    assert r.window == 2 and r._window_meta() == {"window": 2}


def test_large_chunks_only_for_a_big_file_while_both_nodes_give_it_a_whole_share(monkeypatch):
    """ft_common.BIG_CHUNK_SIZE: a lone transfer's chunks; a busy node on either side keeps small ones,
    and the bytes in flight stay within the smaller share whatever the chunks' size."""
    def sent(out) -> list:
        return [a.body["Chunk"]["length"] for a in out if isinstance(a, ft.Send) and "Chunk" in a.body]
    with small_chunks(window=8):  # small chunks of 64 bytes, windows in units of them
        monkeypatch.setattr(ft, "BIG_CHUNK_SIZE", 128)
        monkeypatch.setattr(ft, "BIG_MIN", 1024)
        p, side, out, run = offered(bytes(range(256)) * 12)
        p.window = 8  # a whole share here ...
        run(p.response("size", {"ft": 1, "offset": 0, "window": 8, "chunk": 128}, 0.0))  # ... and there
        assert sent(out) == [128] * 4  # 8 x 64 bytes in flight, in large chunks
        run(p.response("chunk", {"ft": 1, "ack": 0, "window": 4}, 0.0))  # the requestor's node got busier
        assert sent(out) == [128] * 4  # 3 x 128 in flight, over its 4 x 64: nothing more yet
        for _ in range(2):
            run(p.response("chunk", {"ft": 1, "ack": 0, "window": 4}, 0.0))
        assert sent(out) == [128] * 4 + [64] * 2  # small chunks, up to 4 x 64 in flight
        run(p.request(PROV_PARENT, {"Progress": {"name": "f.bin", "progress": 0}}, {"ft": 1, "window": 4}, 0.0))
        run(p.response("chunk", {"ft": 1, "ack": 0, "window": 8, "chunk": 128}, 0.0))  # ours is busy now
        assert sent(out)[6:] == [64, 64]  # one of 128 acked: 2 x 64 more fit in 4 x 64
        # a file up to BIG_MIN keeps small chunks, a whole share on both sides or not; so does a
        # requestor that asks nothing (an older one) or asks another size
        for data, ask in ((bytes(1024), {"chunk": 128}), (bytes(2048), {}), (bytes(2048), {"chunk": 256})):
            p2, _, out2, run2 = offered(data)
            p2.window = 8
            run2(p2.response("size", {"ft": 1, "offset": 0, "window": 8, **ask}, 0.0))
            assert sent(out2) == [64] * 8, ask
    # the requestor asks for large chunks only with a whole share
    r = Requestor("f.bin", PEER_MAIN, REQ_PARENT, 0.0, extended=True)
    r.start()
    r.request(REQ_PARENT, {"Progress": {"name": "f.bin", "progress": 0}}, {"ft": 1, "window": ft_common.WINDOW},
              False, None, 0.0)
    assert r._window_meta() == {"window": ft_common.WINDOW, "chunk": ft.BIG_CHUNK_SIZE}
    r.request(REQ_PARENT, {"Progress": {"name": "f.bin", "progress": 0}}, {"ft": 1, "window": ft_common.WINDOW // 2},
              False, None, 0.0)
    assert r._window_meta() == {"window": ft_common.WINDOW // 2}
    # (a whole share is a lone transfer's; a chunk message stays under the network's largest)
    assert ft_common.window_for(1) == ft_common.WINDOW > ft_common.window_for(2)
    assert ft_common.BIG_CHUNK_SIZE + (64 << 10) < MAX_MESSAGE


# ---- FolderRequestor on its own --------------------------------------------------------------------
def _folder_requestor():
    import ft_folder
    r = ft_folder.FolderRequestor("docs", PEER_MAIN, REQ_PARENT, 0.0)
    listing = json.dumps({"dirs": ["d"], "files": [["d/a.txt", 3, "s1"], ["b.txt", 2, "s2"]]})
    return ft_folder, r, r.size_announced(PROV_WORKER, 5, {"ft": 1, "folder": {}}, listing, "ab" * 32, True, 0.0)


def test_folder_requestor_receives_batches_in_order_acks_them_with_its_window_and_finishes():
    ft_folder, r, first = _folder_requestor()
    assert [type(a).__name__ for a in first] == ["LoadFolderState"]
    prepare = r.state_loaded(None, 0.0)
    assert isinstance(prepare[0], ft_folder.PrepareTree) and prepare[0].fresh and prepare[0].dirs == ["d"]
    opened = r.tree_prepared(0.0)
    assert opened[0] == ft.Reply("Progress", {"ft": 1, "resume": [0, 0]})  # no window told yet: none passed on
    assert r.request(REQ_PARENT, {"Progress": {"name": "docs", "progress": 0}}, {"ft": 1, "window": 3}, False, None,
                     0.0) == []
    h = "cd" * 32
    write = r.request(PROV_WORKER, {"Chunk": {"name": "docs", "offset": 0, "length": 5}},
                      {"ft": 1, "batch": [[0, 0, 3, h], [1, 0, 2, h]]}, True, 5, 0.1)
    assert write == [ft_folder.WriteBatch([["d/a.txt", 0, 3, h], ["b.txt", 0, 2, h]],
                                          {"digest": "ab" * 32, "index": 2, "offset": 0})]
    done = r.batch_written(0.2)
    assert done[0] == ft.Reply("Progress", {"ft": 1, "ack": 0, "window": 3})
    assert isinstance(done[-1], ft_folder.FinishTree)
    end = r.tree_finished(0.3, replaced=True)
    assert end[-1] == ft.Exit() and end[0].metadata["done"] and end[0].metadata["replaced"]


def test_folder_requestor_refuses_pieces_out_of_order_a_short_blob_and_a_resume_point_the_disk_does_not_bear():
    ft_folder, r, _ = _folder_requestor()
    r.state_loaded(None, 0.0)
    r.tree_prepared(0.0)
    h = "cd" * 32
    out = r.request(PROV_WORKER, {"Chunk": {"name": "docs", "offset": 1, "length": 2}},
                    {"ft": 1, "batch": [[1, 0, 2, h]]}, True, 2, 0.1)
    assert r.state == r.FAILED and any("out of order" in str(getattr(a, "metadata", "")) for a in out), out
    ft_folder, r, _ = _folder_requestor()
    r.state_loaded(None, 0.0)
    r.tree_prepared(0.0)
    r.request(PROV_WORKER, {"Chunk": {"name": "docs", "offset": 0, "length": 3}}, {"ft": 1, "batch": [[0, 0, 3, h]]},
              True, 2, 0.1)
    assert r.state == r.FAILED  # 2 bytes of data for a 3-byte piece
    # a saved point past a file the partial tree does not hold whole starts afresh
    ft_folder, r, _ = _folder_requestor()
    fresh = r.state_loaded({"digest": "ab" * 32, "index": 1, "offset": 1}, 0.0, {"d/a.txt": 2, "b.txt": 1})
    assert fresh[0].fresh and (r.index, r.offset) == (0, 0)
    ft_folder, r, _ = _folder_requestor()
    kept = r.state_loaded({"digest": "ab" * 32, "index": 1, "offset": 1}, 0.0, {"d/a.txt": 3, "b.txt": 1})
    assert not kept[0].fresh and (r.index, r.offset) == (1, 1)  # the control: borne out, resumed
