"""The node's settings: defaults written once, the environment read in one place.

The command line (`host/__main__.py`) builds one frozen `Settings` and passes it down; nothing else
reads `KINODE_*` variables. Each variable only changes a default: a command-line flag wins.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from host.kinode_types import check_node_name

REPO = Path(__file__).resolve().parent.parent

DEFAULT_HOME = Path("/tmp/kinode-fake-node")
DEFAULT_PORT = 8080            # HTTP, as kit's
DEFAULT_HTTP_TIMEOUT = 30.0    # seconds a process has to answer an HTTP request (then 504)
DEFAULT_PACKAGES = REPO / "components"
DEFAULT_COMPUTE_LIMIT = 30.0   # seconds a guest may compute without calling the host
DEFAULT_MAX_PROCESSES = 1000   # live Wasm instances: processes and the libraries they link
DEFAULT_NET_TIMEOUT = 20.0     # seconds of silence after which a connection to a peer is dropped
DEFAULT_CACHE_MAX_MB = 2048    # compiled components kept on disk; the least recently used go first


class SettingsError(ValueError):
    """A setting (flag or environment variable) with a value the node cannot use."""


@dataclass(frozen=True)
class RuntimeSettings:
    """What the Wasm runtime (`host/runtime/wasm.py`) needs; also used alone by `python -m host.runtime.wasm`."""
    cache_dir: Path                         # compiled components, shared by the nodes of a machine
    cache_max_bytes: int = DEFAULT_CACHE_MAX_MB << 20
    max_instances: int = DEFAULT_MAX_PROCESSES
    pooling: bool = False                   # wasmtime's pooling allocator (see host/runtime/wasm.py)
    fastconv: bool = True                   # host/runtime/fastconv.py's value conversion


@dataclass(frozen=True)
class Settings:
    name: str
    runtime: RuntimeSettings
    directory: Path                         # the node directory's SQLite file
    home: Path = DEFAULT_HOME
    port: int = DEFAULT_PORT                # the HTTP port, as kit's
    net_port: int = 0                       # the networking port; 0: a free one, in the directory
    http_host: str | None = "127.0.0.1"  # where the web page listens; None: no HTTP server
    http_timeout: float = DEFAULT_HTTP_TIMEOUT  # seconds a process has to answer an HTTP request
    packages: tuple[Path, ...] = (DEFAULT_PACKAGES,)
    peers: Path | None = None            # JSON list of peers on other machines
    bind: tuple[str, ...] | None = None  # listen addresses; None: see host.net.network.listen_addresses
    advertise: str | None = None         # HOST[:PORT] other nodes should dial, if not the bound one
    routers: tuple[str, ...] = ()           # an indirect node: reached through these nodes
    is_router: bool = False                 # relay for indirect nodes that name this one
    router_max_nodes: int = 100             # indirect nodes a router serves at once
    router_max_rate: float = 0.0            # bytes/s a router relays in all; 0: no limit
    net_timeout: float = DEFAULT_NET_TIMEOUT # a connection silent this long is dropped
    compress: bool = True                   # zstd-compress big blobs to peers that take it, where it pays
    relay_record: Path | None = None     # tests: a router appends every byte it relays here
    test_pause_after_chunks: int = 0        # tests: see host/vfs/test_pause.py; 0 (off) in a normal run
    delta: bool = True                      # the VFS's delta actions: a download moves only what changed
    test_lie_after_reads: int = -1          # tests: see host/vfs/test_pause.py TestLie; -1 (off) in a normal run
    discovery: bool = True                  # announce on the LAN and browse (mDNS), if not on loopback only
    compute_limit: float = DEFAULT_COMPUTE_LIMIT
    cpus: frozenset[int] | None = None   # pin every thread to these CPUs
    verbose: int = 0

    def __post_init__(self) -> None:
        problem = check_node_name(self.name)
        if problem:
            raise SettingsError(f"--node: {problem}")
        for port in (self.port, self.net_port):
            if not 0 <= port <= 65535:
                raise SettingsError(f"port {port} is not a TCP port (0-65535)")
        if not self.compute_limit > 0:
            raise SettingsError(f"the compute limit must be above 0 seconds, not {self.compute_limit:g}")
        if self.router_max_nodes < 1:
            raise SettingsError("--router-max-nodes must be at least 1")
        if self.router_max_rate < 0:
            raise SettingsError("--router-max-rate must be 0 (no limit) or more")
        if not self.net_timeout >= 2:
            raise SettingsError(f"KINODE_NET_TIMEOUT must be at least 2 seconds, not {self.net_timeout:g}")
        if self.name in self.routers:
            raise SettingsError("a node cannot be its own --router")
        if self.test_pause_after_chunks < 0:
            raise SettingsError("KINODE_TEST_PAUSE_AFTER_CHUNKS must be 0 (off) or more")
        if self.runtime.max_instances < 1:
            raise SettingsError("the process limit (--max-processes) must be at least 1")


# ---- the environment ------------------------------------------------------------------------------
def _number(env: Mapping[str, str], name: str, kind: type, default):
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        return kind(text)
    except ValueError:
        raise SettingsError(f"{name}={text!r} is not a{'n integer' if kind is int else ' number'}") from None


def _at_least(low: int, name: str, value: int) -> int:
    if value < low:
        raise SettingsError(f"{name}={value} is below {low}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = env.get(name, "").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    if text == "":
        return default
    raise SettingsError(f"{name}={env[name]!r} is not 0 or 1")


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """`$KINODE_CACHE`, else `$XDG_CACHE_HOME/kinode-py/compiled` (XDG's default: ~/.cache)."""
    if env.get("KINODE_CACHE"):
        return Path(env["KINODE_CACHE"]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "kinode-py" / "compiled"


def default_directory(env: Mapping[str, str]) -> Path:
    """`$KINODE_DIRECTORY`, else ~/.local/share/kinode-py/directory.sqlite."""
    if env.get("KINODE_DIRECTORY"):
        return Path(env["KINODE_DIRECTORY"]).expanduser()
    return Path(env.get("HOME") or Path.home()) / ".local" / "share" / "kinode-py" / "directory.sqlite"


@dataclass(frozen=True)
class Defaults:
    """Defaults of the command-line flags, after the environment (shown by --help)."""
    compute_limit: float
    max_processes: int
    directory: Path
    cache_dir: Path
    cache_max_mb: int
    pooling: bool
    fastconv: bool
    http_timeout: float
    net_timeout: float
    compress: bool
    relay_record: Path | None
    test_pause_after_chunks: int
    delta: bool
    test_lie_after_reads: int


def defaults_from(env: Mapping[str, str]) -> Defaults:
    """The one place that reads the environment. Raises SettingsError on an unusable value."""
    return Defaults(
        compute_limit=_number(env, "KINODE_COMPUTE_LIMIT", float, DEFAULT_COMPUTE_LIMIT),
        max_processes=_number(env, "KINODE_MAX_PROCESSES", int, DEFAULT_MAX_PROCESSES),
        directory=default_directory(env),
        cache_dir=default_cache_dir(env),
        cache_max_mb=_at_least(0, "KINODE_CACHE_MAX_MB", _number(env, "KINODE_CACHE_MAX_MB", int, DEFAULT_CACHE_MAX_MB)),
        pooling=_flag(env, "KINODE_POOLING", False),
        fastconv=_flag(env, "KINODE_FASTCONV", True),
        http_timeout=_number(env, "KINODE_HTTP_TIMEOUT", float, DEFAULT_HTTP_TIMEOUT),
        net_timeout=_number(env, "KINODE_NET_TIMEOUT", float, DEFAULT_NET_TIMEOUT),
        compress=_flag(env, "KINODE_COMPRESS", True),
        relay_record=Path(env["KINODE_RELAY_RECORD"]) if env.get("KINODE_RELAY_RECORD") else None,
        test_pause_after_chunks=_number(env, "KINODE_TEST_PAUSE_AFTER_CHUNKS", int, 0),
        delta=_flag(env, "KINODE_DELTA", True),
        test_lie_after_reads=_number(env, "KINODE_TEST_LIE_AFTER_READS", int, -1),
    )


def runtime_from_environment(env: Mapping[str, str] | None = None) -> RuntimeSettings:
    """Runtime settings for tools without a command line of their own (build.sh's cache filler)."""
    d = defaults_from(os.environ if env is None else env)
    return RuntimeSettings(cache_dir=d.cache_dir, cache_max_bytes=d.cache_max_mb << 20, max_instances=d.max_processes, pooling=d.pooling,
                           fastconv=d.fastconv)
