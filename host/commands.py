"""The terminal's command interpreter: runs a typed line (from stdin or the control socket) on the
node, through the narrow `NodeControl` interface. Like Kinode's terminal, `script:package:publisher
rest of line` starts that script and sends it the rest of the line."""
from __future__ import annotations

from typing import Optional, Protocol

from host.types import Address, ParseError, ProcessId

HELP = """\
Commands:
  SCRIPT:PACKAGE:PUBLISHER ARGS   run a package's terminal script, e.g.
                                  list_files:file_transfer:template.os fake2.dev
                                  download:file_transfer:template.os my_file.txt fake2.dev
  m ADDRESS BODY                  send BODY (text, e.g. JSON) as a request to ADDRESS
                                  (NODE@PROCESS:PACKAGE:PUBLISHER)
  ps                              list running processes
  kill PROCESS:PACKAGE:PUBLISHER  stop a process
  caps PROCESS:PACKAGE:PUBLISHER  list the capabilities a process holds
  scripts                         list the scripts of installed packages
  verbosity N                     show process output up to verbosity N (default 0)
  id                              this node's entry for other nodes' peers files (JSON)
  peers                           re-read the peers file now and list its entries
  help                            this text
  exit                            stop the node"""


class Console(Protocol):
    """Where the interpreter prints (the terminal output); `verbosity` filters process output."""
    verbosity: int

    def info(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...


class NodeControl(Protocol):
    """What a typed command may do to the node."""

    def request_stop(self) -> None: ...
    def describe_processes(self) -> str: ...
    def describe_capabilities(self, pid: ProcessId) -> str: ...
    def list_scripts(self) -> list[str]: ...
    def kill(self, pid: ProcessId) -> bool: ...
    def send_message(self, target: Address, body: str) -> None: ...
    def run_script(self, head: ProcessId, args: str) -> ProcessId: ...
    def peers_entry(self) -> str: ...
    def reload_peers(self) -> str: ...


class Commands:
    def __init__(self, node: NodeControl, console: Console):
        self.node = node
        self.console = console

    def run_line(self, line: str) -> Optional[ProcessId]:
        """Run one command line; returns the pid of a started script, if any."""
        node, console = self.node, self.console
        line = line.strip()
        if not line:
            return None
        head, _, rest = line.partition(" ")
        rest = rest.strip()
        try:
            if head == "help":
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
            elif head == "peers":
                console.info(node.reload_peers())
            elif head == "caps":
                console.info(node.describe_capabilities(ProcessId.parse(rest)))
            elif head == "kill":
                pid = ProcessId.parse(rest)
                console.info(f"stopping {pid}" if node.kill(pid) else f"no process {pid}")
            elif head == "m":
                target, _, body = rest.partition(" ")
                node.send_message(Address.parse(target), body.strip())
            elif head.count(":") == 2:
                return node.run_script(ProcessId.parse(head), rest)
            else:
                console.error(f"unknown command {head!r}; type `help` for the list")
        except (ParseError, ValueError) as e:
            console.error(str(e))
        except Exception as e:  # a command must never take the node down
            console.error(f"{head}: {e}")
        return None
