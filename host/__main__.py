"""Command line: run a node, or run a terminal command on a running node.

    python -m host --node fake.dev                       # port 8080, home /tmp/kinode-fake-node
    python -m host --node fake2.dev --port 8081 --home /tmp/kinode-fake-node-2
    python -m host run --home /tmp/kinode-fake-node 'list_files:file_transfer:template.os fake2.dev'
    python -m host id --home /tmp/kinode-fake-node --advertise 192.0.2.7:9000   # this node's peers entry
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

from host import settings as settings_mod
from host.settings import (
    DEFAULT_HOME,
    DEFAULT_PACKAGES,
    DEFAULT_PORT,
    Defaults,
    RuntimeSettings,
    Settings,
    SettingsError,
)


def node_parser(defaults: Defaults | None = None) -> argparse.ArgumentParser:
    d = defaults or settings_mod.defaults_from({})
    p = argparse.ArgumentParser(
        prog="python -m host",
        description="Run a Kinode-style node that runs packages compiled to Wasm components. "
                    "Type `help` at its prompt for the commands. To run a command on a running node "
                    "from another shell: python -m host run --home HOME 'COMMAND'; to print a node's "
                    "entry for other nodes' peers files: python -m host id --help.")
    p.add_argument("--node", required=True, metavar="NAME", help="the node's name, e.g. fake.dev")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"HTTP port of the node's web page, as kit's (default {DEFAULT_PORT})")
    p.add_argument("--net-port", type=int, default=0,
                   help="TCP port other nodes connect to (default: a free one, registered in the directory; "
                        "give a fixed one for nodes on other machines)")
    p.add_argument("--http-host", default="127.0.0.1", metavar="ADDR",
                   help="address the web page listens on (default 127.0.0.1)")
    p.add_argument("--home", type=Path, default=DEFAULT_HOME,
                   help=f"the node's home folder: VFS, state, keys (default {DEFAULT_HOME})")
    p.add_argument("--packages", type=Path, action="append", default=None, metavar="DIR",
                   help="folder of built packages to install and start; repeatable "
                        "(default: this repo's components/)")
    p.add_argument("--directory", type=Path, default=d.directory,
                   help=f"node directory database (default {d.directory}; or set $KINODE_DIRECTORY)")
    p.add_argument("--peers", type=Path, default=None,
                   help="JSON file of peers on other machines: [{name, public_key (hex), host, port}]")
    p.add_argument("--bind", action="append", default=None, metavar="ADDR",
                   help="address to listen on for other nodes, IPv4 or IPv6; repeatable or a comma list "
                        "(default: loopback only, 127.0.0.1, unless --peers is given: then every address)")
    p.add_argument("--advertise", metavar="HOST[:PORT]", default=None,
                   help="the address other nodes should dial, if not the --bind address "
                        "(a hostname, a NAT's forwarded port); shown by `python -m host id`")
    p.add_argument("--router", action="append", default=None, metavar="NODE", dest="routers",
                   help="this node cannot be dialled (behind NAT): it keeps a connection to NODE, which "
                        "relays other nodes' connections to it; repeatable (the next is used when one is "
                        "gone); its peers entry (`python -m host id --router NODE`) names them")
    p.add_argument("--is-router", action="store_true",
                   help="relay connections to indirect nodes that name this node with --router (off by "
                        "default); the relayed sessions stay encrypted end to end")
    p.add_argument("--router-max-nodes", type=int, default=100, metavar="N",
                   help="as a router, serve at most N indirect nodes (default 100)")
    p.add_argument("--router-max-rate", type=float, default=0.0, metavar="MIB_S",
                   help="as a router, relay at most this many MiB/s in all (default 0: no limit)")
    p.add_argument("--no-discovery", dest="discovery", action="store_false", default=True,
                   help="do not announce this node on the LAN nor look for nearby nodes (mDNS); "
                        "a node listening on loopback only never does")
    p.add_argument("--no-compress", dest="compress", action="store_false", default=d.compress,
                   help="send every byte to other nodes as it is: no zstd compression of big blobs, and none "
                        "announced to peers (also KINODE_COMPRESS=0)")
    p.add_argument("--compute-limit", type=float, default=d.compute_limit, metavar="S",
                   help="seconds a process may compute without calling the host before it is stopped "
                        f"(default {d.compute_limit:g}, or $KINODE_COMPUTE_LIMIT)")
    p.add_argument("--max-processes", type=int, default=d.max_processes, metavar="N",
                   help="Wasm instances the node runs at once, processes and the libraries they link "
                        f"(default {d.max_processes}, or $KINODE_MAX_PROCESSES); starting one more fails")
    p.add_argument("--no-fastconv", dest="fastconv", action="store_false", default=d.fastconv,
                   help="convert values with wasmtime-py's own code, not host/runtime/fastconv.py (slower; "
                        "also KINODE_FASTCONV=0)")
    p.add_argument("--cpus", type=_cpu_list, default=None, metavar="LIST",
                   help="run the node on these CPUs only, e.g. 0 or 0-3,6 (default: all). Several nodes on "
                        "one machine run faster on cores of their own")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    return p


def _cpu_list(text: str) -> set[int]:
    """`0`, `0-3,6`: CPU numbers, as taskset and /sys write them."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CPU list such as 0 or 0-3,6") from None
    if not cpus:
        raise argparse.ArgumentTypeError(f"{text!r} names no CPU")
    return cpus


def build_settings(args: argparse.Namespace, defaults: Defaults) -> Settings:
    """The node's settings from its command line (whose defaults came from the environment)."""
    return Settings(
        name=args.node, home=args.home, port=args.port,
        packages=tuple(args.packages or [DEFAULT_PACKAGES]),
        directory=args.directory, peers=args.peers, compute_limit=args.compute_limit,
        bind=tuple(args.bind) if args.bind else None, advertise=args.advertise,
        routers=tuple(dict.fromkeys(args.routers or ())), is_router=args.is_router,
        router_max_nodes=args.router_max_nodes, router_max_rate=args.router_max_rate * (1 << 20),
        net_timeout=defaults.net_timeout, compress=args.compress, relay_record=defaults.relay_record,
        test_pause_after_chunks=defaults.test_pause_after_chunks,
        delta=defaults.delta, test_lie_after_reads=defaults.test_lie_after_reads,
        net_port=args.net_port, discovery=args.discovery, http_host=args.http_host, http_timeout=defaults.http_timeout,
        cpus=frozenset(args.cpus) if args.cpus is not None else None, verbose=args.verbose,
        runtime=RuntimeSettings(cache_dir=defaults.cache_dir, cache_max_bytes=defaults.cache_max_mb << 20,
                                max_instances=args.max_processes,
                                pooling=defaults.pooling, fastconv=args.fastconv))


def _pin(cpus: frozenset[int]) -> None:
    """Keep the node's threads on `cpus`; called before any thread starts, so all inherit it."""
    usable = os.sched_getaffinity(0)
    if not cpus <= usable:
        node_parser().error(f"--cpus: CPU {min(cpus - usable)} is not available here "
                            f"(available: {','.join(map(str, sorted(usable)))})")
    os.sched_setaffinity(0, cpus)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m host run",
                                description="Run one terminal command on a running node and print its output.")
    p.add_argument("--home", type=Path, default=DEFAULT_HOME, help=f"the node's home (default {DEFAULT_HOME})")
    p.add_argument("--wait", type=float, default=1.0,
                   help="seconds to keep printing output after the command's script ends (default 1)")
    p.add_argument("--until", metavar="REGEX", help="instead, print output until a line matches REGEX")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds (default 60)")
    p.add_argument("command", nargs="+", help="the command line, e.g. 'list_files:file_transfer:template.os fake2.dev'")
    return p


def _name_os_threads() -> None:
    """Give each thread its Python name at the OS level too, so `top -H` and /proc show which
    process, service or network loop is using the CPU."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        original = threading.Thread.run

        def run(self):
            libc.prctl(15, self.name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
            original(self)
        threading.Thread.run = run  # type: ignore[method-assign]
    except (OSError, AttributeError):
        pass


def _limit_malloc_arenas() -> None:
    """glibc gives threads that allocate big buffers (network, VFS writers, processes) arenas of
    their own, each keeping freed megabytes for reuse; two arenas keep a big download's peak memory
    lower at the same speed. Call before any thread starts."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 2)                # M_ARENA_MAX
        # buffers over 9 MiB (a peer's largest messages) are mapped for themselves and given back
        # when freed; glibc's default would raise the threshold to each such size freed and then
        # keep them in the heap. Transfer chunks (up to 8 MiB) stay below it, on the heap: mapped
        # afresh, each one's page faults cost more CPU than the larger chunk saved.
        libc.mallopt(-3, 9 << 20)          # M_MMAP_THRESHOLD
        # setting that threshold leaves glibc's trim threshold at 128 KiB: every freed buffer at the
        # top of a heap was handed back and the next one faulted in afresh (page faults took a tenth
        # of a download's CPU, half of an upload's); up to 32 MiB free at a heap's top is kept for
        # reuse, which left the peaks of many downloads at once and of a flood where they were
        libc.mallopt(-1, 32 << 20)         # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass                               # not glibc: nothing to tune

def id_command(argv: list[str]) -> int:
    """`python -m host id`: print this node's peers-file entry without starting the node."""
    import json
    import socket

    from host.net.directory import parse_host_port, peers_entry
    from host.net.identity import load_or_create_identity
    from host.settings import DEFAULT_HOME
    p = argparse.ArgumentParser(
        prog="python -m host id",
        description="Print this node's entry for other nodes' peers files, as JSON, without starting it. "
                    "The key is HOME/.keys/networking.key, created now if the home has none yet "
                    "(the node uses the same key when it starts).")
    p.add_argument("--home", type=Path, default=DEFAULT_HOME, help=f"the node's home (default {DEFAULT_HOME})")
    p.add_argument("--node", metavar="NAME", default=None,
                   help="the node's name (default: the name the node last ran with in this home)")
    p.add_argument("--advertise", metavar="HOST:PORT", default=None,
                   help="the address other nodes should dial: this machine's address or name and the "
                        "node's --net-port (without --advertise: this machine's hostname and --net-port)")
    p.add_argument("--net-port", type=int, default=None, metavar="PORT",
                   help="the node's --net-port, if --advertise gives no port")
    p.add_argument("--router", action="append", default=None, metavar="NODE", dest="routers",
                   help="an indirect node: other nodes reach it through NODE (repeatable, as the node's "
                        "own --router); the entry then has no address unless --advertise gives one")
    args = p.parse_args(argv)
    name = args.node
    if name is None:
        try:  # the node writes "NAME, pid N" into its lock file when it runs
            name = (args.home / ".node.lock").read_text().split(",")[0].strip() or None
        except OSError:
            pass
    if name is None:
        p.error(f"no node has run with home {args.home} yet: give its name with --node NAME")
    try:
        host, port = parse_host_port(args.advertise, args.net_port) if args.advertise else (None, args.net_port)
    except ValueError as e:
        p.error(f"--advertise {e}")
    routers = tuple(dict.fromkeys(args.routers or ()))
    if name in routers:
        p.error("a node cannot be its own --router")
    if host is None and not routers:
        host = socket.gethostname()
        print(f"note: no --advertise given; using this machine's hostname {host!r}", file=sys.stderr)
    if host is not None and port is None:   # not the web page's --port: other nodes dial the networking one
        p.error("give the port other nodes dial, the node's --net-port: --advertise HOST:PORT or --net-port "
                "PORT (a node started without --net-port takes a free port each time: give it one)")
    identity = load_or_create_identity(args.home)
    print(json.dumps(peers_entry(name, identity.public, host, port if host else None, routers)))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["id"]:
        return id_command(argv[1:])
    if argv[:1] == ["run"]:
        args = run_parser().parse_args(argv[1:])
        from host.terminal.control import run_command
        outcome = run_command(args.home, " ".join(args.command), args.wait, args.until, args.timeout, out=sys.stdout)
        if outcome.status != 0:
            print(f"error: {outcome.reason}", file=sys.stderr)
        return outcome.status

    try:
        defaults = settings_mod.defaults_from(os.environ)
    except SettingsError as e:
        node_parser().error(str(e))
    args = node_parser(defaults).parse_args(argv)
    try:
        settings = build_settings(args, defaults)
    except SettingsError as e:
        node_parser(defaults).error(str(e))
    if settings.cpus is not None:
        _pin(settings.cpus)
    _limit_malloc_arenas()
    _name_os_threads()
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(settings.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from host.node import Node, NodeError
    os.umask(0o077)  # what the node makes is its user's alone (the home is private; peers are served by the node)
    t0 = time.perf_counter()
    node = Node(settings)
    try:
        node.start()
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        node.stop()
        return 1
    except (OSError, sqlite3.Error) as e:   # a full disk, a file it may not write: said, not a traceback
        print(f"error: {settings.name} could not start: {start_problem(e, settings)}", file=sys.stderr)
        node.stop()
        return 1
    signal.signal(signal.SIGTERM, lambda *_: node.request_stop())
    node.terminal.info(f"{settings.name}: ready in {time.perf_counter() - t0:.2f} s (http port {settings.port}, "
                       f"net port {node.net.port if node.net else '-'}, home {node.home}); type `help` for commands")
    threading.Thread(target=_read_stdin, args=(node,), name="stdin", daemon=True).start()
    try:
        node.wait()
    except KeyboardInterrupt:
        pass
    node.terminal.info(f"{settings.name}: stopping")
    node.stop()
    node.terminal.flush()
    return 0


def start_problem(e: OSError | sqlite3.Error, settings) -> str:
    """What stopped the node's start, in a line, with the places it writes to."""
    where = f"home {settings.home}, directory {settings.directory}"
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "disk is full" in str(e):
        return f"the disk is full ({where}); free some space and start it again"
    text = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
    if isinstance(e, OSError) and e.filename:
        text += f": {e.filename}"
    return f"{text} ({where})"


def _read_stdin(node) -> None:
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            try:
                line = input()
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break  # stdin closed: keep running; the control socket still takes commands
        node.run_line(line)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
