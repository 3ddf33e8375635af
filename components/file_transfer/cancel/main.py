# world: process-v0-ext
"""cancel NAME [NODE]: stop a download in progress; its partial file is removed."""
import wit_world

from process_lib import Address, ProcessId, Request, SendError, script

USAGE = "usage: cancel:file_transfer:template.os FILE_NAME [NODE]"


def cancel(our: Address, args: str) -> str:
    parts = args.split()
    if len(parts) not in (1, 2):
        raise ValueError(USAGE)
    name, node = parts[0], (parts[1] if len(parts) == 2 else None)
    main = Address(our.node, ProcessId("file_transfer", our.process.package_name, our.process.publisher_node))
    try:
        answer = Request.to(main).body({"Cancel": {"name": name, "node": node}}).send_and_await_response(5).json()
    except SendError as e:
        raise ValueError(f"file_transfer did not answer ({e.kind})") from None
    result = answer.get("Cancel") if isinstance(answer, dict) else None
    if not isinstance(result, dict) or "Err" in (result or {}):
        raise ValueError((result or {}).get("Err", f"unexpected answer {answer!r:.100}"))
    return f"cancelling {name}"


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(cancel, our)
