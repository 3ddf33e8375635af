"""Wasm loading: one Engine and Linker for the node, compiled components cached on disk, and
host-side linking of library components (an importer's interface satisfied by a library's export).

Compiling a component takes seconds, loading it from the cache milliseconds: the cache (keyed by the
wasm's BLAKE3, the wasmtime version and our engine settings) makes a warm start fast. `build.sh`
fills it ahead of time with `python -m host.runtime.wasm PATH...`.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from wasmtime import Config, Engine, WasmtimeError
from wasmtime.component import Component, ComponentInstanceType, FuncType, Linker

from host import fsutil
from host.runtime import private
from host.settings import RuntimeSettings, SettingsError, runtime_from_environment

log = logging.getLogger("host.runtime.wasm")

# The interfaces the host itself supplies; anything else a component imports must come from a
# library component linked into its package.
STANDARD = "kinode:process/standard@0.8.0"
BLOBS = "kinode-py:host-ext/blobs@0.1.0"
HOST_INTERFACES = {STANDARD, BLOBS}
EPOCH_TICK = 0.1  # seconds per epoch tick; a guest's compute budget is counted in ticks

# Pooling instance allocator, opt-in (KINODE_POOLING=1). A worker per transfer means many short-lived
# instances; with the default allocator each maps fresh memory and copy-on-write faults in every page
# its Python touches, while a pooled slot stays mapped and is reset in place. It speeds up many small
# downloads but keeps each used slot's memory and slows bursts of parallel ones (figures:
# docs/BENCHMARKS.md), so it is off by default. Its totals are hard caps; the kernel applies
# --max-processes either way.
POOL_TABLE_ELEMENTS = 100_000      # CPython's function table has tens of thousands of entries
POOL_MAX_MEMORY = 1 << 30          # a process's linear memory may grow to 1 GiB
POOL_KEEP_RESIDENT = 32 << 20
POOL_WARM_SLOTS = 16


def _use_pooling(cfg: Config, instances: int) -> None:
    private.set_pooling(cfg, {
        "total_component_instances": instances, "total_core_instances": instances * 16,
        "max_core_instances_per_component": 32, "max_memories_per_component": 8,
        "max_tables_per_component": 32, "total_memories": instances * 2, "total_tables": instances * 16,
        "table_elements": POOL_TABLE_ELEMENTS, "max_memory_size": POOL_MAX_MEMORY,
        "max_core_instance_size": 4 << 20, "max_component_instance_size": 4 << 20,
        "linear_memory_keep_resident": POOL_KEEP_RESIDENT, "table_keep_resident": 1 << 20,
        "max_unused_warm_slots": POOL_WARM_SLOTS, "total_stacks": 0})


# compiled artefacts depend on the wasmtime version and the engine settings
_ENGINE_TAG = f"wasmtime{private.VERSION}-epoch"


def install_fastconv(enabled: bool) -> bool:
    """Use host/runtime/fastconv.py's value conversion unless turned off or unusable here (then wasmtime-py's
    own, slower conversion stays, with the reason logged). True if fastconv is in use."""
    if not enabled:
        log.info("fastconv is off: wasmtime-py's own value conversion is used")
        return False
    try:
        from host.runtime import fastconv
    except Exception as e:  # it reads wasmtime-py's private modules: a new wasmtime may lack them
        log.warning("fastconv cannot load on wasmtime %s (%s: %s); using wasmtime-py's own value "
                    "conversion, which is slower", private.VERSION, type(e).__name__, e)
        return False
    return fastconv.install()


@dataclass
class LoadedComponent:
    component: Component
    digest: str
    imports: set[str]
    # exported interface name -> {function name: export index path}; only for libraries
    exports: dict[str, list[str]] = field(default_factory=dict)

    @property
    def needs(self) -> set[str]:
        """Non-WASI, non-host interfaces this component imports."""
        return {i for i in self.imports if not i.startswith("wasi:") and i not in HOST_INTERFACES}


class MissingInterface(Exception):
    pass


class Runtime:
    """The node's Engine, Linker and component cache."""

    def __init__(self, settings: RuntimeSettings):
        self.fastconv = install_fastconv(settings.fastconv)  # before any host function is defined
        cfg = Config()
        cfg.epoch_interruption = True
        self.max_instances = settings.max_instances
        if settings.pooling:  # see above
            _use_pooling(cfg, settings.max_instances)
        self.engine = Engine(cfg)
        self.linker = Linker(self.engine)
        self.linker.add_wasip2()
        self.cache_dir = settings.cache_dir
        self.cache_max_bytes = settings.cache_max_bytes
        self._loaded: dict[str, LoadedComponent] = {}
        self._lock = threading.RLock()
        self._forwarded: set[str] = set()
        self._forward: Callable[[str, str], Callable] | None = None  # set with the process ABI
        self._ticker = threading.Thread(target=self._tick, name="epoch-ticker", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while True:
            time.sleep(EPOCH_TICK)
            self.engine.increment_epoch()

    # ---- host imports ------------------------------------------------------------------------
    def define(self, interface: str, funcs: dict[str, Callable]) -> None:
        with self._lock:
            with self.linker.root() as root:
                with root.add_instance(interface) as inst:
                    for name, fn in funcs.items():
                        inst.add_func(name, fn)

    def install_abi(self, imports: dict[str, dict[str, Callable]],
                    forward: Callable[[str, str], Callable]) -> None:
        """Define the process ABI's host imports; `forward(iface, func)` builds the host function
        that calls into the current process's instance of a library (see define_forwarders)."""
        for interface, funcs in imports.items():
            self.define(interface, funcs)
        self._forward = forward

    def require_abi(self) -> None:
        """Raise ValueError unless the process ABI was installed: no process can start without it."""
        if self._forward is None:
            raise ValueError("the process ABI is not installed in this runtime "
                             "(host/kernel/standard_host.py install_imports)")

    def define_forwarders(self, lib: LoadedComponent) -> None:
        """Make every interface `lib` exports importable through the ABI's forwarder."""
        self.require_abi()
        forward = self._forward
        assert forward is not None
        for iface, names in lib.exports.items():
            with self._lock:
                if iface in self._forwarded:
                    continue
                self.define(iface, {n: forward(iface, n) for n in names})
                self._forwarded.add(iface)

    def instantiate(self, store, component: Component):
        with self._lock:  # never while another thread is adding definitions
            return self.linker.instantiate(store, component)

    # ---- loading -----------------------------------------------------------------------------
    def _cache_path(self, digest: str) -> Path:
        return self.cache_dir / f"{digest[:32]}-{_ENGINE_TAG}.cwasm"

    def load(self, wasm: bytes) -> LoadedComponent:
        digest = blake3.blake3(wasm, max_threads=blake3.blake3.AUTO).hexdigest()
        with self._lock:
            hit = self._loaded.get(digest)
        if hit:
            return hit
        path = self._cache_path(digest)
        component = None
        if path.exists():
            try:
                component = Component.deserialize_file(self.engine, str(path))
                _touch(path)  # recently used: the last to be pruned
            except WasmtimeError as e:  # also when another node pruned it a moment ago
                log.warning("compiled cache entry %s unusable (%s); recompiling", path.name, e)
        if component is None:
            t0 = time.perf_counter()
            component = Component(self.engine, wasm)
            log.info("compiled a %.1f MB component in %.1f s", len(wasm) / 1e6, time.perf_counter() - t0)
            self._store_cache(path, component)
        loaded = self._describe(component, digest)
        with self._lock:
            self._loaded[digest] = loaded
        return loaded

    def load_file(self, path: Path) -> LoadedComponent:
        return self.load(Path(path).read_bytes())

    def _store_cache(self, path: Path, component: Component) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fsutil.write_atomic(path, component.serialize())  # concurrent nodes never see half of one
        except OSError as e:
            log.warning("could not write compiled cache %s: %s", path, e)
        self._prune_cache(keep=path)

    def _prune_cache(self, keep: Path) -> None:
        """Delete the least recently used compiled components beyond the cache's size cap: every
        build compiles new ones (tens of MB each), and the old ones would pile up without end."""
        entries = []
        for p in self.cache_dir.glob("*.cwasm"):
            try:
                st = p.stat()
            except OSError:  # pruned by another node meanwhile
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = 0
        for _, size, p in sorted(entries, key=lambda e: e[0], reverse=True):
            total += size
            if total > self.cache_max_bytes and p != keep:
                try:
                    p.unlink()  # a node that has it mapped keeps its pages
                    log.debug("pruned compiled cache entry %s", p.name)
                except OSError:
                    pass

    def _describe(self, component: Component, digest: str) -> LoadedComponent:
        ty = component.type
        imports = set(ty.imports(self.engine))
        exports: dict[str, list[str]] = {}
        for name, ext in ty.exports(self.engine).items():
            item = ext.ty
            if isinstance(item, ComponentInstanceType) and ":" in name:  # interfaces, not internals
                exports[name] = [f for f, fx in item.exports(self.engine).items() if isinstance(fx.ty, FuncType)]
        return LoadedComponent(component, digest, imports, exports)

    def check_links(self, comp: LoadedComponent, libs: list[LoadedComponent], what: str,
                    absent: Sequence[str] = ()) -> None:
        provided = set().union(*(set(lib.exports) for lib in libs)) if libs else set()
        missing = sorted(comp.needs - provided)
        if missing:
            hint = (f"; its library {', '.join(absent)} is missing from the package" if absent else
                    " (add the library's wasm to the package and to the process's \"libraries\" in manifest.json)")
            raise MissingInterface(f"{what} imports {', '.join(missing)}, which no library linked into its "
                                   f"package exports{hint}")


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    """`python -m host.runtime.wasm FILE...`: compile components into the cache ahead of time."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rt = Runtime(runtime_from_environment())
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in argv:
        t0 = time.perf_counter()
        rt.load_file(Path(p))
        print(f"cached {p} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
