"""`kernel:distro:sys`: Kinode's `KernelCommand` requests (serde JSON) answered for this node. `Debug`
(the process map, one process, has-cap) and `KillProcess` map onto it; `RunProcess` and
`InitializeProcess` answer upstream's error variants (processes start here from packages, not from
VFS handles); `GrantCapabilities`/`DropCapabilities`/`Shutdown`/`Booted`, unanswered upstream, are
refused with a line on the terminal. Like upstream's kernel it is not public."""
from __future__ import annotations

import json
import logging
from typing import Any, Optional

from host.kernel.kernel import KERNEL_ID, Kernel
from host.kernel.host_service import HostService
from host.messages import Address, Capability, KernelMessage, ParseError, ProcessId, Request, Response

log = logging.getLogger("host.kernel.service")


def capability_json(cap: Capability) -> dict:
    return {"issuer": str(cap.issuer), "params": cap.params}


class KernelService(HostService):
    def __init__(self, kernel: Kernel):
        super().__init__(kernel, KERNEL_ID)

    # ---- what the answers hold (also used by the terminal's `top`) ---------------------------
    def persisted_process(self, pid: ProcessId) -> Optional[dict]:
        """Upstream's `UserspacePersistedProcess` for a running process, or None."""
        proc = self.kernel.processes.get(pid)
        if proc is None:
            return None
        wasm = getattr(proc, "wasm_path", None)
        on_exit = getattr(proc, "on_exit", None)
        kind = getattr(on_exit, "kind", "none")
        if kind == "restart":
            on_exit_json: Any = "Restart"
        elif kind == "requests":
            on_exit_json = {"Requests": [[str(target), {"body": list(req.body)}, None]
                                         for target, req, _blob in getattr(on_exit, "requests", [])]}
        else:
            on_exit_json = "None"
        return {
            "wasm_bytes_handle": str(wasm) if wasm and not proc.trusted else "",
            "wit_version": None if proc.trusted else 0,
            "on_exit": on_exit_json,
            "capabilities": [capability_json(c) for c in sorted(proc.capabilities,
                                                                 key=lambda c: (str(c.issuer), c.params))],
            "public": bool(proc.public),
        }

    def process_map(self) -> dict:
        return {str(pid): self.persisted_process(pid) for pid in sorted(self.kernel.processes, key=str)
                if self.kernel.processes.get(pid) is not None}

    # ---- requests ----------------------------------------------------------------------------
    def deliver(self, km: KernelMessage) -> None:
        if not isinstance(km.message, Request):
            return
        if km.source.node != self.kernel.node:
            log.warning("kernel: refused a request from %s", km.source)
            return
        try:
            command = json.loads(km.message.body)
            answer = self.handle(command, km)
        except (ValueError, ParseError, KeyError, TypeError) as e:  # upstream prints and drops it
            self.kernel.terminal.error(f"kernel: couldn't parse command: {e}")
            return
        if answer is not None and km.rsvp is not None:
            body = json.dumps(answer, separators=(",", ":")).encode()  # serde_json's compact form
            self.kernel.route(KernelMessage(km.id, self.address, km.rsvp, None, Response(body=body), None), self)

    def handle(self, command: Any, km: KernelMessage) -> Optional[Any]:
        """The JSON answer to one `KernelCommand`, or None for no answer (as upstream)."""
        if isinstance(command, str):
            name, arg = command, None
        elif isinstance(command, dict) and len(command) == 1:
            (name, arg), = command.items()
        else:
            raise ValueError("not a KernelCommand")
        if name == "Debug":
            return {"Debug": self.debug(arg)}
        if name == "KillProcess":
            pid = ProcessId.parse(str(arg))
            if not self.kernel.kill(pid):
                self.kernel.terminal.error(f"kernel: no such process {pid} to kill")
                return None
            self.kernel.terminal.info(f"kernel: killing process {pid}")
            asked = isinstance(km.message, Request) and km.message.expects_response is not None
            return {"KilledProcess": str(pid)} if asked else None
        if name == "RunProcess":
            pid = ProcessId.parse(str(arg))
            self.kernel.terminal.info(f"kernel: no such process {pid} to run "   # upstream's printout
                                      "(processes start here when their package is installed)")
            return "RunProcessError"
        if name == "InitializeProcess":
            self.kernel.terminal.info("kernel: InitializeProcess is not supported on this node "
                                      "(processes start here when their package is installed)")
            return "InitializeProcessError"
        if name in ("GrantCapabilities", "DropCapabilities", "Shutdown", "Booted"):
            self.kernel.terminal.error(f"kernel: {name} from {km.source} is not supported on this node")
            return None
        raise ValueError(f"unknown variant {name!r}")

    def debug(self, what: Any) -> dict:
        if what == "ProcessMap":
            return {"ProcessMap": self.process_map()}
        if isinstance(what, dict) and len(what) == 1:
            (name, arg), = what.items()
            if name == "Process":
                return {"Process": self.persisted_process(ProcessId.parse(arg))}
            if name == "HasCap":
                proc = self.kernel.processes.get(ProcessId.parse(arg["on"]))
                cap = Capability.make(Address.parse(arg["cap"]["issuer"]), json.loads(arg["cap"]["params"]))
                return {"HasCap": None if proc is None else cap in {c.normalised() for c in proc.capabilities}}
        raise ValueError(f"unknown KernelPrint {what!r}")
