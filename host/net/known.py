"""The key this node first saw for each peer name, as ssh's known_hosts: a name that turns up with
another key (re-registered in the shared directory by someone else) is refused until the user says
the change is expected (`forget NAME`). A key in the peers file is the user's word: it is taken.

The file (HOME/.keys/known_peers, mode 0600) has one ``NAME HEX-KEY`` line per peer.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from host import fsutil
from host.net.directory import fingerprint

log = logging.getLogger(__name__)


class KnownPeers:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys: dict[str, bytes] = {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = ""
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts or line.startswith("#"):
                continue
            try:
                name, key = parts[0], bytes.fromhex(parts[1])
                if len(key) != 32:
                    raise ValueError("not 32 bytes")
            except (IndexError, ValueError) as e:
                log.warning("%s line %d ignored (%s): %r", self.path, n, e, line[:100])
                continue
            self._keys[name] = key

    def check(self, name: str, key: bytes, from_peers_file: bool) -> str | None:
        """None if `key` may speak for `name` (remembering it if `name` is new, or if the peers file
        gives it), else why not: both fingerprints and the command that accepts the change."""
        with self._lock:
            known = self._keys.get(name)
            if known == key:
                return None
            if known is not None and not from_peers_file:
                return (f"{name} now has key {fingerprint(key)}, but this node first saw key "
                        f"{fingerprint(known)} for it ({self.path}); if {name} really changed its key, "
                        f"accept it with the terminal command `forget {name}`")
            if known is not None:
                log.warning("%s: the peers file gives key %s (was %s): remembered", name, fingerprint(key),
                            fingerprint(known))
            self._keys[name] = key
            self._save()
            return None

    def forget(self, name: str) -> bytes | None:
        """Forget `name`'s key (the next one seen is remembered); the key it had, if any."""
        with self._lock:
            key = self._keys.pop(name, None)
            if key is not None:
                self._save()
            return key

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = "".join(f"{n} {k.hex()}\n" for n, k in sorted(self._keys.items()))
        fsutil.write_atomic(self.path, text.encode(), mode=0o600)
        os.chmod(self.path, 0o600)
