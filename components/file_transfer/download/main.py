# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""download NAME... WHO: fetch each NAME (a file or a folder) from WHO's file_transfer into our files drive.
WHO may be several nodes, A,B,C: each file is then fetched in pieces from all of them at once (ft_multi).

The local file_transfer starts a worker per file (at most MAX_DOWNLOADS at once; the rest wait
their turn) and reports progress; this script prints only failures to start."""
import wit_world
from ft_common import check_name, nfc
from process_lib import Address, ask, script, sibling

USAGE = "usage: download:file_transfer:template.os NAME [NAME...] NODE[,NODE...]  (a NAME may be a folder; several nodes: pieces of a file from each)"
ASK_TIMEOUT = 30  # seconds


def download(our: Address, args: str) -> str:
    parts = args.split()
    if len(parts) < 2:
        raise ValueError(USAGE)
    *names, who = parts
    # as typed: one spelling of each name (see kinode_types); `photos/` as list_files shows a folder
    names = [nfc(name[:-1] if name.endswith("/") and len(name) > 1 else name) for name in names]
    for name in names:  # all names are checked before any download starts
        problem = check_name(name)
        if problem:
            raise ValueError(problem if name in problem or len(names) == 1 else f"{problem}: {name[:40]!r}...")
    pid = sibling(our, "file_transfer").process
    target = {"node": who, "process": {"process_name": pid.process_name, "package_name": pid.package_name,
                                       "publisher_node": pid.publisher_node}}
    failed = []
    for name in names:
        # file_transfer answers once the worker runs: on a loaded machine that can take seconds
        answer = ask(sibling(our, "file_transfer"),
                     {"Download": {"name": name, "target": target, "is_requestor": True}},
                     timeout=ASK_TIMEOUT, who="file_transfer")
        result = answer.get("Download") if isinstance(answer, dict) else None
        if isinstance(result, dict) and "Err" in result:
            failed.append(f"download of {name} from {who} failed: {result['Err']}")
    if failed:
        raise ValueError("\nerror: ".join(failed))
    return ""


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(download, our)
