# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""cancel NAME [NODE]: stop a download in progress; its partial file is removed."""
import wit_world
from process_lib import Address, ask, script, sibling

USAGE = "usage: cancel:file_transfer:template.os FILE_NAME [NODE]"


def cancel(our: Address, args: str) -> str:
    parts = args.split()
    if len(parts) not in (1, 2):
        raise ValueError(USAGE)
    name, node = parts[0], (parts[1] if len(parts) == 2 else None)
    answer = ask(sibling(our, "file_transfer"), {"Cancel": {"name": name, "node": node}}, who="file_transfer")
    result = answer.get("Cancel") if isinstance(answer, dict) else None
    if not isinstance(result, dict) or "Err" in (result or {}):
        raise ValueError((result or {}).get("Err", f"unexpected answer {answer!r:.100}"))
    return f"cancelling {name}"


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(cancel, our)
