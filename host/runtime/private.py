"""wasmtime-py's private modules: the one place the host reaches them, checked against the version
they were read for.

The public API lacks what the host needs from three of them: the pooling allocator's settings
(host/runtime/wasm.py), a store's epoch deadline reset from inside a host call (the process ABI,
host/kernel/standard_host.py), and the C layout of component values (host/runtime/fastconv.py).
A wasmtime-py of another major version may have moved them: a warning says so once, at import, and
fastconv refuses to install (the others have no fallback and fail with wasmtime's own error).
"""
from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

from wasmtime import _bindings as bindings
from wasmtime import _ffi as ffi
from wasmtime.component import _func as func
from wasmtime.component import _linker as linker
from wasmtime.component import _types as types
from wasmtime.component._enter import catch_exceptions, enter_wasm

__all__ = ["VERSION", "WRITTEN_FOR", "SUPPORTED", "bindings", "ffi", "func", "linker", "types",
           "catch_exceptions", "enter_wasm", "set_epoch_deadline", "set_pooling"]

log = logging.getLogger("host.runtime.private")

# the wasmtime-py major version whose private modules and C layout the host was written against
WRITTEN_FOR = "50"
VERSION = importlib.metadata.version("wasmtime")
SUPPORTED = VERSION.split(".")[0] == WRITTEN_FOR
if not SUPPORTED:
    log.warning("this host reaches into wasmtime-py %s.x's private modules and this is wasmtime %s: "
                "pin wasmtime==%s.* (pyproject.toml) if processes fail to start", WRITTEN_FOR, VERSION,
                WRITTEN_FOR)


def set_epoch_deadline(store: Any, ticks: int) -> None:
    """Give `store` a fresh compute budget of `ticks` epochs, from inside a host call on it."""
    ffi.wasmtime_context_set_epoch_deadline(store._context(), ticks)


def set_pooling(cfg: Any, limits: dict[str, int]) -> None:
    """Make the engine config `cfg` use the pooling allocator with `limits` (the C API's
    `wasmtime_pooling_allocation_config_<name>_set` names)."""
    pc = ffi.wasmtime_pooling_allocation_config_new()
    try:
        for name, value in limits.items():
            getattr(ffi, f"wasmtime_pooling_allocation_config_{name}_set")(pc, value)
        ffi.wasmtime_pooling_allocation_strategy_set(cfg.ptr(), pc)
    finally:
        ffi.wasmtime_pooling_allocation_config_delete(pc)
