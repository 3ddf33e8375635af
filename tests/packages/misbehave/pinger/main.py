# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""Load helper: `ping NODE N` sends N small requests to NODE's pinger, at most 64 unanswered at a
time, and reports how many were answered and how fast; a pinger answers every ping."""
import time

import wit_world
from process_lib import Address, Message, Request, Response, SendError, await_message, println, run

WINDOW = 64


def main(our: Address) -> None:
    println("pinger begin")
    run_state = None  # [target, to_send, sent, answered, failed, started]
    while True:
        try:
            msg: Message = await_message()
        except SendError:
            if run_state:
                run_state[4] += 1
                run_state = flush(run_state)
            continue
        if msg.is_request and msg.source.process.process_name == "terminal":
            node, n = msg.body.decode().split()[1:3]
            run_state = [Address(node, our.process), int(n), 0, 0, 0, time.monotonic()]
            run_state = flush(run_state)
        elif msg.is_request and msg.body.startswith(b"ping "):
            Response().body(b"pong").send()
        elif not msg.is_request and run_state:
            run_state[3] += 1
            run_state = flush(run_state)


def flush(state):
    target, total, sent, answered, failed, started = state
    while sent - answered - failed < WINDOW and sent < total:
        Request.to(target).body(b"ping %d" % sent).expects_response(30).send()
        sent += 1
    state[2] = sent
    if answered + failed >= total:
        secs = time.monotonic() - started
        println(f"pinged {total}: {answered} answered, {failed} failed, {secs:.2f} s, {total / secs:.0f} msg/s")
        return None
    return state


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
