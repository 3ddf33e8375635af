"""`vfs:distro:sys`: the VFS (host/vfs/store.py) as a service answering local processes' requests."""
from __future__ import annotations

import logging

from host.kernel.host_service import HostService
from host.kernel.kernel import Kernel
from host.messages import Blob, Capability, KernelMessage, ProcessId, Request, Response
from host.vfs.store import Vfs
from host.vfs.test_pause import TestLie, TestPause

log = logging.getLogger("host.vfs.service")

VFS_ID = ProcessId("vfs", "distro", "sys")


class VfsService(HostService):
    def __init__(self, kernel: Kernel, vfs: Vfs, pause_after_chunks: int = 0, lie_after_reads: int = -1):
        super().__init__(kernel, VFS_ID)
        self.vfs = vfs
        self.pause = (TestPause(pause_after_chunks, kernel.home,
                                lambda text: kernel.terminal.process_output(VFS_ID, text))
                      if pause_after_chunks > 0 else None)  # tests only (settings.test_pause_after_chunks)
        self.lie = (TestLie(lie_after_reads, lambda text: kernel.terminal.process_output(VFS_ID, text))
                    if lie_after_reads >= 0 else None)  # tests only (settings.test_lie_after_reads)
        kernel.on_exit_listener(lambda pid, _reason: vfs.forget(pid))  # close what it left open

    def deliver(self, km: KernelMessage) -> None:
        if not isinstance(km.message, Request):
            return
        src = self.kernel.processes.get(km.source.process)
        if km.source.node != self.kernel.node or src is None:
            log.warning("vfs: refused a request from %s", km.source)
            return

        def has_cap(params: dict) -> bool:
            return src.has_cap(Capability.make(self.address, params))

        if self.pause is not None:
            self.pause.before(km.source.process, km.message.body)
        blob = km.lazy_load_blob.bytes if km.lazy_load_blob else None
        res = self.vfs.handle(km.source.process, has_cap, km.message.body, blob)
        if self.lie is not None:
            res.blob = self.lie.corrupt(km.source.process, km.message.body, res.blob)
        for params in res.grant:
            src.capabilities.add(Capability.make(self.address, params))
        # as upstream (kinode v0.9.5 kinode/src/vfs.rs): an answer goes to the rsvp, else to a
        # source that expects one, with the request's metadata; an error goes to the rsvp or the
        # source always, without metadata
        failed = res.body.startswith(b'{"Err"')
        target = km.rsvp
        if target is None and (failed or km.message.expects_response is not None):
            target = km.source
        if target is not None:
            out = Blob(res.mime, res.blob) if res.blob is not None else None
            meta = None if failed else km.message.metadata
            self.kernel.route(KernelMessage(km.id, self.address, target, None,
                                            Response(body=res.body, metadata=meta), out), self)
