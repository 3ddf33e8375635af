"""file_transfer's serving slots: at most MAX_SERVING files are sent at once, other requestors wait
in a queue (ft_common describes the messages).

Each serving worker is a Wasm instance with its chunks in flight, so many requestors at once would
otherwise mean as many instances and buffers on the provider. A slot is taken when a Download is
accepted and given back when its worker says it ended, or SERVING_LEASE seconds after its last
word (a worker that crashed says nothing). A queued download starts on a request the process sends
itself ("ServeNext"): the worker API answers the request being handled, and that one asks for none.
"""
import time
from collections import OrderedDict
from typing import Optional

from componentize_py_types import Err
from wit_world.imports import file_transfer_worker as worker_api

from ft_common import MAX_SERVING, SERVING_LEASE
from process_lib import Address, Message, Request, Response, print_to_terminal, println, to_wit_address

SERVE_NEXT = "ServeNext"
MAX_QUEUED_PER_NODE = 64  # downloads one requestor node may have waiting; more are refused
MAX_QUEUED = 1024         # all nodes together: a queue entry is small, but never unbounded


class Serving:
    def __init__(self, limit: int = MAX_SERVING):
        self.limit = limit
        # [(requestor node, name), last word, its worker once heard of, the window it was told] per file being sent
        self.slots: list = []
        # (requestor worker as text, name) -> [requestor worker, our target address, its last word], in order
        self.queue: "OrderedDict[tuple, list]" = OrderedDict()
        self.next_asked = False
        # (requestor worker as text, name) -> why its worker could not start when its turn came:
        # said in answer to its next ask (a few kept: one that never asks again is forgotten)
        self.failed: "OrderedDict[tuple, str]" = OrderedDict()

    def _expire(self, now: float) -> None:
        kept = [s for s in self.slots if now - s[1] < SERVING_LEASE]
        if len(kept) != len(self.slots):
            print_to_terminal(1, f"{len(self.slots) - len(kept)} serving slot(s) freed: no word from their worker")
        self.slots = kept

    def has_free(self) -> bool:
        self._expire(time.monotonic())
        return len(self.slots) < self.limit

    def take(self, node: str, name: str) -> None:
        self.slots.append([(node, name), time.monotonic(), None, None])

    def give_back(self, node: str, name: str) -> None:
        for s in self.slots:
            if s[0] == (node, name):
                self.slots.remove(s)
                return

    def seen(self, node: str, name: str, worker: Optional[Address] = None) -> bool:
        for s in self.slots:
            if s[0] == (node, name):
                s[1] = time.monotonic()
                s[2] = worker or s[2]
                return True
        return False

    def serves(self, node: str, name: str) -> bool:
        return any(s[0] == (node, name) for s in self.slots)

    def place(self, key: tuple) -> Optional[int]:
        for i, k in enumerate(self.queue, 1):
            if k == key:
                return i
        return None


SLOTS = Serving()


def serve(our: Address, msg: Message, name: str, target: Address) -> None:
    """A requestor's Download that passed the checks: start its worker now if a slot is free and
    nobody waits for one, else queue it; a plain requestor cannot be told to wait, so it is refused."""
    extended = msg.meta().get("ft") == 1
    if SLOTS.has_free() and not SLOTS.queue:
        _start(our, msg.source, name, target, answer=True)
        return
    if not extended:
        Response().body({"Download": {"Err": f"{our.node} is busy: {len(SLOTS.slots)} downloads being served"
                                              f"{f', {len(SLOTS.queue)} waiting' if SLOTS.queue else ''}; "
                                              f"try again later"}}).send()
        return
    key = (str(msg.source), name)
    if key not in SLOTS.queue:
        mine = sum(1 for requestor, _, _ in SLOTS.queue.values() if requestor.node == msg.source.node)
        if mine >= MAX_QUEUED_PER_NODE or len(SLOTS.queue) >= MAX_QUEUED:
            waiting = (f"{mine} downloads from {msg.source.node}" if mine >= MAX_QUEUED_PER_NODE
                       else f"{len(SLOTS.queue)} downloads")
            Response().body({"Download": {"Err": f"{our.node} is busy: {waiting} wait already; try again later"}}).send()
            return
    SLOTS.queue[key] = [msg.source, target, time.monotonic()]
    place = SLOTS.place(key)
    print_to_terminal(1, f"{name} for {msg.source.node}: queued, place {place} ({SLOTS.limit} sent at once)")
    Response().body({"Download": {"Ok": None}}).metadata({"ft": 1, "queued": place}).send()


def _start(our: Address, requestor: Address, name: str, target: Address, answer: bool = False) -> None:
    """Start a serving worker; `answer`: the requestor's Download is the request being handled (the
    worker API answers it Ok once the worker exists, so a failure is ours to answer)."""
    SLOTS.take(requestor.node, name)
    try:
        worker_api.start_download(to_wit_address(our), to_wit_address(requestor), name, to_wit_address(target), False)
    except Err as e:
        SLOTS.give_back(requestor.node, name)
        println(f"error: could not start a worker to send {name}: {e.value}")
        why = f"{our.node} could not start sending {name}: {e.value}"
        if answer:  # else the requestor would wait for a Size until its handshake timeout
            Response().body({"Download": {"Err": why}}).send()
        else:  # its turn came from the queue: its next ask hears why
            SLOTS.failed[(str(requestor), name)] = why
            while len(SLOTS.failed) > MAX_QUEUED_PER_NODE:
                SLOTS.failed.popitem(last=False)


def handles(our: Address, msg: Message) -> bool:
    """Take the messages of the serving slots and the queue; False for anything else."""
    if not msg.is_request:
        return False
    meta = msg.meta()
    if meta.get("ft") != 1 and msg.body != b'"ServeNext"':
        return False
    try:
        body = msg.json()
    except ValueError:
        return False
    local = msg.source.node == our.node and msg.source.package_id() == our.package_id()
    if body == SERVE_NEXT and msg.source == our:
        SLOTS.next_asked = False
        while SLOTS.queue and SLOTS.has_free():
            (_, name), (requestor, target, heard) = SLOTS.queue.popitem(last=False)
            if time.monotonic() - heard < SERVING_LEASE:  # else it went away without leaving
                _start(our, requestor, name, target)
        return True
    progress = body.get("Progress") if isinstance(body, dict) else None
    if not isinstance(progress, dict) or not isinstance(progress.get("name"), str):
        return False
    name = progress["name"]
    if local and isinstance(meta.get("serving"), bool) and isinstance(meta.get("peer"), str):
        # one of our serving workers: still at it, or done
        if meta["serving"]:
            SLOTS.seen(meta["peer"], name, msg.source)
        else:
            SLOTS.give_back(meta["peer"], name)
        return True
    if meta.get("queue") is True and not local:
        key = (str(msg.source), name)
        if meta.get("error"):
            SLOTS.queue.pop(key, None)  # it gave up waiting: its place goes to the next
            return True
        if key in SLOTS.failed:
            Response().body("Progress").metadata({"ft": 1, "queued": None, "error": SLOTS.failed.pop(key)}).send()
            return True
        place = SLOTS.place(key)
        if place is not None:
            SLOTS.queue[key][2] = time.monotonic()
        elif SLOTS.serves(msg.source.node, name):
            place = 0  # its turn came: the worker is starting
        Response().body("Progress").metadata({"ft": 1, "queued": place}).send()
        return True
    return False


def after_message(our: Address) -> None:
    """A slot is free and someone waits: start the next one from a message of our own."""
    if SLOTS.queue and not SLOTS.next_asked and SLOTS.has_free():
        SLOTS.next_asked = True
        Request.to(our).body(SERVE_NEXT).send()
