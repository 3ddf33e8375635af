"""Bulk `list<u8>` conversion for wasmtime-py's component API.

wasmtime-py builds one 32-byte `wasmtime_component_val_t` per list element in a Python loop, which
moves about 1 MiB/s. Every element of a `list<u8>` has the same layout (a kind byte at a fixed offset,
the value in the union at another), so the whole array can be filled or read with two strided slice
copies that CPython performs in C. `install()` swaps the two conversion methods of `ListType`; other
list types keep the stock path.
"""
from __future__ import annotations

import ctypes

from wasmtime import WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import _types

_VAL = ffi.wasmtime_component_val_t
_STRIDE = ctypes.sizeof(_VAL)
_KIND_AT = _VAL.kind.offset
_VALUE_AT = _VAL.of.offset + ffi.wasmtime_component_valunion.u8.offset
_U8 = ffi.WASMTIME_COMPONENT_U8.value

# wasmtime charges each list element against a per-call hostcall budget; above about 2.7 MB a
# guest->host list fails with "fuel allocated for hostcalls has been exhausted". Refuse well below.
MAX_LIST_BYTES = 2 * 1024 * 1024

_stock_to_c = _types.ListType.convert_to_c
_stock_from_c = _types.ListType.convert_from_c


def _is_u8_list(ty: _types.ListType) -> bool:
    cached = ty.__dict__.get("_fast_u8")
    if cached is None:
        cached = ty.__dict__["_fast_u8"] = bool(ty._is_bytes())
    return cached


def _to_c(self, store, val, ptr):
    if not _is_u8_list(self):
        return _stock_to_c(self, store, val, ptr)
    if not isinstance(val, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes for list<u8>, got {type(val).__name__}")
    n = len(val)
    if n > MAX_LIST_BYTES:
        raise WasmtimeError(
            f"list<u8> of {n} bytes is over this host's {MAX_LIST_BYTES}-byte per-call limit; "
            "use the kinode:process/blobs interface for large blobs")
    raw = ffi.wasmtime_component_vallist_t()
    ffi.wasmtime_component_vallist_new_uninit(raw, n)
    if n:
        addr = ctypes.cast(raw.data, ctypes.c_void_p).value
        view = memoryview((ctypes.c_ubyte * (n * _STRIDE)).from_address(addr)).cast("B")
        view[_KIND_AT::_STRIDE] = bytes((_U8,)) * n
        view[_VALUE_AT::_STRIDE] = val
    ptr.contents.kind = ffi.WASMTIME_COMPONENT_LIST
    ptr.contents.of.list = raw


def _from_c(self, c):
    if not _is_u8_list(self):
        return _stock_from_c(self, c)
    try:
        n = c.of.list.size
        if n == 0:
            return b""
        addr = ctypes.cast(c.of.list.data, ctypes.c_void_p).value
        return ctypes.string_at(addr + _VALUE_AT, (n - 1) * _STRIDE + 1)[::_STRIDE]
    finally:
        ffi.wasmtime_component_vallist_delete(ctypes.byref(c.of.list))


def install() -> None:
    _types.ListType.convert_to_c = _to_c
    _types.ListType.convert_from_c = _from_c
