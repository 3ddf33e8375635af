"""file_transfer's serving slots: at most MAX_SERVING files are sent at once, other requestors wait
in a queue (ft_common describes the messages; ft_schedule.Serving decides, this module carries out).

A queued download starts on a request the process sends itself ("ServeNext"): the worker API answers
the request being handled, and that one asks for none.
"""
import time

from componentize_py_types import Err
from ft_schedule import Serving
from process_lib import Address, Message, Request, Response, print_to_terminal, println, to_wit_address
from wit_world.imports import file_transfer_worker as worker_api

SERVE_NEXT = "ServeNext"
SLOTS = Serving()


def _say_notes() -> None:
    for line in SLOTS.notes:
        print_to_terminal(1, line)
    SLOTS.notes.clear()


def serve(our: Address, msg: Message, name: str, target: Address) -> None:
    """A requestor's Download that passed the checks: start its worker now if a slot is free and
    nobody waits for one, else queue it; a plain requestor cannot be told to wait, so it is refused."""
    outcome, detail = SLOTS.admit(our.node, msg.source, name, target, msg.meta().get("ft") == 1, time.monotonic())
    _say_notes()
    if outcome == "start":
        _start(our, msg.source, name, target, answer=True)
    elif outcome == "refused":
        Response().body({"Download": {"Err": detail}}).send()
    else:
        print_to_terminal(1, f"{name} for {msg.source.node}: queued, place {detail} ({SLOTS.limit} sent at once)")
        Response().body({"Download": {"Ok": None}}).metadata({"ft": 1, "queued": detail}).send()


def _start(our: Address, requestor: Address, name: str, target: Address, answer: bool = False) -> None:
    """Start a serving worker (its slot taken); `answer`: the requestor's Download is the request being
    handled (the worker API answers it Ok once the worker exists, so a failure is ours to answer)."""
    try:
        worker_api.start_download(to_wit_address(our), to_wit_address(requestor), name, to_wit_address(target), False)
    except Err as e:
        println(f"error: could not start a worker to send {name}: {e.value}")
        why = f"{our.node} could not start sending {name}: {e.value}"
        SLOTS.start_failed(requestor, name, why, from_queue=not answer)
        if answer:  # else the requestor would wait for a Size until its handshake timeout
            Response().body({"Download": {"Err": why}}).send()


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
        while (turn := SLOTS.serve_next(time.monotonic())) is not None:
            _start(our, *turn)
        _say_notes()
        return True
    progress = body.get("Progress") if isinstance(body, dict) else None
    if not isinstance(progress, dict) or not isinstance(progress.get("name"), str):
        return False
    name = progress["name"]
    if local and isinstance(meta.get("serving"), bool) and isinstance(meta.get("peer"), str):
        SLOTS.worker_said(meta["peer"], name, meta["serving"], msg.source, time.monotonic())
        return True
    if meta.get("queue") is True and not local:
        answer = SLOTS.asked_place(msg.source, name, bool(meta.get("error")), time.monotonic())
        if answer is not None:
            Response().body("Progress").metadata({"ft": 1, **answer}).send()
        return True
    return False


def after_message(our: Address) -> None:
    """A slot is free and someone waits: start the next one from a message of our own."""
    if SLOTS.ask_next(time.monotonic()):
        Request.to(our).body(SERVE_NEXT).send()
    _say_notes()
