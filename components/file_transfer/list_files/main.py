# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""list_files WHO [FOLDER]: print the files and folders WHO's file_transfer offers, one per line
with its size (a folder: `NAME/`, its total size and file count), or those inside FOLDER."""
import wit_world
from process_lib import Address, Request, SendError, script, sibling

USAGE = "usage: list_files:file_transfer:template.os NODE [FOLDER]"


def list_files(our: Address, args: str) -> str:
    parts = args.split()
    if not 1 <= len(parts) <= 2:
        raise ValueError(USAGE)
    who = parts[0]
    folder = parts[1] if len(parts) == 2 else None
    # "ft": our peers answer with folders too (a plain peer ignores the metadata and lists files)
    meta = {"ft": 1} if folder is None else {"ft": 1, "folder": folder}
    try:
        msg = (Request.to(sibling(our, "file_transfer", who)).body("ListFiles").metadata(meta)
               .send_and_await_response(5))
        answer = msg.json()
    except SendError as e:
        raise ValueError(f"{who} did not answer ({e.kind})") from None
    except ValueError:
        raise ValueError(f"{who} sent a malformed answer") from None
    if isinstance(answer, dict) and isinstance(answer.get("Err"), str):
        raise ValueError(f"{who}: {answer['Err']}")
    if not isinstance(answer, dict) or not isinstance(answer.get("ListFiles"), list):
        raise ValueError(f"{who} sent an unexpected answer: {answer!r:.200}")
    rows = []
    for f in answer["ListFiles"]:
        name = str(f.get("name", "?"))
        name = name.split("/")[-1] if not name.endswith("/") else name.rstrip("/").split("/")[-1] + "/"
        extra = ""
        if name.endswith("/"):
            extra = f"\t({f['files']} files)" if f.get("files") is not None else f"\t({f.get('error', '?')})"
        rows.append(f"\n{name}\t\t{f.get('size')}{extra}")
    where = f" in {folder}" if folder else ""
    return f"{who} available files{where}:\nFile\t\tSize (bytes){''.join(rows)}"


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        script(list_files, our)
