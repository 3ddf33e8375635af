# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""allow [NODE... | *]: who may list and download this node's files.

No argument shows the rule; `*` lets every node (the default); names restrict it to those nodes.
The rule is kept across restarts."""
import wit_world
from ft_common import check_node_name
from process_lib import Address, ask, script, sibling


def allow(our: Address, args: str) -> str:
    parts = args.split()
    if not parts:
        body = "Allow"
    elif parts == ["*"]:
        body = {"Allow": {"nodes": None}}
    elif "*" in parts:
        raise ValueError("usage: allow:file_transfer:template.os [NODE... | *]")
    else:
        for name in parts:   # a typo would otherwise be kept as a rule that lets nobody in
            problem = check_node_name(name)
            if problem:
                raise ValueError(problem)
        body = {"Allow": {"nodes": parts}}
    answer = ask(sibling(our, "file_transfer"), body, who="file_transfer")
    if not isinstance(answer, dict) or "Allow" not in answer:
        raise ValueError(f"unexpected answer {answer!r:.100}")
    return f"files on {our.node} may be listed and downloaded by: {answer['Allow']}"


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(allow, our)
