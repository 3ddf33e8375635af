"""Package installation: copy a built package into the node's `pkg` drive and start its processes
as its `pkg/manifest.json` says; start its terminal scripts as `pkg/scripts.json` says.

A package folder is what `build.sh` produces, laid out as kit lays it out: `metadata.json` and
`pkg/` with `manifest.json`, `scripts.json` and the `.wasm` files. One extension to kit's manifest:
a process entry may list `"libraries"`, wasm files of the package whose exported interfaces satisfy
the process's imports (kit bundles them with `kit b -a`).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from host.kernel.api import OnExit
from host.kernel.kernel import Kernel, messaging_cap
from host.messages import Address, Capability, PackageId, ProcessId
from host.vfs.service import VFS_ID
from host.vfs.store import Vfs

log = logging.getLogger("host.packages")


class PackageError(Exception):
    pass


@dataclass
class Package:
    id: PackageId
    manifest: list
    scripts: dict


def find_packages(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "metadata.json").is_file() and (p / "pkg" / "manifest.json").is_file())


def read_package_id(src: Path) -> PackageId:
    try:
        meta = json.loads((src / "metadata.json").read_text())
        props = meta["properties"]
        return PackageId(props["package_name"], props["publisher"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PackageError(f"{src}/metadata.json: {e}") from None


def _install_file(src: Path, dest: Path) -> None:
    """Put a package file into the pkg drive: a hard link when it can (components are ~18 MB each
    and every node home holds them all), else a copy. The VFS keeps the pkg drive read-only."""
    if dest.exists():
        a, b = src.stat(), dest.stat()
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns):
            return
    tmp = dest.with_name(dest.name + ".installing")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    tmp.replace(dest)


def _cap(node: str, item: Any) -> Capability:
    if isinstance(item, str):
        return messaging_cap(Address(node, ProcessId.parse(item)))
    if isinstance(item, dict) and isinstance(item.get("process"), str):
        return Capability.make(Address(node, ProcessId.parse(item["process"])), item.get("params", "messaging"))
    raise PackageError(f"bad capability entry {item!r}")


def _on_exit(node: str, value: Any) -> OnExit:
    if value in (None, "None"):
        return OnExit("none")
    if value == "Restart":
        return OnExit("restart")
    raise PackageError(f"unsupported on_exit {value!r} (use \"None\" or \"Restart\")")


def _caps_for(kernel: Kernel, pid: ProcessId, entry: dict) -> set[Capability]:
    caps = {_cap(kernel.node, c) for c in entry.get("request_capabilities", [])}
    # as upstream's install (kinode/src/state.rs): a messaging cap to itself, and read and write
    # caps to its package's pkg drive (which it may then pass on to other processes)
    caps.add(messaging_cap(Address(kernel.node, pid)))
    vfs = Address(kernel.node, VFS_ID)
    drive = f"/{pid.package_id}/pkg"
    caps |= {Capability.make(vfs, {"kind": kind, "drive": drive}) for kind in ("read", "write")}
    if entry.get("request_networking"):
        caps.add(kernel.network_cap())
    return caps


def _grant_from(kernel: Kernel, pid: ProcessId, entry: dict) -> None:
    """`grant_capabilities`: the named processes get a messaging capability to `pid`."""
    for item in entry.get("grant_capabilities", []):
        name = item if isinstance(item, str) else item.get("process") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise PackageError(f"bad grant entry {item!r}")
        params = item.get("params", "messaging") if isinstance(item, dict) else "messaging"
        kernel.grant(ProcessId.parse(name), Capability.make(Address(kernel.node, pid), params))


def install(kernel: Kernel, vfs: Vfs, src: Path) -> Package:
    """Copy the package into its `pkg` drive of the VFS and start its manifest's processes."""
    pkg_id = read_package_id(src)
    dest = vfs.drive_path(pkg_id, "pkg")
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted((src / "pkg").rglob("*")):  # with folders such as pkg/ui (the web page)
        if f.is_file() and not f.is_symlink():
            target = dest / f.relative_to(src / "pkg")
            target.parent.mkdir(parents=True, exist_ok=True)
            _install_file(f, target)
    try:
        manifest = json.loads((dest / "manifest.json").read_text())
        scripts_file = dest / "scripts.json"
        scripts = json.loads(scripts_file.read_text()) if scripts_file.exists() else {}
    except ValueError as e:
        raise PackageError(f"{pkg_id}: bad manifest or scripts.json: {e}") from None
    package = Package(pkg_id, manifest, scripts)
    for entry in manifest:
        pid = ProcessId(entry["process_name"], pkg_id.package_name, pkg_id.publisher_node)
        wasm = f"{pkg_id}/pkg/{entry['process_wasm_path'].lstrip('/')}"
        libs = [f"{pkg_id}/pkg/{lib.lstrip('/')}" for lib in entry.get("libraries", [])]
        _grant_from(kernel, pid, entry)
        kernel.start_process(pid, wasm, _caps_for(kernel, pid, entry), bool(entry.get("public")),
                             _on_exit(kernel.node, entry.get("on_exit")), libs)
    log.info("installed %s (%d processes, %d scripts)", pkg_id, len(manifest), len(scripts))
    return package


def terminal_caps(kernel: Kernel) -> set[Capability]:
    """What upstream's terminal holds (kinode/packages/terminal/pkg/manifest.json), as this node has
    it: a messaging cap to each of the node's services, the VFS's root cap and networking. A script
    marked `"root": true` gets them all (terminal/src/lib.rs handle_run)."""
    with kernel.lock:
        services = [ep.address for ep in kernel.processes.values() if ep.trusted]
    caps = {messaging_cap(a) for a in services}
    caps.add(Capability.make(Address(kernel.node, VFS_ID), {"root": True}))
    caps.add(kernel.network_cap())
    return caps


def start_script(kernel: Kernel, package: Package, script: str) -> ProcessId:
    """Start `script` of `package` under a random name; the terminal then sends it its arguments."""
    entry = package.scripts.get(f"{script}.wasm")
    if entry is None:
        raise PackageError(f"package {package.id} has no script {script!r}")
    pid = ProcessId(str(secrets.randbits(64)), package.id.package_name, package.id.publisher_node)
    wasm = f"{package.id}/pkg/{script}.wasm"
    _grant_from(kernel, pid, entry)
    caps = _caps_for(kernel, pid, entry)
    if entry.get("root"):
        caps |= terminal_caps(kernel)
    kernel.start_process(pid, wasm, caps, bool(entry.get("public")), OnExit("none"), script=True)
    return pid
