# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""send NODE FILE [NOTE...]: send FILE from this node's courier drive to NODE, with a note."""
import wit_world
from process_lib import Address, ask, script, sibling

USAGE = "usage: send:courier:example.os NODE FILE [NOTE...]"


def send(our: Address, args: str) -> str:
    parts = args.split(None, 2)
    if len(parts) < 2:
        raise ValueError(USAGE)
    node, name = parts[0], parts[1]
    note = parts[2] if len(parts) == 3 else ""
    answer = ask(sibling(our, "courier"), {"Send": {"node": node, "name": name, "note": note}}, 15, who="courier")
    result = answer.get("Send") if isinstance(answer, dict) else None
    if not isinstance(result, dict) or "Err" in result:
        raise ValueError((result or {}).get("Err", "unexpected answer"))
    return f"offered {name} to {node}"


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(send, our)
