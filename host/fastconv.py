"""Faster value conversion for wasmtime-py's component API (50.x).

Two costs dominate a host import call in stock wasmtime-py:
- `list<u8>` is built one 32-byte `wasmtime_component_val_t` per element in a Python loop (about
  1 MiB/s). Every element has the same layout (a kind byte at a fixed offset, the value in the union
  at another), so the whole array is filled or read with two strided slice copies done in C.
- Type information is fetched again on every call: the function's parameter types, and for each
  record, list, tuple, variant, option and result, its fields or cases, each through several FFI
  calls. A host function's type never changes, so `install()` caches the parameter and result types
  per linked function, and each type object's fields and cases, which the conversions then reuse.
"""
from __future__ import annotations

import ctypes
import functools

from wasmtime import WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import _linker, _types
from wasmtime.component._enter import catch_exceptions

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


def _cached_property(prop: property) -> property:
    """A property whose value is kept on the instance after the first FFI lookup."""
    key = f"_cache_{prop.fget.__name__}"

    @functools.wraps(prop.fget)
    def get(self):
        d = self.__dict__
        if key not in d:
            d[key] = prop.fget(self)
        return d[key]
    return property(get)


def _cached_method(fn):
    key = f"_cache_{fn.__name__}"

    @functools.wraps(fn)
    def method(self):
        d = self.__dict__
        if key not in d:
            d[key] = fn(self)
        return d[key]
    return method


# linked function index -> (param types, result type); each host function has one fixed type
_FUNC_TYPES: dict = {}


@ffi.wasmtime_component_func_callback_t
def _func_impl(idx, context, ty_raw, args, nargs, results, nresults):  # mirrors wasmtime-py's func_impl
    def run(store) -> None:
        types = _FUNC_TYPES.get(idx)
        if types is None:
            with _types.FuncType._from_ptr(ty_raw, owner=store) as fty:
                types = _FUNC_TYPES[idx] = ([ty for _, ty in fty.params], fty.result)
        param_tys, result_ty = types
        func = _linker.FUNCTIONS.get(idx or 0)
        pyargs = [ty.convert_from_c(args[i]) for i, ty in enumerate(param_tys)]
        result = func(store, *pyargs)
        if result_ty is not None:
            result_ty.convert_to_c(store, result, results)
    return catch_exceptions(context, run)


def install() -> None:
    """Patch wasmtime-py; call before any `add_func` (the callback is bound when a func is added)."""
    _types.ListType.convert_to_c = _to_c
    _types.ListType.convert_from_c = _from_c
    for cls, names in ((_types.ListType, ["element"]), (_types.RecordType, ["fields"]),
                       (_types.TupleType, ["elements"]), (_types.VariantType, ["cases"]),
                       (_types.OptionType, ["payload"]), (_types.ResultType, ["ok", "err"]),
                       (_types.EnumType, ["names"])):
        for name in names:
            setattr(cls, name, _cached_property(getattr(cls, name)))
    for cls in (_types.VariantType, _types.OptionType, _types.ResultType):
        cls._cases = _cached_method(cls._cases)
        cls._tagged = _cached_method(cls._tagged)
    _linker.func_impl = _func_impl
