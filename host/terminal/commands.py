"""The terminal's command interpreter: runs a typed line (from stdin or the control socket) on the
node, through the narrow `NodeControl` interface. Like Kinode's terminal, `script:package:publisher
rest of line` starts that script and sends it the rest of the line."""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from host.messages import Address, ParseError, ProcessId
from host.net.service import format_routing

HELP = """\
Commands (Kinode's terminal scripts, as built-ins, with their syntax and output):
  SCRIPT:PACKAGE:PUBLISHER ARGS   run a package's terminal script, e.g.
                                  list_files:file_transfer:template.os fake2.dev
                                  download:file_transfer:template.os my_file.txt fake2.dev
  m [-a SECONDS] ADDRESS BODY     send BODY (text, e.g. JSON; quote it with '...') as a request to
                                  ADDRESS (NODE@PROCESS:PACKAGE:PUBLISHER; NODE may be `our`); with
                                  -a, wait that long and print the response or the send error
  hi NODE MESSAGE                 send a text message to another node's terminal
  top [PROCESS] [-c]              running processes (one, or all); -c lists capabilities
  peers                           the peers this node is connected to
  peer NODE                       the identity and address known for NODE
  net_diagnostics                 the network's state
  alias NAME [PROCESS]            make NAME run PROCESS (e.g. a script); without PROCESS, remove it
  cat PATH                        print a VFS file (/PACKAGE:PUBLISHER/DRIVE/...)
  echo TEXT                       print TEXT
  kill PROCESS:PACKAGE:PUBLISHER  stop a process
Ours:
  ps                              list running processes, briefly
  caps PROCESS:PACKAGE:PUBLISHER  list the capabilities a process holds
  scripts                         list the scripts of installed packages
  verbosity N                     show process output up to verbosity N (default 0)
  id                              this node's entry for other nodes' peers files (JSON)
  peers-file                      re-read the peers file now and list its entries
  forget NODE                     forget the key remembered for NODE (accept its new key)
  nearby                          nodes announced on the LAN (mDNS): name, address, key, paired or not
  pair                            show a pairing code for another node to type (10 minutes, once)
  pair CODE [NODE|HOST:PORT]      pair with the node showing CODE (found on the LAN, or at NODE or
                                  HOST:PORT): both pin each other's name, key and address
  pair CODE NODE via ROUTER       the same with a node behind NAT, through a router both know
  unpair NODE                     remove NODE's entry from the peers file (to pair it anew)
  help                            this text
  exit                            stop the node"""

# the built-ins that are Kinode's terminal scripts: also reachable as NAME:terminal:sys (e.g. by alias)
KINODE_SCRIPTS = {"m", "hi", "top", "peers", "peer", "net_diagnostics", "alias", "cat", "echo", "kill"}
SEND_ERROR_TEXT = {  # what upstream's `m -a` prints for each SendError kind
    "timeout": "Target did not send response in time, try increasing the await time",
    "offline": "Failed to send message because the target is offline",
}
# upstream's regular expression for `m`'s words: a '...' quoted run, or a run of non-blanks
M_WORDS = re.compile(r"'[^']*'|\S+")


class UsageError(ValueError):
    """Bad input to a command: its text is printed as an error (upstream prints it as output)."""


class Console(Protocol):
    """Where the interpreter prints (the terminal output); `verbosity` filters process output."""
    verbosity: int

    def info(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...


class NodeControl(Protocol):
    """What a typed command may do to the node."""

    @property
    def node_name(self) -> str: ...

    def request_stop(self) -> None: ...
    def describe_processes(self) -> str: ...
    def describe_capabilities(self, pid: ProcessId) -> str: ...
    def list_scripts(self) -> list[str]: ...
    def kill(self, pid: ProcessId) -> bool: ...
    def send_message(self, target: Address, body: str) -> None: ...
    def run_script(self, head: ProcessId, args: str) -> ProcessId: ...
    def send_and_await(self, target: Address, body: str, seconds: int,
                       on_answer: Callable[[bytes | None, str | None], None]) -> None: ...
    def peers_entry(self) -> str: ...
    def reload_peers(self) -> str: ...
    def forget_peer(self, name: str) -> str: ...


    def nearby_text(self) -> str: ...
    def pair_code(self) -> tuple[str, str]: ...
    def pair_join(self, code: str, target: str | None) -> None: ...
    def unpair(self, name: str) -> str: ...
    def process_record(self, pid: ProcessId) -> dict | None: ...   # upstream's PersistedProcess
    def process_map(self) -> dict: ...
    def net_peers(self) -> list: ...                                   # upstream's Identity lists
    def net_peer(self, name: str) -> list | None: ...
    def net_diagnostics(self) -> str: ...
    def read_vfs_file(self, path: str) -> bytes: ...
    def load_aliases(self) -> dict[str, str]: ...
    def save_aliases(self, aliases: dict[str, str]) -> None: ...


class Commands:
    def __init__(self, node: NodeControl, console: Console):
        self.node = node
        self.console = console
        self._aliases: dict[str, str] | None = None   # read from the home on first use

    @property
    def aliases(self) -> dict[str, str]:
        if self._aliases is None:
            self._aliases = self.node.load_aliases()
        return self._aliases

    def run_line(self, line: str) -> ProcessId | None:
        """Run one command line; returns the pid of a started script, if any."""
        node, console = self.node, self.console
        line = line.strip()
        if not line:
            return None
        head, _, rest = line.partition(" ")
        rest = rest.strip()
        try:
            if head != "alias" and head in self.aliases:  # as upstream, an alias wins over a name
                head = self.aliases[head]
            if head.endswith(":terminal:sys") and head.split(":")[0] in KINODE_SCRIPTS:
                head = head.split(":")[0]
            builtin = getattr(self, "do_" + head, None) if head.replace("_", "").isalpha() else None
            if builtin is not None:
                builtin(rest)
            elif head == "help":
                console.info(HELP)
            elif head == "exit":
                node.request_stop()
            elif head == "ps":
                console.info(node.describe_processes())
            elif head == "scripts":
                console.info("\n".join(node.list_scripts()) or "no scripts installed")
            elif head == "verbosity":
                console.verbosity = int(rest)
                console.info(f"verbosity is now {console.verbosity}")
            elif head == "id":
                console.info(node.peers_entry())
            elif head == "peers-file":
                console.info(node.reload_peers())
            elif head == "forget":
                console.info(node.forget_peer(rest))
            elif head == "nearby":
                console.info(node.nearby_text())
            elif head == "pair":
                self.pair(rest)
            elif head == "unpair":
                if not rest or " " in rest:
                    raise UsageError("Usage: unpair NODE")
                console.info(node.unpair(rest))
            elif head == "caps":
                console.info(node.describe_capabilities(ProcessId.parse(rest)))
            elif head.count(":") == 2:
                return node.run_script(ProcessId.parse(head), rest)
            else:
                # a script typed by its short name: name the full one (and the alias that shortens it)
                full = [sc for sc in node.list_scripts() if sc.split(":", 1)[0] == head]
                hint = (f"; did you mean {' or '.join(full)}? (`alias {head} {full[0]}` makes `{head}` work)"
                        if full else "; type `help` for the list")
                console.error(f"unknown command {head!r}{hint}")
        except (ParseError, ValueError) as e:
            for text in str(e).split("\n"):
                console.error(text)
        except Exception as e:  # a command must never take the node down
            console.error(f"{head}: {e}")
        return None

    def pair(self, rest: str) -> None:
        words = rest.split()
        if not words:
            code, how = self.node.pair_code()
            self.console.info(f"pairing code: {code}")
            self.console.info(f"on the other node type: {how}   (valid 10 minutes, for one pairing)")
        elif len(words) <= 2 or (len(words) == 4 and words[2] == "via"):
            self.node.pair_join(words[0], " ".join(words[1:]) or None)
        else:
            raise UsageError("Usage: pair (shows a code) or pair CODE [NODE|HOST:PORT] or pair CODE NODE via ROUTER")

    # ---- Kinode's terminal scripts (kinode/packages/terminal in kinode 0.9.5) -------------------
    def do_m(self, rest: str) -> None:
        usage = "Usage: m <target> <body> [-a <await_time>]"
        if not rest:
            raise UsageError(f"Send a request to a process.\n{usage}")
        words = list(M_WORDS.finditer(rest))
        seconds: int | None = None
        # -a/--await N: before the target (as clap allows anywhere), or as the line's last two words
        for at in (0, len(words) - 2):
            if 0 <= at < len(words) and words[at].group() in ("-a", "--await"):
                if at + 1 >= len(words) or not words[at + 1].group().isdigit():
                    raise UsageError(f"Failed to parse args.\n{usage}")
                seconds = int(words[at + 1].group())
                del words[at:at + 2]
                break
        if len(words) < 2 or words[-1].group() in ("-a", "--await"):
            raise UsageError(f"Failed to parse args.\n{usage}")
        target_text = words[0].group()
        if len(words) == 2:
            body = words[1].group()
            if len(body) > 1 and body[0] == body[-1] == "'":
                body = body[1:-1]
        else:  # ours: several words are the rest of the line, as typed (upstream needs them quoted)
            body = rest[words[1].start():words[-1].end()]
        try:
            target = Address.parse(target_text)
        except ParseError:
            raise UsageError(f'Invalid address: "{target_text}"\n{usage}') from None
        if seconds is None:
            self.node.send_message(target, body)   # its response, if any, is printed when it comes
            return
        self.console.info(f"Awaiting response for {seconds}s")

        def answer(body: bytes | None, kind: str | None) -> None:
            if body is not None:
                self.console.info(body.decode("utf-8", "replace"))
            else:
                self.console.info(SEND_ERROR_TEXT.get(kind or "", f"send error: {kind}"))
        self.node.send_and_await(target, body, seconds, answer)

    def do_hi(self, rest: str) -> None:
        usage = "Usage: hi <node_id> <message>"
        if not rest:
            raise UsageError(f"Send a text message to another node's terminal.\n{usage}")
        node_id, sep, message = rest.partition(" ")
        if not sep:
            raise UsageError(f"Not enough arguments given.\n{usage}")
        if node_id == "our":
            node_id = self.node.node_name
        try:
            target = Address.parse(f"{node_id}@net:distro:sys")
        except ParseError as e:
            raise UsageError(f"{e}\n{usage}") from None

        def answer(body: bytes | None, kind: str | None) -> None:
            if body is not None:
                self.console.info(f"response from {node_id}: {body.decode('utf-8', 'replace')}")
            elif kind == "timeout":
                self.console.info(f"message to {node_id} timed out")
            else:
                self.console.info(f"{node_id} is offline or does not exist")
        self.node.send_and_await(target, message, 10, answer)

    def do_top(self, rest: str) -> None:
        usage = ("Usage:\ntop [-c <show-caps>] <- to view all processes\n"
                 "top <process_id> [-c <show-caps>] <- to view one process")
        words = rest.split()
        show_caps = any(w in ("-c", "--show-caps") for w in words)
        targets = [w for w in words if w not in ("-c", "--show-caps")]
        if len(targets) > 1 or any(w.startswith("-") for w in targets):
            raise UsageError(f"Failed to parse args.\n{usage}")
        if not targets:
            procs = self.node.process_map()
            shown = "\n".join(format_process(pid, rec, show_caps) for pid, rec in procs.items())
            self.console.info(f"\n{shown}\n\ntop: {len(procs)} running processes")
            return
        try:
            pid = ProcessId.parse(targets[0])
        except ParseError as e:
            raise UsageError(f"invalid process id: {e}\n{usage}") from None
        rec = self.node.process_record(pid)
        self.console.info(f"process {pid} not running" if rec is None else format_process(str(pid), rec, show_caps))

    def do_peers(self, rest: str) -> None:
        shown = "\n".join(format_peer(f"{i[0]}:", i) for i in self.node.net_peers())
        self.console.info(f"identities of current connected peers:\n{shown}")

    def do_peer(self, rest: str) -> None:
        identity = self.node.net_peer(rest) if rest else None
        self.console.info(format_peer(f"peer identity for {rest}:", identity) if identity
                          else f"no PKI entry found with name {rest}")

    def do_net_diagnostics(self, rest: str) -> None:
        self.console.info("\n" + self.node.net_diagnostics().replace("\r\n", "\n").rstrip("\n"))

    def do_alias(self, rest: str) -> None:
        usage = "Usage: alias <alias_name> <process_id>"
        if not rest:
            raise UsageError(f"Change alias for a process.\n{usage}")
        name, _, process = rest.partition(" ")
        process = process.strip()
        aliases = dict(self.aliases)
        if not process:
            if name not in aliases:
                self.console.info(f"alias {name} not found")
                return
            del aliases[name]
            text = f"alias {name} removed"
        else:
            try:
                pid = ProcessId.parse(process)
            except ParseError:
                raise UsageError(f"Invalid process ID.\n{usage}") from None
            if name == "alias" or not name.isprintable():
                raise UsageError(f"cannot use {name!r} as an alias\n{usage}")
            aliases[name] = str(pid)
            text = f"alias {name} set for {pid}"
        self.node.save_aliases(aliases)   # kept across restarts; raises (and changes nothing) if it cannot
        self._aliases = aliases
        self.console.info(text)

    def do_cat(self, rest: str) -> None:
        usage = "Usage: cat <file_path>"
        if not rest:
            raise UsageError(f"Print the contents of a file to the terminal.\n{usage}")
        try:
            data = self.node.read_vfs_file(rest)
        except ValueError as e:
            raise UsageError(f"failed to read file {rest} from VFS ({e}).\n{usage}") from None
        self.console.info(data.decode("utf-8", "replace"))

    def do_echo(self, rest: str) -> None:
        self.console.info(rest)

    def do_kill(self, rest: str) -> None:
        try:
            pid = ProcessId.parse(rest)
        except ParseError:
            raise UsageError("Invalid process ID.\nUsage: kill <process_id>") from None
        if not self.node.kill(pid):
            raise UsageError(f"no such process {pid} to kill (or it is one of the node's own)")
        self.console.info(f"killed process {pid}")


def format_process(pid: str, rec: dict, show_caps: bool) -> str:
    """One process as upstream's `top` prints it."""
    on_exit = rec["on_exit"]
    if isinstance(on_exit, dict):
        on_exit = f"Requests({len(on_exit['Requests'])} requests)"
    caps = rec["capabilities"]
    if show_caps:
        cap_text = "".join(f"{c['issuer']}({c['params']})\n        " for c in caps)
    else:
        cap_text = f"{len(caps)}, use -c to display"
    return (f"{pid}:\n    {rec['wasm_bytes_handle'] or '(runtime)'}\n    wit: {rec['wit_version'] or 0}\n"
            f"    on-exit: {on_exit}\n    public: {str(rec['public']).lower()}\n"
            f"    capabilities:\n        {cap_text}")


def format_peer(title: str, identity: list) -> str:
    name, key, routing = identity
    return f"{title}\n    networking key: {key}\n    routing: {format_routing(routing)}"
