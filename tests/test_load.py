"""Many downloads at once with bounded memory: a provider sends at most MAX_SERVING files at once and
queues the other requestors, which are told they wait and then complete. Real nodes, bytes compared."""
from __future__ import annotations

import json
import re
import sys
import threading
import time

from conftest import REPO, TEST_PACKAGES, evict_compiled, frozen, no_workers, paused, peak_rss_bytes, release, wait_for
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
    evict_compiled()  # the nodes' memory, not how recently their components were compiled
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
    print("peak RSS MiB:", {node.name: round(peak_rss_bytes(node) / 2**20) for node in (provider, *requestors)})
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
    from ft_schedule import MAX_QUEUED_PER_NODE
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
    from host.messages import ProcessId
    from host.runtime.wasm import LoadedComponent, Runtime
    from host.settings import RuntimeSettings

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
    waiting = [0]

    class CountingTurns(threading.BoundedSemaphore):  # counts the scripts waiting for a turn
        def acquire(self, blocking=True, timeout=None):
            if super().acquire(blocking=False):
                return True
            with lock:
                waiting[0] += 1
            return super().acquire(blocking, timeout)

    class Kernel:  # what a process's own lifecycle uses of the kernel
        node, compute_limit, compute_ticks = "a.dev", 30.0, 300

        def __init__(self):
            self.runtime = runtime
            self.script_turns = CountingTurns(SCRIPTS_AT_ONCE)

        def take_instances(self, n):
            return True

        def give_back_instances(self, n):
            pass

        def process_exited(self, proc, reason):
            ended.append(reason)

    for script in (True, False):
        kernel, most[0], waiting[0] = Kernel(), 0, 0
        at_once = SCRIPTS_AT_ONCE if script else 10
        release.clear()
        procs = [WasmProcess(kernel, ProcessId(str(i), "p", "pub"), LoadedComponent(None, "", set()), [], "w",
                             set(), False, None) for i in range(10)]
        for p in procs:
            if script:
                p.turns, p.turn_wait = kernel.script_turns, 30.0
            p.start()
        wait_for(lambda: inside[0] == at_once, 10, "the first instances")  # noqa: B023 (used at once)
        # every other script is seen waiting for a turn while those are held, and none came in
        wait_for(lambda: waiting[0] == 10 - at_once, 10, "the others waiting")  # noqa: B023
        assert most[0] == at_once
        release.set()
        for p in procs:
            p.thread.join(10)
        assert len(ended) == 10 and inside[0] == 0 and most[0] == at_once
        ended.clear()


# ---- the scheduling (ft_schedule: serving slots and queue, downloads) on plain CPython, time passed in ----
def _worker(node: str):
    from host.kinode_types import Address
    return Address.parse(f"{node}@w:file_transfer:template.os")


TARGET = "our worker's target"  # opaque to the scheduler


def test_a_freed_slot_goes_to_the_queue_before_a_newcomer():
    from ft_schedule import Serving
    s = Serving()
    for i in range(MAX_SERVING):  # every slot taken (the control: served at once, while free)
        assert s.admit("prov.dev", _worker("busy.dev"), f"big{i}", TARGET, True, 0.0) == ("start", None)
    assert s.admit("prov.dev", _worker("early.dev"), "a", TARGET, True, 1.0) == ("queued", 1)
    s.give_back("busy.dev", "big0")  # a slot frees; ServeNext is not yet handled ...
    assert s.admit("prov.dev", _worker("late.dev"), "b", TARGET, True, 2.0) == ("queued", 2)  # ... a newcomer queues
    assert s.admit("prov.dev", _worker("plain.dev"), "c", TARGET, False, 2.0) == (  # one that cannot wait
        "refused", f"prov.dev is busy: {MAX_SERVING - 1} downloads being served, 2 waiting; try again later")
    assert s.ask_next(3.0) and not s.ask_next(3.0)  # one ServeNext until it is handled
    assert s.serve_next(3.0) == (_worker("early.dev"), "a", TARGET) and s.serves("early.dev", "a")
    assert s.serve_next(3.0) is None and list(s.queue) == [(str(_worker("late.dev")), "b")]  # no slot left


def test_a_slot_and_a_queue_place_lapse_without_word_and_hold_with_it():
    from ft_common import SERVING_LEASE
    from ft_schedule import Serving
    s = Serving(limit=1)
    assert s.admit("prov.dev", _worker("a.dev"), "x", TARGET, True, 0.0) == ("start", None)
    for node in ("b.dev", "c.dev"):
        assert s.admit("prov.dev", _worker(node), "y", TARGET, True, 0.0)[0] == "queued"
    s.worker_said("a.dev", "x", True, "its worker", SERVING_LEASE - 1)  # word from the serving worker ...
    assert not s.has_free(SERVING_LEASE + 1) and not s.notes  # ... keeps its slot
    assert s.asked_place(_worker("c.dev"), "y", False, SERVING_LEASE) == {"queued": 2}  # c asks: it stays
    assert s.has_free(2 * SERVING_LEASE) and s.notes == ["1 serving slot(s) freed: no word from their worker"]
    # b never asked since it queued: gone; c asked a lease ago at most: its turn
    assert s.serve_next(2 * SERVING_LEASE - 0.5) == (_worker("c.dev"), "y", TARGET) and not s.queue
    assert s.asked_place(_worker("c.dev"), "y", False, 2 * SERVING_LEASE) == {"queued": 0}  # starting
    s.worker_said("c.dev", "y", False, None, 2 * SERVING_LEASE)  # done: the slot goes back
    assert s.has_free(2 * SERVING_LEASE)


def test_a_failed_worker_start_frees_its_slot_and_a_queued_one_hears_why():
    from ft_schedule import Serving
    s = Serving(limit=1)
    waiter = _worker("wait.dev")
    assert s.admit("prov.dev", _worker("req.dev"), "broken", TARGET, True, 0.0) == ("start", None)
    s.start_failed(_worker("req.dev"), "broken", "why", from_queue=False)  # answered at once: nothing kept
    assert not s.serves("req.dev", "broken") and not s.failed
    assert s.admit("prov.dev", _worker("busy.dev"), "big", TARGET, True, 0.0) == ("start", None)
    for name in ("broken", "fine"):
        s.admit("prov.dev", waiter, name, TARGET, True, 0.0)
    assert s.asked_place(waiter, "broken", False, 1.0) == {"queued": 1}  # the control: waiting, first
    s.give_back("busy.dev", "big")
    assert s.serve_next(2.0) == (waiter, "broken", TARGET)
    s.start_failed(waiter, "broken", "prov.dev could not start sending broken: no-file-at-path", from_queue=True)
    assert s.serve_next(2.0) == (waiter, "fine", TARGET)  # the next in line still starts
    assert s.asked_place(waiter, "broken", False, 3.0) == {
        "queued": None, "error": "prov.dev could not start sending broken: no-file-at-path"}
    assert s.asked_place(waiter, "fine", True, 3.0) is None  # one giving up is not answered


def test_downloads_hold_a_slot_until_they_end_or_go_silent():
    from ft_schedule import MAX_QUEUED_AT_PEERS, Transfers
    t = Transfers()
    for i in range(MAX_DOWNLOADS):
        t.touch(("p.dev", f"f{i}"), 0.0, worker="w")
    assert t.full(1.0) and t.fetching("f0", 1.0) == "p.dev" and t.running(1.0) == MAX_DOWNLOADS
    t.waiting[("q.dev", "later")] = TARGET
    assert t.next_waiting(1.0) == [] and t.fetching("later", 1.0) == "q.dev"  # queued here: the name is taken
    t.finish(("p.dev", "f0"), "", bytes=3)
    assert t.history[-1] == {"node": "p.dev", "name": "f0", "ok": True, "error": "", "bytes": 3}
    assert t.next_waiting(2.0) == [(("q.dev", "later"), TARGET)] and t.full(2.0)  # it took the freed slot
    assert not t.full(STALL_TIMEOUT + 3.0) and t.fetching("f1", STALL_TIMEOUT + 3.0) is None  # silent: gone
    assert [r["name"] for r in t.table(2.0)] == ["f1", "f2", "f3", "later"]
    # downloads waiting in their provider's queue hold no slot, but are bounded
    u = Transfers()
    for i in range(MAX_QUEUED_AT_PEERS):
        u.touch((f"n{i}.dev", "x"), 0.0, queued_at=1)
    assert u.running(0.0) == 0 and u.full(0.0) and u.queued_at_peers(0.0, "n0.dev") == 1


def test_the_node_budget_is_shared_and_told_once():
    from ft_common import window_for
    from ft_schedule import Serving, Transfers, budget
    t, s = Transfers(), Serving()
    t.touch(("p.dev", "a"), 0.0, worker="wa")
    t.touch(("p.dev", "b"), 0.0, worker=None)  # its worker not yet heard of: told once it is
    s.admit("prov.dev", _worker("r.dev"), "c", TARGET, True, 0.0)
    s.worker_said("r.dev", "c", True, "wc", 0.0)
    window, told = budget(t, s, 1.0)
    assert window == window_for(3) and sorted(told) == [("wa", "a"), ("wc", "c")]
    assert budget(t, s, 1.0) == (window, [])  # told once
    t.end(("p.dev", "b"))
    window2, told = budget(t, s, 1.0)
    assert window2 == window_for(2) != window and sorted(told) == [("wa", "a"), ("wc", "c")]  # a larger share each
