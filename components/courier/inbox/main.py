# world: process-v0-ext
"""inbox: the files other nodes sent to this node's courier, with their notes."""
import wit_world

from process_lib import Address, ProcessId, Request, SendError, script


def inbox(our: Address, args: str) -> str:
    courier = Address(our.node, ProcessId("courier", our.process.package_name, our.process.publisher_node))
    try:
        answer = Request.to(courier).body("Inbox").send_and_await_response(5).json()
    except SendError as e:
        raise ValueError(f"courier did not answer ({e.kind})") from None
    items = answer.get("Inbox", []) if isinstance(answer, dict) else []
    if not items:
        return "inbox is empty"
    return "\n".join([f"{len(items)} file(s) received:"] +
                     [f"  {i['name']} ({i['size']} bytes) from {i['from']}: {i['note']!r}" for i in items])


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(inbox, our)
