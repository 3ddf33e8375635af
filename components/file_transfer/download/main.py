# world: process-v0-ext
"""download NAME WHO: fetch NAME from WHO's file_transfer into our files drive.

The local file_transfer starts a worker and reports progress; this script prints only a failure
to start."""
import wit_world

from ft_common import check_name
from process_lib import Address, ask, script, sibling

USAGE = "usage: download:file_transfer:template.os FILE_NAME NODE"


def download(our: Address, args: str) -> str:
    parts = args.split()
    if len(parts) != 2:
        raise ValueError(USAGE)
    name, who = parts
    problem = check_name(name)
    if problem:
        raise ValueError(problem)
    pid = sibling(our, "file_transfer").process
    body = {"Download": {"name": name, "target": {"node": who, "process": {
        "process_name": pid.process_name, "package_name": pid.package_name, "publisher_node": pid.publisher_node}},
        "is_requestor": True}}
    answer = ask(sibling(our, "file_transfer"), body, who="file_transfer")
    result = answer.get("Download") if isinstance(answer, dict) else None
    if isinstance(result, dict) and "Err" in result:
        raise ValueError(f"download of {name} from {who} failed: {result['Err']}")
    return ""


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(download, our)
