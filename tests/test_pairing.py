"""The pairing protocol's state machines (host/net/pairing.py), without a network: two sides
passing frames by hand, as the node's drivers pass them over a socket."""
from __future__ import annotations

import os

import msgpack
import pytest

from host.net.pairing import (
    MAX_TRIES,
    PAIR_MAGIC,
    WRONG_CODE,
    CodeHolder,
    Joiner,
    Peer,
    Step,
    code_number,
    new_code,
    parse_code,
)

A = Peer("a.dev", os.urandom(32), 8080)
B = Peer("b.dev", os.urandom(32), 9090, host="b.example")


def mdns_sockets(pid: int) -> int:
    """How many UDP sockets process `pid` holds on the mDNS port (5353), in its own namespace."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("udp", "udp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in f.read().splitlines()[1:]:
                cols = row.split()
                if cols[1].endswith(":14E9") and cols[9] in inodes:
                    count += 1
    return count


def run(holder: CodeHolder, code: str, me: Peer = B, now: float = 0.0) -> tuple[Step, Step]:
    """One whole exchange; the holder's and the joiner's last steps."""
    joiner, session = Joiner(code, me), holder.session()
    to_holder, hstep, jstep = [joiner.start()], Step(), Step()
    while to_holder and not hstep.done:
        hstep = session.receive(to_holder.pop(0), now)
        for frame in hstep.send:
            jstep = joiner.receive(frame)
            to_holder += jstep.send
    return hstep, jstep


def test_the_right_code_gives_each_side_the_others_identity_once():
    code = new_code()
    holder = CodeHolder(code, A, now=0.0)
    hstep, jstep = run(holder, code)
    assert hstep.peer == B and hstep.error is None
    assert jstep.peer == A and jstep.error is None
    # single use: the same code again is refused on both sides, before any key exchange
    hstep, jstep = run(holder, code)
    assert hstep.peer is None and "already used" in hstep.error
    assert jstep.peer is None and "already used" in jstep.error


def test_a_code_is_typed_loosely_but_must_be_a_code():
    code = new_code()
    assert parse_code(code.upper().replace("-", " ")) == code
    assert 1 <= code_number(code) <= 99
    for bad in ["", "7", "7-guitar", "7-guitar-notaword", "0-guitar-ocean", "100-guitar-ocean", "guitar-ocean-7"]:
        with pytest.raises(ValueError, match="not a pairing code"):
            parse_code(bad)


def test_a_wrong_code_fails_on_both_sides_and_three_end_the_code():
    code = "7-guitar-ocean"
    holder = CodeHolder(code, A, now=0.0)
    for i in range(1, MAX_TRIES + 1):
        hstep, jstep = run(holder, "7-guitar-piano")
        assert hstep.peer is None and jstep.peer is None
        assert hstep.error.startswith(f"{WRONG_CODE} (try {i} of {MAX_TRIES})"), hstep.error
        assert jstep.error == WRONG_CODE
    assert "no longer works" in hstep.error
    # now even the right code is refused
    hstep, jstep = run(holder, code)
    assert hstep.peer is None and jstep.peer is None
    assert "stopped working after 3 wrong tries" in jstep.error
    # positive control: a fresh holder with the same code pairs
    hstep, jstep = run(CodeHolder(code, A, now=0.0), code)
    assert hstep.peer == B and jstep.peer == A


def test_a_guess_counts_even_if_the_guesser_hangs_up_after_the_first_reply():
    """The first reply lets a guesser check its guess offline, so hanging up must not save it."""
    holder = CodeHolder("7-guitar-ocean", A, now=0.0)
    for _ in range(MAX_TRIES):
        session = holder.session()
        step = session.receive(Joiner("7-guitar-piano", B).start(), 0.0)
        assert step.send and not step.done
        assert "went away before confirming" in session.aborted()
    assert holder.spent
    hstep, jstep = run(holder, "7-guitar-ocean")
    assert jstep.peer is None and "stopped working" in jstep.error


def test_a_code_expires_and_serves_one_exchange_at_a_time():
    code = new_code()
    holder = CodeHolder(code, A, now=0.0, lifetime=600)
    busy = holder.session()
    busy.receive(Joiner(code, B).start(), 1.0)
    hstep, jstep = run(holder, code, now=2.0)
    assert "under way" in jstep.error and hstep.peer is None
    busy.aborted()
    hstep, jstep = run(holder, code, now=601.0)
    assert "expired" in jstep.error and hstep.peer is None and jstep.peer is None


def test_garbage_and_tampering_are_errors_not_crashes():
    code = new_code()
    holder = CodeHolder(code, A, now=0.0)
    for junk in [b"", b"hello", PAIR_MAGIC, PAIR_MAGIC + b"\xc1", PAIR_MAGIC + msgpack.packb({"v": 2}),
                 PAIR_MAGIC + msgpack.packb({"v": 1, "spake": b"short"})]:
        step = holder.session().receive(junk, 0.0)
        assert step.error and step.peer is None, junk
    # a joiner given a confirmation that was tampered with reports a wrong code, sends "fail"
    joiner = Joiner(code, B)
    session = holder.session()
    reply = msgpack.unpackb(session.receive(joiner.start(), 0.0).send[0])
    reply["confirm"] = bytes(32)
    step = joiner.receive(msgpack.packb(reply))
    assert step.error == WRONG_CODE and msgpack.unpackb(step.send[0]) == {"fail": WRONG_CODE}
    # the holder, told so, counts it as a wrong try
    assert session.receive(step.send[0], 0.0).error.startswith(f"{WRONG_CODE} (try")
    # a sealed identity that was changed in flight does not open
    holder2 = CodeHolder(code, A, now=0.0)
    joiner, session = Joiner(code, B), holder2.session()
    second = msgpack.unpackb(joiner.receive(session.receive(joiner.start(), 0.0).send[0]).send[0])
    second["box"] = second["box"][:-1] + bytes([second["box"][-1] ^ 1])
    step = session.receive(msgpack.packb(second), 0.0)
    assert step.peer is None and "did not decrypt" in step.error and not holder2.used


def test_a_node_will_not_pair_with_its_own_name():
    code = new_code()
    hstep, jstep = run(CodeHolder(code, A, now=0.0), code, me=Peer("a.dev", os.urandom(32), 1))
    assert hstep.peer is None and "own name" in hstep.error
    assert jstep.peer is None and "same name" in jstep.error


def test_a_node_on_loopback_only_announces_nothing(node_factory):
    from host.net.discovery import Discovery, announce_addresses
    assert announce_addresses(["127.0.0.1"]) == [] and announce_addresses(["::1", "127.0.0.1"]) == []
    assert announce_addresses(["10.1.2.3", "127.0.0.1"]) == ["10.1.2.3"]   # control: a LAN address is kept
    assert all(not a.startswith("127.") and a != "::1" for a in announce_addresses(["0.0.0.0"]))
    quiet = Discovery("x.dev", "00" * 8, 1, [])
    quiet.start()
    assert not quiet.active
    node = node_factory("loop.dev")   # listens on 127.0.0.1 (no --bind, no --peers)
    _, lines = node.run("nearby", wait=0.1)
    assert any("listens on loopback only" in ln for ln in lines), lines
    _, lines = node.run("pair 7-notaword-ocean", wait=0.1)
    assert any("is not a pairing code" in ln for ln in lines), lines
    off = node_factory("off.dev", extra_args=["--bind", "0.0.0.0", "--no-discovery"])
    _, lines = off.run("nearby", wait=0.1)
    assert any("discovery is off (--no-discovery)" in ln for ln in lines), lines
    assert mdns_sockets(off.proc.pid) == 0 and mdns_sockets(node.proc.pid) == 0


def test_the_web_page_shows_a_code_and_pairs_with_one(node_factory):
    """Two nodes on one machine pair through their /pair pages (no LAN: the code's node by address)."""
    import json
    import re
    import urllib.parse
    import urllib.request

    def page(node, form: dict | None = None) -> str:
        token = (node.home / ".keys" / "http-token").read_text().strip()
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{node.port}/pair", data=data,
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.read().decode()

    x, y = node_factory("x.dev"), node_factory("y.dev")
    assert "Show a pairing code" in page(x) and "listens on loopback only" in page(x)
    text = page(y, {"action": "join", "code": "7-guitar-ocean", "target": f"127.0.0.1:{x.net_port}"})
    assert "pairing failed: the other node refused: no pairing code is shown there" in text, text
    code = re.search(r"pairing code: <b>([^<]+)</b>", page(x, {"action": "code"})).group(1)
    text = page(y, {"action": "join", "code": code, "target": f"127.0.0.1:{x.net_port}"})
    assert re.search(r"paired with x\.dev \(key [0-9a-f]{16}\) at 127\.0\.0\.1:\d+; pinned in ", text), text
    x.expect(r"paired with y\.dev ")
    assert [e["name"] for e in json.loads((x.home / "peers.json").read_text())] == ["y.dev"]
    assert [e["name"] for e in json.loads((y.home / "peers.json").read_text())] == ["x.dev"]
    key_y = json.loads((x.home / "peers.json").read_text())[0]["public_key"]
    # Whoever knows a code cannot take over a name already paired: a new y.dev (another key) is
    # refused until x unpairs the old one.
    y.stop()
    y2 = node_factory("y.dev", home=y.home.parent / "y2")
    code = re.search(r"pairing code: <b>([^<]+)</b>", page(x, {"action": "code"})).group(1)
    text = page(y2, {"action": "join", "code": code, "target": f"127.0.0.1:{x.net_port}"})
    assert "pairing failed: the other node refused: y.dev is already paired with another key" in text, text
    assert [e["public_key"] for e in json.loads((x.home / "peers.json").read_text())] == [key_y]
    _, lines = x.run("unpair y.dev", wait=0.1)
    assert any("y.dev removed from " in ln for ln in lines), lines
    code = re.search(r"pairing code: <b>([^<]+)</b>", page(x, {"action": "code"})).group(1)
    text = page(y2, {"action": "join", "code": code, "target": f"127.0.0.1:{x.net_port}"})
    assert "paired with x.dev" in text, text
    assert [e["public_key"] for e in json.loads((x.home / "peers.json").read_text())] != [key_y]


def test_the_address_pinned_is_the_one_seen_unless_given_or_relayed():
    from host.net.pairing import PairingError
    told = Peer("b.dev", os.urandom(32), 9090, host="b.lan")
    assert told.address("10.0.0.3", relayed=False) == "10.0.0.3"      # what really answered
    assert told.address("10.0.0.1", relayed=True) == "b.lan"          # the router's address is not b's
    given = Peer("b.dev", os.urandom(32), 9090, host="b.example", host_given=True)
    assert given.address("10.0.0.3", relayed=False) == "b.example"    # --advertise wins
    routed = Peer("b.dev", os.urandom(32), 9090, routers=("r.dev",))
    assert Peer.unpack(routed.pack()) == routed
    for bad in [["b.dev"], ["r,s"], [""], "r.dev", [1]]:
        d = msgpack.unpackb(routed.pack())
        d["routers"] = bad
        with pytest.raises(PairingError, match="unusable routers"):
            Peer.unpack(msgpack.packb(d))
