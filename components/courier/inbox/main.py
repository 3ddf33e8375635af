# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""inbox: the files other nodes sent to this node's courier, with their notes."""
import wit_world
from process_lib import Address, ask, script, sibling


def inbox(our: Address, args: str) -> str:
    answer = ask(sibling(our, "courier"), "Inbox", who="courier")
    items = answer.get("Inbox", []) if isinstance(answer, dict) else []
    if not items:
        return "inbox is empty"
    return "\n".join([f"{len(items)} file(s) received:"] +
                     [f"  {i['name']} ({i['size']} bytes) from {i['from']}: {i['note']!r}" for i in items])


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(inbox, our)
