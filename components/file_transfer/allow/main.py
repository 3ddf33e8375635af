# world: process-v0-ext
"""allow [NODE... | *]: who may list and download this node's files.

No argument shows the rule; `*` lets every node (the default); names restrict it to those nodes.
The rule is kept across restarts."""
import wit_world

from process_lib import Address, ProcessId, Request, SendError, script


def allow(our: Address, args: str) -> str:
    parts = args.split()
    if not parts:
        body = "Allow"
    elif parts == ["*"]:
        body = {"Allow": {"nodes": None}}
    elif "*" in parts:
        raise ValueError("usage: allow:file_transfer:template.os [NODE... | *]")
    else:
        body = {"Allow": {"nodes": parts}}
    main = Address(our.node, ProcessId("file_transfer", our.process.package_name, our.process.publisher_node))
    try:
        answer = Request.to(main).body(body).send_and_await_response(5).json()
    except SendError as e:
        raise ValueError(f"file_transfer did not answer ({e.kind})") from None
    if not isinstance(answer, dict) or "Allow" not in answer:
        raise ValueError(f"unexpected answer {answer!r:.100}")
    return f"files on {our.node} may be listed and downloaded by: {answer['Allow']}"


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(allow, our)
