# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""transfers: list this node's downloads in progress (node, file or folder, files, bytes, rate, ETA) and queued."""
import wit_world
from ft_common import human_size
from process_lib import Address, ask, script, sibling


def transfers(our: Address, args: str) -> str:
    answer = ask(sibling(our, "file_transfer"), "Transfers", who="file_transfer")
    rows = answer.get("Transfers", []) if isinstance(answer, dict) else []
    if not rows:
        return "no transfers in progress"
    waiting = sum(1 for t in rows if t.get("queued"))   # waiting here for a slot, not yet started
    running = len(rows) - waiting
    head = f"{running} transfer{'' if running == 1 else 's'} in progress"
    lines = [head + (f", {waiting} queued:" if waiting else ":")]
    for t in rows:
        total, done, rate = t.get("total"), t.get("bytes", 0), t.get("rate", 0)
        if t.get("queued"):
            lines.append(f"  {t['name']} from {t['node']}: queued")
            continue
        if t.get("queued_at"):  # our worker waits in the provider's queue
            lines.append(f"  {t['name']} from {t['node']}: queued at {t['node']}, position {t['queued_at']}")
            continue
        if total is None:
            lines.append(f"  {t['name']} from {t['node']}: starting")
            continue
        eta = f"{(total - done) / rate:.0f} s" if rate else "?"
        files = f"folder, {t['files']} of {t['of']} files, " if t.get("of") is not None else ""
        lines.append(f"  {t['name']} from {t['node']}: {files}{human_size(done)} of {human_size(total)}, "
                     f"{rate / 2**20:.1f} MiB/s, ETA {eta}")
    return "\n".join(lines)


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(transfers, our)
