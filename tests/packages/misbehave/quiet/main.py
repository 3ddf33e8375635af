# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""A private process with the network capability: it prints whatever reaches it (as in Kinode,
other nodes may message it). `ask ADDRESS BODY` from the local terminal sends BODY to ADDRESS as a
request expecting an answer (printed when it comes).
`askft ADDRESS BODY` does the same with file_transfer's extension metadata `{"ft": 1}`."""
import wit_world
from process_lib import Address, Request, SendError, await_message, println, run


def main(our) -> None:
    println("quiet begin")
    while True:
        try:
            msg = await_message()
        except SendError as e:
            println(f"quiet send error {e.kind}")
            continue
        println(f"quiet got a message from {msg.source}: {msg.body[:300]!r}")
        local_terminal = msg.source.node == our.node and msg.source.process.process_name == "terminal"
        if msg.is_request and local_terminal and msg.body.startswith((b"ask ", b"askft ")):
            try:
                verb, target, body = msg.body.decode().split(" ", 2)
                req = Request.to(Address.parse(target)).body(body.encode()).expects_response(10)
                if verb == "askft":
                    req.metadata({"ft": 1})
                req.send()
            except ValueError as e:
                println(f"quiet: bad ask: {e}")


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
