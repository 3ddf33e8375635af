"""A peer that floods a node with big messages, as an attacker's node would (tests/test_flood.py,
bench/flood.py). It speaks the transport by hand, so it sends as fast as the node reads."""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import msgpack
from noise.connection import Keypair, NoiseConnection

from host.messages import Address, Blob, KernelMessage, ProcessId, Request, new_request_id
from host.net import noise as noisemod
from host.net.directory import Directory
from host.net.identity import load_or_create_identity

FILE_TRANSFER = ProcessId.parse("file_transfer:file_transfer:template.os")
BODY_PAD = 512 << 10   # parsed by the process before it can refuse (keeps it busy); a process takes at most 2 MiB


class Flooder:
    """Registered in `directory` as `name`; connects to a node's network port and sends."""

    def __init__(self, name: str, home: Path, directory: Path, port: int):
        self.name = name
        ident = load_or_create_identity(home)
        Directory(directory).register(name, ident.public, "127.0.0.1", 1)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        n = NoiseConnection.from_name(noisemod.NOISE_PROTOCOL)
        n.set_keypair_from_private_bytes(Keypair.STATIC, ident.private)
        n.set_prologue(noisemod.PROLOGUE)
        n.set_as_initiator()
        n.start_handshake()
        self._frame(n.write_message())
        n.read_message(self._read_frame())
        self._frame(n.write_message(msgpack.packb({"v": 1, "name": name, "instance": os.urandom(16)})))
        reply = msgpack.unpackb(n.decrypt(self._read_frame()))
        if not reply.get("accept"):
            raise ConnectionError(f"refused: {reply}")
        self.noise = n
        self.sent = 0
        self.sock.settimeout(None)
        # the node answers (refusals); read them so its writes never stall on us
        threading.Thread(target=self._drain, daemon=True).start()

    def _frame(self, data: bytes) -> None:
        self.sock.sendall(len(data).to_bytes(2, "big") + bytes(data))

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def _read_frame(self) -> bytes:
        return self._exact(int.from_bytes(self._exact(2), "big"))

    def _drain(self) -> None:
        try:
            while self.sock.recv(1 << 16):
                pass
        except OSError:
            pass

    def send_list_files(self, target_node: str, size: int) -> None:
        """A ListFiles request of `size` bytes to the node's file_transfer: BODY_PAD bytes of
        trailing whitespace in its JSON body (the process parses it before it can refuse: this
        keeps it busy), the rest a blob."""
        body = b'"ListFiles"' + b" " * BODY_PAD
        km = KernelMessage(new_request_id(), Address(self.name, FILE_TRANSFER), Address(target_node, FILE_TRANSFER),
                           None, Request(body=body, expects_response=30),
                           Blob(None, os.urandom(1024) * ((size - BODY_PAD) // 1024)))
        payload = msgpack.packb(km.to_wire())
        data = memoryview(len(payload).to_bytes(4, "big") + payload)
        for i in range(0, len(data), noisemod.CHUNK):
            self._frame(self.noise.encrypt(bytes(data[i:i + noisemod.CHUNK])))
        self.sent += 1

    def flood(self, target_node: str, count: int, size: int) -> threading.Thread:
        """Send `count` messages from a thread (it blocks while the node does not read)."""
        def run() -> None:
            try:
                for _ in range(count):
                    self.send_list_files(target_node, size)
            except OSError:
                pass
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
