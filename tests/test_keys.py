"""Keys stay pinned: a node remembers the key it first saw for each name (HOME/.keys/known_peers),
and a name taken over in the shared directory with another key is refused, both ways, until the
user accepts the change with `forget NAME`."""
from __future__ import annotations

import re
import stat

from conftest import wait_for

LIST = "list_files:file_transfer:template.os"


def fingerprints(text: str) -> list[str]:
    return re.findall(r"key ([0-9a-f:]+)", text)


def test_a_name_taken_over_with_another_key_is_refused_until_forgotten(node_factory, tmp_path):
    server, client = node_factory("server.dev"), node_factory("client.dev")
    server.files.mkdir(parents=True, exist_ok=True)
    (server.files / "secret.txt").write_text("for client.dev only\n")
    assert server.run("allow:file_transfer:template.os client.dev")[0] == 0
    code, lines = client.run(f"{LIST} server.dev")
    assert code == 0 and any("secret.txt" in ln for ln in lines), lines
    known = server.home / ".keys" / "known_peers"
    assert "client.dev " in known.read_text() and "server.dev " in (client.home / ".keys" / "known_peers").read_text()
    assert stat.S_IMODE(known.stat().st_mode) == 0o600

    # client.dev goes away; someone else registers the name with another key and asks for the files
    client.stop()
    impostor = node_factory("client.dev", home=tmp_path / "impostor")
    code, lines = impostor.run("download:file_transfer:template.os secret.txt server.dev",
                               until=r"downloaded|error:", timeout=60)
    assert code == 1, lines
    assert not (impostor.files / "secret.txt").exists()
    refused = wait_for(lambda: [ln for ln in server.lines if "refused a connection from client.dev" in ln],
                       30, "the server's refusal")
    assert len(set(fingerprints(refused[0]))) == 2 and "`forget client.dev`" in refused[0], refused

    # the other way: the server is replaced (new key) and a node that knew it refuses it
    server.stop()
    server2 = node_factory("server.dev", home=tmp_path / "server2")
    impostor.stop()
    client.start()
    code, lines = client.run(f"{LIST} server.dev", timeout=30)
    assert code == 1, lines
    said = "\n".join(lines + client.lines)
    assert "server.dev now has key" in said and "`forget server.dev`" in said, lines
    assert len(set(fingerprints(next(ln for ln in lines + client.lines if "now has key" in ln)))) == 2
    code, lines = client.run("forget server.dev")
    assert code == 0 and any("forgot key" in ln for ln in lines), lines
    code, lines = client.run(f"{LIST} server.dev", timeout=30)        # accepted now, and pinned anew
    assert code == 0, lines
    assert server2.alive()
