# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""A private process with the network capability: it prints whatever reaches it, so tests can show
that nothing unsolicited does."""
import wit_world

from process_lib import SendError, await_message, println, run


def main(our) -> None:
    println("quiet begin")
    while True:
        try:
            msg = await_message()
        except SendError:
            continue
        println(f"quiet got a message from {msg.source}: {msg.body[:50]!r}")


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
