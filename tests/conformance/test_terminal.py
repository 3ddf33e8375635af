"""Kinode's terminal scripts (kinode 0.9.5, kinode/packages/terminal) as this node's built-ins: their
syntax and output on real nodes, and the `kernel:distro:sys` / `net:distro:sys` shapes they rest on."""
from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import msgpack
from conftest import wait_for

from host.messages import Address, KernelMessage, ProcessId, Request
from host.net.service import NetService, decode_action

FT = "file_transfer:file_transfer:template.os"
USAGE_M = "error: Usage: m <target> <body> [-a <await_time>]"


def ok(node, command: str, **kw) -> list[str]:
    code, lines = node.run(command, **kw)
    assert code == 0, (command, lines)
    return lines


def refused(node, command: str, *expected: str) -> list[str]:
    """`command` is rejected with these error lines, and the node keeps running."""
    code, lines = node.run(command, wait=0.2)
    assert code == 1, (command, lines)
    for text in expected:
        assert text in lines, (command, lines)
    assert node.alive()
    return lines


def test_m_sends_awaits_and_prints_the_response_or_the_send_error(node_factory):
    node = node_factory("fake.dev")
    # the kernel answers upstream's KernelCommand::Debug(Process) in serde JSON
    lines = ok(node, """m -a 5 our@kernel:distro:sys '{"Debug": {"Process": "vfs:distro:sys"}}'""",
               until=r"^\{")
    assert lines[0] == "Awaiting response for 5s"
    answer = json.loads(lines[1])
    assert answer == {"Debug": {"Process": {"wasm_bytes_handle": "", "wit_version": None, "on_exit": "None",
                                            "capabilities": [], "public": False}}}
    # -a may follow the body, as clap allows; a missing process is a Timeout, as upstream
    lines = ok(node, "m our@no:such:proc hello -a 2", until="Target did not")
    assert lines == ["Awaiting response for 2s",
                     "Target did not send response in time, try increasing the await time"]
    # a node nobody knows: Offline
    lines = ok(node, "m -a 5 nobody.dev@a:b:c hello", until="offline")
    assert lines[-1] == "Failed to send message because the target is offline"
    # bad input: upstream's texts, as errors; the node keeps running
    refused(node, "m", "error: Send a request to a process.", USAGE_M)
    refused(node, "m our@a:b:c", "error: Failed to parse args.", USAGE_M)
    refused(node, "m our@a:b:c -a", "error: Failed to parse args.", USAGE_M)
    refused(node, "m -a soon our@a:b:c x", "error: Failed to parse args.", USAGE_M)
    refused(node, "m no_address body", 'error: Invalid address: "no_address"', USAGE_M)
    assert ok(node, "echo still  here") == ["still  here"]   # positive control; echo keeps the spaces
    # ours: a body of several words is the rest of the line as typed (upstream needs quotes)
    lines = ok(node, """m -a 5 our@kernel:distro:sys {"Debug":  "ProcessMap"}""", until=r"^\{")
    assert "vfs:distro:sys" in json.loads(lines[-1])["Debug"]["ProcessMap"]


def test_kernel_commands_kill_and_has_cap(node_factory):
    node = node_factory("fake.dev")
    assert FT in node.processes()
    def has_cap(params: str) -> object:
        body = json.dumps({"Debug": {"HasCap": {"on": FT, "cap": {"issuer": "fake.dev@vfs:distro:sys",
                                                                    "params": params}}}})
        return json.loads(ok(node, f"m -a 5 our@kernel:distro:sys '{body}'", until=r"^\{")[-1])

    # file_transfer holds read access to its own files drive (granted at install), not to another's
    assert has_cap('{"drive": "/file_transfer:template.os/files", "kind": "read"}') == {"Debug": {"HasCap": True}}
    assert has_cap('{"drive": "/courier:example.os/files", "kind": "read"}') == {"Debug": {"HasCap": False}}
    lines = ok(node, """m -a 5 our@kernel:distro:sys '{"RunProcess": "x:y:z"}'""", until=r"Error")
    assert lines[-1] == '"RunProcessError"'
    lines = ok(node, f"""m -a 5 our@kernel:distro:sys '{{"KillProcess": "{FT}"}}'""", until=r"^\{")
    assert json.loads(lines[-1]) == {"KilledProcess": FT}
    deadline = time.monotonic() + 10   # the process unwinds on its own thread
    while FT in node.processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert FT not in node.processes()
    # a body that is no KernelCommand: upstream prints that it could not parse it
    code, lines = node.run("m our@kernel:distro:sys '{\"Frobnicate\": 1}'", until="couldn't parse")
    assert any(ln.startswith("error: kernel: couldn't parse command") for ln in lines), lines
    assert node.alive()


def test_top_and_kill(node_factory):
    node = node_factory("fake.dev")
    running = node.processes()
    lines = ok(node, "top")
    assert lines[-1] == f"top: {len(running)} running processes"
    assert [ln[:-1] for ln in lines if ln and not ln.startswith(" ") and ln.endswith(":")] == sorted(running)
    lines = ok(node, f"top {FT}")
    assert lines[0] == f"{FT}:"
    assert lines[1] == "    file_transfer:template.os/pkg/file_transfer.wasm" or lines[1].endswith("file_transfer.wasm")
    assert lines[2:6] == ["    wit: 0", "    on-exit: Restart", "    public: true", "    capabilities:"]
    assert re.fullmatch(r"        \d+, use -c to display", lines[6])
    caps = ok(node, f"top {FT} -c")
    assert "        fake.dev@kernel:distro:sys(\"network\")" in caps, caps
    assert ok(node, "top vfs:distro:sys")[1] == "    (runtime)"
    assert ok(node, "top no:such:proc") == ["process no:such:proc not running"]
    refused(node, "top nonsense", "error: invalid process id: process id 'nonsense': expected process:package:publisher")
    refused(node, "top a:b:c d:e:f", "error: Failed to parse args.")
    # kill
    refused(node, "kill", "error: Invalid process ID.", "error: Usage: kill <process_id>")
    refused(node, "kill vfs:distro:sys")                      # the node's own services stay
    refused(node, "kill no:such:proc")
    assert ok(node, f"kill {FT}") == [f"killed process {FT}"]
    assert FT not in node.processes() and "vfs:distro:sys" in node.processes()


def test_hi_peers_peer_and_net_diagnostics_across_two_nodes(two_nodes):
    fake, fake2 = two_nodes
    assert ok(fake, "peers") == ["identities of current connected peers:", ""]
    lines = ok(fake, "hi fake2.dev hello there, friend", until="response from")
    assert lines == ["response from fake2.dev: delivered"]
    fake2.expect(r"^fake\.dev: hello there, friend$", 10)
    # now connected: Kinode's Identity of the peer
    key2 = json.loads(ok(fake2, "id")[0])["public_key"]
    expected = ["    networking key: 0x" + key2,
                f'    routing: Direct {{ ip: "127.0.0.1", ports: {{"tcp": {fake2.net_port}}} }}']
    assert ok(fake, "peers") == ["identities of current connected peers:", "fake2.dev:"] + expected
    assert ok(fake, "peer fake2.dev") == ["peer identity for fake2.dev:"] + expected
    assert ok(fake, "peer nobody.dev") == ["no PKI entry found with name nobody.dev"]
    diag = ok(fake, "net_diagnostics")
    assert diag[0] == "" and diag[1].startswith("our Identity: fake.dev, networking key 0x")
    assert "we have connections with 1 peers:" in diag
    assert any(re.fullmatch(r"    fake2\.dev, last message \d+s ago", ln) for ln in diag), diag
    # a node nobody knows; bad input
    assert ok(fake, "hi nobody.dev hello", until="offline")[-1] == "nobody.dev is offline or does not exist"
    refused(fake, "hi", "error: Send a text message to another node's terminal.",
            "error: Usage: hi <node_id> <message>")
    refused(fake, "hi fake2.dev", "error: Not enough arguments given.")
    lines = ok(fake, "hi fake2.dev again", until="response from")   # positive control
    assert lines == ["response from fake2.dev: delivered"]
    # another node may not print on our terminal through terminal:terminal:sys
    ok(fake, "m -a 3 fake2.dev@terminal:terminal:sys sneaky", until="Target did not")
    assert not any("sneaky" in ln for ln in fake2.lines)


def test_alias_runs_a_script_and_is_kept_across_a_restart(node_factory):
    node = node_factory("fake.dev")
    node.files.mkdir(parents=True, exist_ok=True)
    (node.files / "a.txt").write_text("abc")
    refused(node, "lf fake.dev", "error: unknown command 'lf'; type `help` for the list")
    assert ok(node, "alias lf list_files:file_transfer:template.os") == \
        ["alias lf set for list_files:file_transfer:template.os"]
    assert ok(node, "alias shout echo:terminal:sys") == ["alias shout set for echo:terminal:sys"]
    assert ok(node, "shout loud") == ["loud"]
    node.stop()
    node.start()
    lines = ok(node, "lf fake.dev")
    assert "file_transfer:template.os: a.txt\t\t3" in lines, lines
    assert json.loads((node.home / "aliases.json").read_text()) == {
        "lf": "list_files:file_transfer:template.os", "shout": "echo:terminal:sys"}
    assert ok(node, "alias lf") == ["alias lf removed"]
    assert ok(node, "alias lf") == ["alias lf not found"]
    refused(node, "lf fake.dev", "error: unknown command 'lf'; type `help` for the list")
    refused(node, "alias", "error: Change alias for a process.", "error: Usage: alias <alias_name> <process_id>")
    refused(node, "alias x not-a-process", "error: Invalid process ID.")
    assert ok(node, "shout kept") == ["kept"]


def test_a_damaged_aliases_file_is_reported_and_the_node_runs(node_factory):
    node = node_factory("fake.dev", start=False)
    node.home.mkdir(parents=True)
    (node.home / "aliases.json").write_text("{not json")
    node.start()
    lines = node.run("echo hi", wait=0.2)[1]
    assert any("aliases file" in ln and "unreadable" in ln for ln in lines + node.lines), lines
    assert "hi" in lines


def test_cat_prints_a_vfs_file(node_factory):
    node = node_factory("fake.dev")
    node.files.mkdir(parents=True, exist_ok=True)
    (node.files / "note.txt").write_text("first line\nsecond line\n")
    # file_transfer's own start-up line may come after the node's ready line: let it pass first,
    # so the command's output is only cat's
    wait_for(lambda: any("file_transfer:template.os: begin" in ln for ln in node.lines), 30, "file_transfer's start")
    assert ok(node, "cat /file_transfer:template.os/files/note.txt") == ["first line", "second line", ""]
    lines = refused(node, "cat /file_transfer:template.os/files/missing.txt")
    assert lines[0].startswith("error: failed to read file /file_transfer:template.os/files/missing.txt from VFS")
    refused(node, "cat /file_transfer:template.os/files/../../../.keys/networking.key")
    refused(node, "cat", "error: Print the contents of a file to the terminal.", "error: Usage: cat <file_path>")


# ---- net:distro:sys's MessagePack shapes, as rmp-serde 1.3 (kinode 0.9.5) writes them ------------
# NetAction::GetPeers, ::GetPeer("fake2.dev"), ::GetDiagnostics; the old rmp-serde form of GetPeers
# (a unit variant is its name as a str; a newtype variant a one-entry map)
UPSTREAM_GET_PEERS = b"\xa8GetPeers"
UPSTREAM_GET_PEER = b"\x81\xa7GetPeer\xa9fake2.dev"
UPSTREAM_GET_DIAGNOSTICS = b"\xaeGetDiagnostics"


class StubKernel:
    node = "fake.dev"

    def __init__(self):
        self.sent: list[KernelMessage] = []
        self.printed: list[str] = []
        self.terminal = SimpleNamespace(info=self.printed.append, error=lambda t: self.printed.append("error: " + t))

    def route(self, km, src):
        self.sent.append(km)


def ask(service: NetService, body: bytes, source_node: str = "fake.dev") -> list:
    k = service.kernel
    k.sent.clear()
    src = Address(source_node, ProcessId("p", "q", "r.os"))
    service.deliver(KernelMessage(7, src, service.address, src, Request(expects_response=5, body=body), None))
    return [msgpack.unpackb(km.message.body, raw=False) if km.message.body != b"delivered" else "delivered"
            for km in k.sent]


def test_net_service_answers_upstreams_shapes():
    assert decode_action(UPSTREAM_GET_PEERS) == ("GetPeers", None)
    assert decode_action(UPSTREAM_GET_PEER) == ("GetPeer", "fake2.dev")
    assert decode_action(UPSTREAM_GET_DIAGNOSTICS) == ("GetDiagnostics", None)
    assert decode_action(bytes([0x92, 0x03, 0x90])) == ("GetPeers", [])     # rmp-serde's older enum form
    assert decode_action(b"hello") is None and decode_action(b"7") is None  # text: a `hi`
    record = SimpleNamespace(host="10.0.0.2", port=9000, public_key=bytes(range(32)), routers=())
    indirect = SimpleNamespace(host="", port=0, public_key=bytes(range(32)), routers=("r1.dev", "r2.dev"))
    records = {"fake2.dev": record, "nat.dev": indirect}
    net = SimpleNamespace(connected_peers=lambda: ["fake2.dev"],
                          directory=SimpleNamespace(lookup=records.get),
                          entry=lambda: {"host": "127.0.0.1", "port": 8080, "public_key": "ab" * 32},
                          peer_activity=lambda: {"fake2.dev": 3.2}, routing_status=lambda: [], guard_status=lambda: [])
    service = NetService(StubKernel(), net)
    identity = ["fake2.dev", "0x" + bytes(range(32)).hex(), {"Direct": ["10.0.0.2", {"tcp": 9000}]}]
    assert ask(service, UPSTREAM_GET_PEERS) == [{"Peers": [identity]}]
    assert ask(service, UPSTREAM_GET_PEER) == [{"Peer": identity}]
    assert ask(service, msgpack.packb({"GetPeer": "nobody.dev"})) == [{"Peer": None}]
    # an indirect node: upstream's NodeRouting::Routers
    assert ask(service, msgpack.packb({"GetPeer": "nat.dev"})) == [
        {"Peer": ["nat.dev", "0x" + bytes(range(32)).hex(), {"Routers": ["r1.dev", "r2.dev"]}]}]
    (diag,) = ask(service, UPSTREAM_GET_DIAGNOSTICS)
    assert "we have connections with 1 peers:\r\n    fake2.dev, last message 3s ago\r\n" in diag["Diagnostics"]
    # queries are for local processes only: from a peer, as upstream, they are a `hi` like any text
    assert ask(service, UPSTREAM_GET_PEERS, source_node="evil.dev") == ["delivered"]
    assert service.kernel.printed[-1] == "evil.dev: !!message parse error!!"
    assert ask(service, msgpack.packb({"KnsUpdate": []}), source_node="evil.dev") == []
    assert ask(service, b"hello there", source_node="fake2.dev") == ["delivered"]
    assert service.kernel.printed[-1] == "fake2.dev: hello there"
    # a local request that is no NetAction is dropped, as upstream (kinode/src/net/mod.rs lines
    # 173-177); the same text from a peer above was a `hi`
    printed = len(service.kernel.printed)
    assert ask(service, b"hello there") == [] and len(service.kernel.printed) == printed
