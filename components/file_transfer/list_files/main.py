# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""list_files WHO: print the files WHO's file_transfer offers, one per line with its size."""
import wit_world

from process_lib import Address, ask, script, sibling

USAGE = "usage: list_files:file_transfer:template.os NODE"


def list_files(our: Address, args: str) -> str:
    who = args.strip()
    if not who or " " in who:
        raise ValueError(USAGE)
    answer = ask(sibling(our, "file_transfer", who), "ListFiles", who=who)
    if isinstance(answer, dict) and isinstance(answer.get("Err"), str):
        raise ValueError(f"{who}: {answer['Err']}")
    if not isinstance(answer, dict) or not isinstance(answer.get("ListFiles"), list):
        raise ValueError(f"{who} sent an unexpected answer: {answer!r:.200}")
    rows = "".join(f"\n{f['name'].split('/')[-1]}\t\t{f['size']}" for f in answer["ListFiles"])
    return f"{who} available files:\nFile\t\tSize (bytes){rows}"


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(list_files, our)
