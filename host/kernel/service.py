"""`kernel:distro:sys`: Kinode's `KernelCommand` requests (serde JSON) carried out for this node, as
upstream's handle_kernel_request (kinode v0.9.5 kinode/src/kernel/mod.rs): `Debug` (the process map,
one process, has-cap), `KillProcess`, `InitializeProcess` (the wasm in the blob; the process waits
for `RunProcess`), `RunProcess`, `GrantCapabilities` and `DropCapabilities`. `Shutdown` and `Booted`
are the runtime's own and refused here. Like upstream's kernel it is not public: a process needs a
messaging capability to it."""
from __future__ import annotations

import json
import logging
from typing import Any

from host.kernel.api import OnExit
from host.kernel.host_service import HostService
from host.kernel.kernel import KERNEL_ID, Kernel
from host.messages import Address, Blob, Capability, KernelMessage, ParseError, ProcessId, Request, Response
from host.runtime.wasm import MissingInterface

log = logging.getLogger("host.kernel.service")


def capability_json(cap: Capability) -> dict:
    return {"issuer": str(cap.issuer), "params": cap.params}


def capability_from_json(value: Any) -> Capability:
    if not isinstance(value, dict) or not isinstance(value.get("params"), str):
        raise ValueError(f"not a Capability: {value!r}")
    return Capability(Address.parse(str(value["issuer"])), value["params"]).normalised()


def _bytes(value: Any) -> bytes:
    if not isinstance(value, list):
        raise ValueError("bytes must be a list of numbers")
    return bytes(value)


def on_exit_json(on_exit: Any) -> Any:
    """OnExit as serde writes lib's `OnExit` (lib/src/core.rs): Rust's PersistedProcess parses it."""
    kind = getattr(on_exit, "kind", "none")
    if kind == "restart":
        return "Restart"
    if kind != "requests":
        return "None"
    out = []
    for target, req, blob in getattr(on_exit, "requests", []):
        # lib's Request: capabilities are (Capability, signature) pairs; our caps carry no signature
        out.append([str(target), {"inherit": req.inherit, "expects_response": req.expects_response,
                                  "body": list(req.body), "metadata": req.metadata,
                                  "capabilities": [[capability_json(c), []] for c in req.capabilities]},
                    None if blob is None else {"mime": blob.mime, "bytes": list(blob.bytes)}])
    return {"Requests": out}


def on_exit_from_json(value: Any) -> OnExit:
    if value == "None":
        return OnExit("none")
    if value == "Restart":
        return OnExit("restart")
    if isinstance(value, dict) and list(value) == ["Requests"] and isinstance(value["Requests"], list):
        reqs = []
        for target, req, blob in value["Requests"]:
            r = Request(bool(req["inherit"]), req["expects_response"], _bytes(req["body"]), req["metadata"],
                        [capability_from_json(c[0]) for c in req["capabilities"]])
            reqs.append((Address.parse(target), r, None if blob is None else Blob(blob["mime"], _bytes(blob["bytes"]))))
        return OnExit("requests", reqs)
    raise ValueError(f"not an OnExit: {value!r}")


class KernelService(HostService):
    def __init__(self, kernel: Kernel):
        super().__init__(kernel, KERNEL_ID)

    # ---- what the answers hold (also used by the terminal's `top`) ---------------------------
    def persisted_process(self, pid: ProcessId) -> dict | None:
        """Upstream's `UserspacePersistedProcess` for a running process, or None."""
        proc = self.kernel.processes.get(pid)
        if proc is None:
            return None
        wasm = getattr(proc, "wasm_path", None)
        on_exit = getattr(proc, "on_exit", None)
        return {
            # a VFS path with its leading `/`, as upstream's install writes it (kinode/src/state.rs)
            "wasm_bytes_handle": "/" + str(wasm).lstrip("/") if wasm and not proc.trusted else "",
            "wit_version": None if proc.trusted else 0,
            "on_exit": on_exit_json(on_exit),
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
        if answer is not None:
            body = json.dumps(answer, separators=(",", ":")).encode()  # serde_json's compact form
            target = km.rsvp if km.rsvp is not None else km.source   # as upstream: rsvp, else source
            self.kernel.route(KernelMessage(km.id, self.address, target, None, Response(body=body), None), self)

    def handle(self, command: Any, km: KernelMessage) -> Any | None:
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
            if self.kernel.run_process(pid):
                return "StartedProcess"
            self.kernel.terminal.info(f"kernel: no such process {pid} to run")   # upstream's printout
            return "RunProcessError"
        if name == "InitializeProcess":
            return self.initialize(arg, km)
        if name in ("GrantCapabilities", "DropCapabilities"):
            if not isinstance(arg, dict):
                raise ValueError(f"{name} takes a struct")
            target = ProcessId.parse(str(arg["target"]))
            caps = [capability_from_json(c) for c in arg["capabilities"]]
            if name == "GrantCapabilities":
                for c in caps:
                    self.kernel.grant(target, c)
            else:
                self.kernel.drop_caps(target, caps)
            return None   # unanswered, as upstream
        if name in ("Shutdown", "Booted"):
            self.kernel.terminal.error(f"kernel: {name} from {km.source} is the runtime's own; refused")
            return None
        raise ValueError(f"unknown variant {name!r}")

    def initialize(self, arg: Any, km: KernelMessage) -> str:
        if not isinstance(arg, dict):
            raise ValueError("InitializeProcess takes a struct")
        pid = ProcessId.parse(str(arg["id"]))
        on_exit = on_exit_from_json(arg["on_exit"])
        caps = [capability_from_json(c) for c in arg["initial_capabilities"]]
        handle, public = str(arg["wasm_bytes_handle"]), bool(arg["public"])
        src = self.kernel.processes.get(km.source.process)
        if km.lazy_load_blob is None or src is None:
            self.kernel.terminal.error("kernel: process startup requires bytes")   # upstream's printout
            return "InitializeProcessError"
        try:
            self.kernel.initialize_process(src, pid, km.lazy_load_blob.bytes, handle, caps, public, on_exit)
        except (MissingInterface, ValueError) as e:
            self.kernel.terminal.error(f"kernel: error initializing process {pid}: {e}")
            return "InitializeProcessError"
        except Exception as e:  # bytes that are no component: wasmtime's own error
            self.kernel.terminal.error(f"kernel: error initializing process {pid}: {str(e).splitlines()[0]}")
            return "InitializeProcessError"
        return "InitializedProcess"

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
