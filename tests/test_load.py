"""Many downloads at once with bounded memory: a provider sends at most MAX_SERVING files at once and
queues the other requestors, which are told they wait and then complete. Real nodes, bytes compared."""
from __future__ import annotations

import json
import re
import sys
import threading
import time

from conftest import REPO, TEST_PACKAGES, frozen, no_workers, paused, peak_rss_bytes, release, wait_for
from test_transfers import download, put, sha

sys.path.insert(0, str(REPO / "components" / "file_transfer" / "common"))
from ft_common import EXT_CHUNK_SIZE, MAX_DOWNLOADS, MAX_SERVING, STALL_TIMEOUT, WINDOW  # noqa: E402

PEAK_LIMIT = 300 * 10**6  # bytes, each node
# a file that cannot be sent whole while its requestor is frozen: more than the chunk read before the
# provider's pause plus its window
HELD_SIZE = (WINDOW + 2) * EXT_CHUNK_SIZE


def hold_every_slot(provider, busy, big: dict) -> frozen:
    """busy downloads `big` (MAX_SERVING files) from provider, started with pause_after=1; once every
    serving worker holds, busy is frozen (the caller's `with`) and provider released: its workers send
    their window, then wait for acks and keep their slots (they report to their parent meanwhile)."""
    busy.type(f"download:file_transfer:template.os {' '.join(big)} {provider.name}")
    for _ in big:
        paused(provider)
    return frozen(busy)


def test_fifty_downloads_at_once_from_three_requestors_stay_under_300_mb(node_factory):
    provider = node_factory("prov.dev")
    requestors = [node_factory(f"req{i}.dev") for i in range(1, 4)]
    # 400 MiB in all: a node that held the files whole (or a window each for all 50) would break the bound
    sizes = [(8 << 20) + 4096 * i if i % 2 else (8 << 20) - 4096 * i for i in range(50)]
    assert sum(sizes) > PEAK_LIMIT
    want = {f"load{i}.bin": put(provider, f"load{i}.bin", size) for i, size in enumerate(sizes)}
    outcomes: dict[str, tuple[int, list[str]]] = {}
    serving_seen: list[int] = []
    done = threading.Event()

    def fetch(node, name: str) -> None:  # one `download` command each, as a shell loop would
        outcomes[name] = node.run(f"download:file_transfer:template.os {name} prov.dev",
                                  until=rf"{re.escape(name)} downloaded|error:", timeout=180)

    def count_serving() -> None:  # the provider's workers, sampled through the burst
        while not done.is_set():
            serving_seen.append(len(provider.workers()))
            time.sleep(0.05)

    sampler = threading.Thread(target=count_serving)
    sampler.start()
    threads = [threading.Thread(target=fetch, args=(requestors[i % 3], name)) for i, name in enumerate(want)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    failed = {n: lines[-3:] for n, (code, lines) in outcomes.items() if code != 0}
    assert len(outcomes) == 50 and not failed, failed
    for i, (name, digest) in enumerate(want.items()):
        assert sha(requestors[i % 3].files / name) == digest, name
    no_workers(provider, *requestors, within=30)
    # the provider ran no more serving workers than its slots (and did serve: the control); one that
    # has just given its slot back may still be unwinding. Unbounded, the three requestors' own
    # limits would let 3 x MAX_DOWNLOADS run.
    assert 1 <= max(serving_seen) <= MAX_SERVING + 2 < 3 * MAX_DOWNLOADS, serving_seen
    for node in (provider, *requestors):
        assert peak_rss_bytes(node) < PEAK_LIMIT, (node.name, peak_rss_bytes(node) / 2**20)


def test_a_queued_requestor_is_told_it_waits_then_completes(node_factory):
    """...and its downloads waiting at a busy provider do not hold its own download slots: one from
    an idle node completes meanwhile."""
    provider, busy, late = node_factory("prov.dev", pause_after=1), node_factory("busy.dev"), node_factory("late.dev")
    idle = node_factory("idle.dev")
    first, small = put(provider, "first.bin", 2 << 20), put(provider, "small.bin", 2 << 20)
    put(provider, "gone.bin", 2 << 20)
    more = {f"more{i}.bin": put(provider, f"more{i}.bin", 1 << 20) for i in range(MAX_DOWNLOADS - 2)}
    elsewhere = put(idle, "elsewhere.bin", 1 << 20)
    big = {f"big{i}.bin": put(provider, f"big{i}.bin", HELD_SIZE) for i in range(MAX_SERVING)}
    assert MAX_SERVING <= MAX_DOWNLOADS  # one requestor can hold every slot
    # the control: with the provider idle, a download is served at once, never queued
    download(late, "first.bin", "prov.dev")
    assert sha(late.files / "first.bin") == first
    assert not any("queued at" in ln for ln in late.lines)
    # busy takes every serving slot, then is frozen mid-transfer: the slots stay taken
    with hold_every_slot(provider, busy, big):
        release(provider)
        assert not any("downloaded" in ln for ln in busy.lines)
        late.type("download:file_transfer:template.os gone.bin prov.dev")
        line = late.expect(r"gone\.bin: queued at", 30)
        assert line == "file_transfer:template.os: gone.bin: queued at prov.dev, position 1", line
        late.type("download:file_transfer:template.os small.bin prov.dev")
        line = late.expect(r"small\.bin: queued at", 30)
        assert line == "file_transfer:template.os: small.bin: queued at prov.dev, position 2", line
        for i, name in enumerate(more, 3):  # MAX_DOWNLOADS of late's downloads wait at prov.dev
            late.type(f"download:file_transfer:template.os {name} prov.dev")
            line = late.expect(rf"{re.escape(name)}: queued at", 30)
            assert line.endswith(f"queued at prov.dev, position {i}"), line
        code, lines = late.run("transfers:file_transfer:template.os")
        assert code == 0 and any(ln.endswith(" small.bin from prov.dev: queued at prov.dev, position 2")
                                 for ln in lines), lines
        assert sum("queued at prov.dev" in ln for ln in lines) == MAX_DOWNLOADS, lines
        # they hold none of late's MAX_DOWNLOADS: a download from an idle node runs and completes
        # (well within STALL_TIMEOUT: unreported, the queued ones would drop off the books then)
        download(late, "elsewhere.bin", "idle.dev", timeout=STALL_TIMEOUT - 15)
        assert sha(late.files / "elsewhere.bin") == elsewhere
        # the first in line is cancelled: it leaves the provider's queue, and at its next ask (a
        # tick) the second hears it moved up; meanwhile nothing fails
        code, lines = late.run("cancel:file_transfer:template.os gone.bin prov.dev")
        assert code == 0, lines
        late.expect(r"download of gone\.bin from prov\.dev cancelled", 30)
        line = late.expect(r"small\.bin: queued at", 30)
        assert line == "file_transfer:template.os: small.bin: queued at prov.dev, position 1", line
        assert not any("error" in ln or "small.bin downloaded" in ln for ln in late.lines), late.lines[-5:]
    late.expect(r"small\.bin downloaded", 120)
    assert sha(late.files / "small.bin") == small
    wait_for(lambda: all(any(f"{n} downloaded" in ln for ln in late.lines) for n in more), 120, "the others")
    for name, digest in more.items():
        assert sha(late.files / name) == digest, name
    assert not (late.files / "gone.bin").exists()
    wait_for(lambda: sum("downloaded" in ln for ln in busy.lines) == len(big), 120, "the big files")
    for name, digest in big.items():
        assert sha(busy.files / name) == digest, name
    no_workers(provider, busy, late, idle, within=30)


def test_a_burst_of_first_starts_reads_a_wasm_file_once(tmp_path):
    """Twenty starts of one script at once: the kernel reads and loads its wasm once, the others
    wait for that; another file is read on its own (the control)."""
    from host.kernel.kernel import Kernel
    from host.messages import PackageId
    from host.runtime.wasm import Runtime
    from host.settings import RuntimeSettings
    from host.vfs.store import Vfs

    class Output:
        def __getattr__(self, name):
            return lambda *a, **k: None

    vfs = Vfs.in_home(tmp_path)
    kernel = Kernel("a.dev", tmp_path, Runtime(RuntimeSettings(cache_dir=tmp_path / "cache")), Output(),
                    vfs_file=vfs.file_path)
    pkg = vfs.drive_path(PackageId("p", "pub"), "pkg")
    pkg.mkdir(parents=True)
    (pkg / "s.wasm").write_bytes(b"one")
    (pkg / "t.wasm").write_bytes(b"two")
    loads: list[bytes] = []

    def slow_load(wasm: bytes):
        loads.append(wasm)
        time.sleep(0.2)  # as a real read, hash and deserialize take a while
        return object()

    kernel.runtime.load = slow_load  # type: ignore[method-assign]
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(kernel.load_vfs_wasm("p:pub/pkg/s.wasm"))) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [b"one"] and len(got) == 20 and all(c is got[0] for c in got)
    assert kernel.load_vfs_wasm("p:pub/pkg/t.wasm") is not got[0] and loads == [b"one", b"two"]
    kernel.shutdown()


def test_a_peer_cannot_queue_without_bound_nor_pass_the_serving_limit(node_factory):
    """With every serving slot taken, a peer's Downloads queue up to MAX_QUEUED_PER_NODE; the next
    one is refused with a clear error, and a plain Download (no `ft` metadata: it cannot be told to
    wait) is refused too, where an idle provider serves it; the provider keeps serving."""
    serving = (REPO / "components/file_transfer/file_transfer/serving.py").read_text()
    MAX_QUEUED_PER_NODE = int(re.search(r"^MAX_QUEUED_PER_NODE = (\d+)", serving, re.M).group(1))
    args = ["--packages", str(REPO / "components"), "--packages", str(TEST_PACKAGES)]
    provider, busy = node_factory("prov.dev", pause_after=1), node_factory("busy.dev")
    evil = node_factory("evil.dev", extra_args=args)
    big = {f"big{i}.bin": put(provider, f"big{i}.bin", HELD_SIZE) for i in range(MAX_SERVING)}
    for i in range(MAX_QUEUED_PER_NODE + 1):
        (provider.files / f"tiny{i}.txt").write_text(f"tiny {i}\n")
    main = "prov.dev@file_transfer:file_transfer:template.os"
    target = {"node": "evil.dev", "process": {"process_name": "quiet", "package_name": "misbehave",
                                              "publisher_node": "test.os"}}
    answer = re.compile(rf"quiet got a message from {re.escape(main)}: b'(.*)'$")

    def plain_download(name: str) -> dict:
        before = sum(bool(answer.search(ln)) for ln in evil.lines)
        body = json.dumps({"Download": {"name": name, "target": target, "is_requestor": False}})
        evil.type(f"m evil.dev@quiet:misbehave:test.os ask {main} {body}")
        wait_for(lambda: sum(bool(answer.search(ln)) for ln in evil.lines) > before, 30, "the answer")
        return [json.loads(m.group(1)) for ln in evil.lines if (m := answer.search(ln))][-1]

    # the control: an idle provider serves a plain Download at once (its worker sends the file)
    assert plain_download("tiny0.txt") == {"Download": {"Ok": None}}
    wait_for(lambda: any("quiet got a message from prov.dev@" in ln and "Size" in ln for ln in evil.lines), 30,
             "the Size")
    no_workers(provider, within=30)  # it ends when its Size goes unanswered
    with hold_every_slot(provider, busy, big):  # its transfers hold every slot
        release(provider)
        for i in range(MAX_QUEUED_PER_NODE + 1):
            body = json.dumps({"Download": {"name": f"tiny{i}.txt", "target": target, "is_requestor": False}})
            evil.type(f"m evil.dev@quiet:misbehave:test.os askft {main} {body}")
        wait_for(lambda: sum(bool(answer.search(ln)) for ln in evil.lines) == MAX_QUEUED_PER_NODE + 2, 60,
                 "every answer")
        answers = [json.loads(m.group(1)) for ln in evil.lines if (m := answer.search(ln))][1:]
        workers = len(provider.workers())
        for i in range(3):  # plain Downloads: no worker each, a clear error
            assert plain_download(f"tiny{i}.txt") == {"Download": {"Err": f"prov.dev is busy: {MAX_SERVING} downloads "
                                                                          f"being served, {MAX_QUEUED_PER_NODE} "
                                                                          f"waiting; try again later"}}
        assert len(provider.workers()) <= workers
    assert answers.count({"Download": {"Ok": None}}) == MAX_QUEUED_PER_NODE  # queued (the control)
    assert answers[-1] == {"Download": {"Err": f"prov.dev is busy: {MAX_QUEUED_PER_NODE} downloads from "
                                               f"evil.dev wait already; try again later"}}, answers[-1]
    wait_for(lambda: sum("downloaded" in ln for ln in busy.lines) == len(big), 120, "the big files")
    assert provider.alive() and "file_transfer:file_transfer:template.os" in provider.processes()


def test_scripts_take_turns_to_be_instantiated(tmp_path):
    """Ten scripts started at once: at most SCRIPTS_AT_ONCE are instantiated together, the others
    wait for a turn; processes that are not scripts (the control) all start at once."""
    from host.kernel.kernel import SCRIPTS_AT_ONCE
    from host.kernel.process import WasmProcess
    from host.settings import RuntimeSettings
    from host.messages import ProcessId
    from host.runtime.wasm import LoadedComponent, Runtime

    runtime = Runtime(RuntimeSettings(cache_dir=tmp_path / "cache"))
    inside, most, release = [0], [0], threading.Event()
    lock = threading.Lock()

    def instantiate(store, component):  # stands for a real instance: held until released
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        release.wait(30)
        with lock:
            inside[0] -= 1
        raise RuntimeError("not a real component")

    runtime.instantiate = instantiate  # type: ignore[method-assign]
    ended: list[str] = []

    class Kernel:  # what a process's own lifecycle uses of the kernel
        node, compute_limit, compute_ticks = "a.dev", 30.0, 300

        def __init__(self):
            self.runtime = runtime
            self.script_turns = threading.BoundedSemaphore(SCRIPTS_AT_ONCE)

        def take_instances(self, n):
            return True

        def give_back_instances(self, n):
            pass

        def process_exited(self, proc, reason):
            ended.append(reason)

    for script in (True, False):
        kernel, most[0] = Kernel(), 0
        at_once = SCRIPTS_AT_ONCE if script else 10
        release.clear()
        procs = [WasmProcess(kernel, ProcessId(str(i), "p", "pub"), LoadedComponent(None, "", set()), [], "w",
                             set(), False, None) for i in range(10)]
        for p in procs:
            if script:
                p.turns, p.turn_wait = kernel.script_turns, 30.0
            p.start()
        wait_for(lambda: inside[0] == at_once, 10, "the first instances")  # noqa: B023 (used at once)
        time.sleep(0.3)  # no more come in while those are held
        assert most[0] == at_once
        release.set()
        for p in procs:
            p.thread.join(10)
        assert len(ended) == 10 and inside[0] == 0 and most[0] == at_once
        ended.clear()


# ---- the provider's serving slots and queue (serving.py) on plain CPython -----------------------------
class _Sent(list):
    """What serving.py sent, in order: ("response" | "request", body, metadata)."""


def _serving_module(monkeypatch, failing: set):
    """serving.py imported with stand-ins for the guest's imports: the worker API records each start
    (or raises Err for a name in `failing`, as when the spawn fails) and messages are recorded."""
    import importlib.util
    import types

    from host.kinode_types import Address

    sent, started = _Sent(), []

    class Err(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

    class Builder:
        def __init__(self, kind, target=None):
            self.kind, self.target, self.b, self.m = kind, target, None, None

        @classmethod
        def to(cls, target):
            return cls("request", target)

        def body(self, b):
            self.b = b
            return self

        def metadata(self, m):
            self.m = m
            return self

        def send(self):
            sent.append((self.kind, self.b, self.m))

    def start_download(our, requestor, name, target, is_requestor):
        if name in failing:
            raise Err("no-file-at-path")
        started.append((requestor.node, name))

    lib = types.ModuleType("process_lib")
    lib.Address, lib.Message, lib.Request = Address, object, type("Request", (Builder,), {})  # type: ignore[attr-defined]
    lib.Response = lambda: Builder("response")  # type: ignore[attr-defined]
    lib.print_to_terminal = lambda level, text: None  # type: ignore[attr-defined]
    lib.println = lambda text: None  # type: ignore[attr-defined]
    lib.to_wit_address = lambda a: a  # type: ignore[attr-defined]
    wit = types.ModuleType("wit_world")
    imports = types.ModuleType("wit_world.imports")
    imports.file_transfer_worker = types.SimpleNamespace(start_download=start_download)  # type: ignore[attr-defined]
    for name, module in (("process_lib", lib), ("wit_world", wit), ("wit_world.imports", imports),
                         ("componentize_py_types", types.SimpleNamespace(Err=Err))):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(REPO / "components/file_transfer/common"))
    spec = importlib.util.spec_from_file_location("serving_under_test",
                                                  REPO / "components/file_transfer/file_transfer/serving.py")
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    return serving, Address, sent, started


class _Msg:
    def __init__(self, source, body, meta=None):
        self.source, self.body, self._meta, self.is_request = source, json.dumps(body).encode(), meta or {}, True

    def meta(self):
        return self._meta

    def json(self):
        return json.loads(self.body)


def _requestor(Address, node):
    return Address.parse(f"{node}@w:file_transfer:template.os")


def test_a_freed_slot_goes_to_the_queue_before_a_newcomer(monkeypatch):
    serving, Address, sent, started = _serving_module(monkeypatch, set())
    our = Address.parse("prov.dev@file_transfer:file_transfer:template.os")
    ext = {"ft": 1}
    for i in range(MAX_SERVING):  # every slot taken (the control: served at once, while free)
        serving.serve(our, _Msg(_requestor(Address, "busy.dev"), {}, ext), f"big{i}", our)
    assert started == [("busy.dev", f"big{i}") for i in range(MAX_SERVING)] and not sent
    serving.serve(our, _Msg(_requestor(Address, "early.dev"), {}, ext), "a", our)
    assert sent[-1] == ("response", {"Download": {"Ok": None}}, {"ft": 1, "queued": 1})
    serving.SLOTS.give_back("busy.dev", "big0")  # a slot frees; ServeNext is not yet handled ...
    serving.serve(our, _Msg(_requestor(Address, "late.dev"), {}, ext), "b", our)  # ... when a newcomer asks
    assert sent[-1] == ("response", {"Download": {"Ok": None}}, {"ft": 1, "queued": 2})  # it queues behind
    assert started[-1] == ("busy.dev", f"big{MAX_SERVING - 1}")
    serving.after_message(our)
    assert sent[-1] == ("request", serving.SERVE_NEXT, None)
    assert serving.handles(our, _Msg(our, serving.SERVE_NEXT))
    assert started[-1] == ("early.dev", "a") and list(serving.SLOTS.queue) == [(str(_requestor(Address, "late.dev")), "b")]


def test_a_failed_worker_start_answers_the_download_with_an_error(monkeypatch):
    serving, Address, sent, started = _serving_module(monkeypatch, {"broken"})
    our = Address.parse("prov.dev@file_transfer:file_transfer:template.os")
    serving.serve(our, _Msg(_requestor(Address, "req.dev"), {}, {"ft": 1}), "fine", our)
    assert started == [("req.dev", "fine")] and not sent  # the control: the worker API answers Ok
    serving.serve(our, _Msg(_requestor(Address, "req.dev"), {}, {"ft": 1}), "broken", our)
    assert sent == [("response", {"Download": {"Err": "prov.dev could not start sending broken: no-file-at-path"}},
                     None)]
    assert not serving.SLOTS.serves("req.dev", "broken") and serving.SLOTS.serves("req.dev", "fine")
    # queued, its turn comes and its worker cannot start: its next ask about its place hears why
    for i in range(MAX_SERVING - 1):
        serving.serve(our, _Msg(_requestor(Address, "busy.dev"), {}, {"ft": 1}), f"big{i}", our)
    waiter = _requestor(Address, "wait.dev")
    for name in ("broken", "fine2"):
        serving.serve(our, _Msg(waiter, {}, {"ft": 1}), name, our)
    ask = {"Progress": {"name": "broken", "progress": 0}}
    assert serving.handles(our, _Msg(waiter, ask, {"ft": 1, "queue": True}))
    assert sent[-1] == ("response", "Progress", {"ft": 1, "queued": 1})  # the control: waiting, first
    serving.SLOTS.give_back("busy.dev", "big0")
    serving.SLOTS.give_back("busy.dev", "big1")
    assert serving.handles(our, _Msg(our, serving.SERVE_NEXT))
    assert started[-1] == ("wait.dev", "fine2")  # the next in line still starts
    assert serving.handles(our, _Msg(waiter, ask, {"ft": 1, "queue": True}))
    assert sent[-1] == ("response", "Progress", {"ft": 1, "queued": None,
                                                 "error": "prov.dev could not start sending broken: no-file-at-path"})
