"""file_transfer's scheduling, pure: the downloads a node runs (Transfers) and the files it sends
(Serving), with the time passed in by the caller. No messages, no I/O: file_transfer's main.py and
serving.py carry out what these decide, and tests drive them with a clock of their own.

Serving: at most MAX_SERVING files are sent at once, other requestors wait in a queue. Each serving
worker is a Wasm instance with its chunks in flight, so many requestors at once would otherwise mean
as many instances and buffers on the provider. A slot is taken when a Download is accepted and given
back when its worker says it ended, or SERVING_LEASE seconds after its last word (a worker that
crashed says nothing).
"""
from collections import OrderedDict
from typing import Any

from ft_common import MAX_DOWNLOADS, MAX_SERVING, SERVING_LEASE, STALL_TIMEOUT, window_for

HISTORY = 50  # finished and failed downloads kept for the web page
# downloads waiting in their providers' queues: they do not hold one of the MAX_DOWNLOADS (a busy
# node must not stall downloads from idle ones), but each is a worker instance, so they are bounded:
# this many in all, MAX_DOWNLOADS at any one provider (more wait here, as workers would wait there)
MAX_QUEUED_AT_PEERS = 5
MAX_QUEUED_PER_NODE = 64  # downloads one requestor node may have waiting; more are refused
MAX_QUEUED = 1024         # all nodes together: a queue entry is small, but never unbounded


def at_peer(t: dict) -> bool:
    """The download waits in its provider's queue (place 1 or more)."""
    place = t.get("queued_at")
    return isinstance(place, int) and not isinstance(place, bool) and place > 0


class Transfers:
    """Downloads in progress on this node, keyed by (peer node, file name): so the same file is not
    fetched twice at once, and so `transfers` can list them and `cancel` can stop one."""

    def __init__(self) -> None:
        self.active: dict[tuple, dict] = {}
        # downloads asked for while MAX_DOWNLOADS ran, in order: key -> target Address
        self.waiting: OrderedDict[tuple, Any] = OrderedDict()
        self.history: list[dict] = []

    def busy(self, key: tuple, now: float) -> bool:
        t = self.active.get(key)
        return key in self.waiting or (t is not None and now - t["seen"] < STALL_TIMEOUT)

    def fetching(self, name: str, now: float) -> str | None:
        """The node `name` is being downloaded from (or waits to be), if any: one name, one download
        at a time, whichever node it comes from, so no download silently replaces another."""
        return next((node for node, n in list(self.waiting) + list(self.active) if n == name
                     and self.busy((node, n), now)), None)

    def running(self, now: float) -> int:
        """Downloads that hold a slot: not those waiting in their provider's queue; one whose worker
        went silent gives it up after the stall timeout."""
        return sum(1 for t in self.active.values() if now - t["seen"] < STALL_TIMEOUT and not at_peer(t))

    def queued_at_peers(self, now: float, node: str | None = None) -> int:
        """Downloads waiting in their provider's queue (node's only, if given)."""
        return sum(1 for (peer, _), t in self.active.items()
                   if now - t["seen"] < STALL_TIMEOUT and at_peer(t) and node in (None, peer))

    def full(self, now: float, node: str | None = None) -> bool:
        """No new worker now (toward `node`): MAX_DOWNLOADS run, or MAX_QUEUED_AT_PEERS wait at their
        providers, or MAX_DOWNLOADS at that one. So at most MAX_DOWNLOADS + MAX_QUEUED_AT_PEERS
        requestor workers exist, and MAX_DOWNLOADS * 2 toward one provider."""
        return (self.running(now) >= MAX_DOWNLOADS or self.queued_at_peers(now) >= MAX_QUEUED_AT_PEERS
                or (node is not None and self.queued_at_peers(now, node) >= MAX_DOWNLOADS))

    def touch(self, key: tuple, now: float, **fields: Any) -> dict:
        t = self.active.setdefault(key, {"worker": None, "bytes": 0, "total": None, "rate": 0.0, "printed": float("-inf")})
        t.update(fields, seen=now)
        return t

    def end(self, key: tuple) -> None:
        self.active.pop(key, None)

    def finish(self, key: tuple, error: str = "", **fields: Any) -> None:
        """Keep the outcome for the web page's finished/failed list (the last HISTORY)."""
        self.end(key)
        self.history.append(dict(node=key[0], name=key[1], ok=not error, error=error, **fields))
        del self.history[:-HISTORY]

    def table(self, now: float) -> list:
        rows = [{"node": node, "name": name, "bytes": t["bytes"], "total": t["total"], "rate": t["rate"],
                 "queued_at": t.get("queued_at"),
                 **({"files": t["files"], "of": t["of"]} if t.get("of") is not None else {})}  # a folder
                for (node, name), t in sorted(self.active.items()) if now - t["seen"] < STALL_TIMEOUT]
        return rows + [{"node": node, "name": name, "queued": True} for node, name in self.waiting]

    def next_waiting(self, now: float) -> list:
        """The queued downloads that may start now, taken off the queue and holding their slot
        ([(key, target)], in order)."""
        ready = []
        for key, target in list(self.waiting.items()):
            if self.full(now):
                break
            if self.full(now, key[0]):
                continue  # its provider has enough of ours waiting; others may start
            del self.waiting[key]
            self.touch(key, now, worker=None)
            ready.append((key, target))
        return ready


class Serving:
    def __init__(self, limit: int = MAX_SERVING):
        self.limit = limit
        # [(requestor node, name), last word, its worker once heard of, the window it was told] per file being sent
        self.slots: list = []
        # (requestor worker as text, name) -> [requestor worker, our target address, its last word], in order
        self.queue: OrderedDict[tuple, list] = OrderedDict()
        self.next_asked = False
        # (requestor worker as text, name) -> why its worker could not start when its turn came:
        # said in answer to its next ask (a few kept: one that never asks again is forgotten)
        self.failed: OrderedDict[tuple, str] = OrderedDict()
        self.notes: list[str] = []  # lines for the terminal (verbosity 1), taken by the caller

    def _expire(self, now: float) -> None:
        kept = [s for s in self.slots if now - s[1] < SERVING_LEASE]
        if len(kept) != len(self.slots):
            self.notes.append(f"{len(self.slots) - len(kept)} serving slot(s) freed: no word from their worker")
        self.slots = kept

    def has_free(self, now: float) -> bool:
        self._expire(now)
        return len(self.slots) < self.limit

    def take(self, node: str, name: str, now: float) -> None:
        self.slots.append([(node, name), now, None, None])

    def give_back(self, node: str, name: str) -> None:
        for s in self.slots:
            if s[0] == (node, name):
                self.slots.remove(s)
                return

    def seen(self, node: str, name: str, now: float, worker: Any = None) -> bool:
        for s in self.slots:
            if s[0] == (node, name):
                s[1] = now
                s[2] = worker or s[2]
                return True
        return False

    def serves(self, node: str, name: str) -> bool:
        return any(s[0] == (node, name) for s in self.slots)

    def place(self, key: tuple) -> int | None:
        for i, k in enumerate(self.queue, 1):
            if k == key:
                return i
        return None

    def admit(self, our_node: str, requestor: Any, name: str, target: Any, extended: bool, now: float) -> tuple:
        """A requestor's Download that passed the checks: ("start", None) with its slot taken when one
        is free and nobody waits, else ("queued", place); a plain requestor cannot be told to wait, so
        ("refused", why), as is one past the queue's bounds. `requestor` is its worker's address."""
        if self.has_free(now) and not self.queue:
            self.take(requestor.node, name, now)
            return "start", None
        if not extended:
            return "refused", (f"{our_node} is busy: {len(self.slots)} downloads being served"
                               f"{f', {len(self.queue)} waiting' if self.queue else ''}; try again later")
        key = (str(requestor), name)
        if key not in self.queue:
            mine = sum(1 for r, _, _ in self.queue.values() if r.node == requestor.node)
            if mine >= MAX_QUEUED_PER_NODE or len(self.queue) >= MAX_QUEUED:
                waiting = (f"{mine} downloads from {requestor.node}" if mine >= MAX_QUEUED_PER_NODE
                           else f"{len(self.queue)} downloads")
                return "refused", f"{our_node} is busy: {waiting} wait already; try again later"
        self.queue[key] = [requestor, target, now]
        return "queued", self.place(key)

    def start_failed(self, requestor: Any, name: str, why: str, from_queue: bool) -> None:
        """Its worker could not start: the slot goes back; one whose turn came from the queue hears
        why on its next ask."""
        self.give_back(requestor.node, name)
        if from_queue:
            self.failed[(str(requestor), name)] = why
            while len(self.failed) > MAX_QUEUED_PER_NODE:
                self.failed.popitem(last=False)

    def ask_next(self, now: float) -> bool:
        """Whether to send ourselves a ServeNext now: a slot is free and someone waits (once until
        it is handled)."""
        if self.queue and not self.next_asked and self.has_free(now):
            self.next_asked = True
            return True
        return False

    def serve_next(self, now: float) -> tuple | None:
        """The next queued requestor to start, its slot taken: (requestor, name, target), or None
        when no slot is free or nobody waits. One that went quiet for SERVING_LEASE has gone."""
        self.next_asked = False
        while self.queue and self.has_free(now):
            (_, name), (requestor, target, heard) = self.queue.popitem(last=False)
            if now - heard < SERVING_LEASE:
                self.take(requestor.node, name, now)
                return requestor, name, target
        return None

    def worker_said(self, peer: str, name: str, still: bool, worker: Any, now: float) -> None:
        """One of our serving workers: still at it, or done."""
        if still:
            self.seen(peer, name, now, worker)
        else:
            self.give_back(peer, name)

    def asked_place(self, requestor: Any, name: str, gave_up: bool, now: float) -> dict | None:
        """A queued requestor asks its place (or gives up waiting: None, no answer): the metadata of
        the answer, {"queued": place} (0: its worker is starting; None: unknown), with "error" if
        its worker could not start."""
        key = (str(requestor), name)
        if gave_up:
            self.queue.pop(key, None)  # its place goes to the next
            return None
        if key in self.failed:
            return {"queued": None, "error": self.failed.pop(key)}
        place = self.place(key)
        if place is not None:
            self.queue[key][2] = now
        elif self.serves(requestor.node, name):
            place = 0  # its turn came: the worker is starting
        return {"queued": place}


def budget(transfers: Transfers, serving: Serving, now: float) -> tuple:
    """Each running transfer's window, its share of the node's budget for bytes in flight (sending
    and receiving together, ft_common.NODE_BUDGET): (window, [(worker, name)] to be told it), the
    window taken as told."""
    window = window_for(len(serving.slots) + transfers.running(now))
    told = []
    for slot in serving.slots:
        if slot[2] is not None and slot[3] != window:
            slot[3] = window
            told.append((slot[2], slot[0][1]))
    for key, t in transfers.active.items():
        if t["worker"] is not None and t.get("window") != window and not at_peer(t) and now - t["seen"] < STALL_TIMEOUT:
            t["window"] = window
            told.append((t["worker"], key[1]))
    return window, told
