"""Faster value conversion for wasmtime-py's component API, written for wasmtime-py 50.x.

wasmtime-py converts each component value between Python and wasmtime's C form
(`wasmtime_component_val_t`) node by node through ctypes: a foreign call and a ctypes object per
string, field name and list element. This module compiles a converter once per type instead, with
the same Python-visible behaviour (same accepted values, results and exception types):

- Lifting (C to Python) reads wasmtime's memory directly through `MEM`, a memoryview spanning the
  address space, then frees the whole value with one `wasmtime_component_val_delete`.
- Lowering (Python to C) writes the value into a per-thread arena laid out exactly as
  `wasmtime_component_val_t`, with names pre-encoded, and has wasmtime deep-copy it with one
  `wasmtime_component_val_clone`. A big `list<u8>` is "grafted": allocated in place in the copy
  rather than copied twice. Each `list<u8>` is filled and read with strided slice copies.
- Type information, and each host and guest function's converters, are fetched once and cached.
- Types it does not model (resources, futures, streams, error contexts) keep wasmtime-py's own
  conversion; it frees what stock wasmtime-py leaks (payload cells lifted from inside containers).
- `install()` also rebinds the quick wasmtime C functions (constructors, accessors, type queries)
  to keep the GIL: under load, ctypes' release around each tiny call costs a futex hand-off. Calls
  that run a guest, compile or instantiate still release it.

Nothing changes until the runtime calls `install()` (host/runtime/wasm.py), which refuses, leaving
wasmtime-py as it is, on a wasmtime version this module was not written for.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import re
import struct
import sys
import threading
from collections.abc import Callable
from ctypes import addressof
from typing import Any

from wasmtime import WasmtimeError

from host.runtime import private
from host.runtime.private import bindings as _bindings
from host.runtime.private import catch_exceptions, enter_wasm, ffi
from host.runtime.private import func as _func
from host.runtime.private import linker as _linker
from host.runtime.private import types as _types

Record, Variant = _types.Record, _types.Variant

log = logging.getLogger("host.runtime.fastconv")

# the wasmtime-py major version whose private modules and C layout this module was written against
WRITTEN_FOR = private.WRITTEN_FOR

# wasmtime charges each list element against a per-call hostcall budget; above about 2.7 MB a
# guest->host list fails with "fuel allocated for hostcalls has been exhausted". Refuse well below.
MAX_LIST_BYTES = 2 * 1024 * 1024

# Every byte of the process, addressable by its address: reads and writes of wasmtime's values and
# of the arena without creating a ctypes object per access.
MEM = memoryview((ctypes.c_ubyte * sys.maxsize).from_address(0)).cast("B")

# ---- layout of wasmtime_component_val_t, from wasmtime-py's ctypes definitions ----------------
_VAL = ffi.wasmtime_component_val_t
_STRIDE = ctypes.sizeof(_VAL)                                   # one val; also a list/tuple element


def _offset(struct_type, field: str) -> int:
    return getattr(struct_type, field).offset


_OF = _offset(_VAL, "of")                                       # the payload union
_ENTRY = ctypes.sizeof(ffi.wasmtime_component_valrecord_entry_t)  # a record field: name, then val
_ENTRY_VAL = _offset(ffi.wasmtime_component_valrecord_entry_t, "val")
_NAME = ctypes.sizeof(ffi.wasm_byte_vec_t)                      # (size, data): strings and names
_VEC_DATA = _OF + _offset(ffi.wasmtime_component_vallist, "data")  # data pointer of a list/record/...
_OPTION_PTR = _OF
_RESULT_PTR = _OF + _offset(ffi.wasmtime_component_valresult, "val")
_VARIANT_PTR = _OF + _offset(ffi.wasmtime_component_valvariant, "val")
if (_OF, _VEC_DATA, _RESULT_PTR, _VARIANT_PTR, _NAME) != (8, 16, 16, 24, 16):
    raise ImportError("unexpected wasmtime_component_val_t layout")  # the struct formats below

_BOOL, _S8, _U8, _S16, _U16, _S32, _U32, _S64, _U64, _F32, _F64, _CHAR, _STRING, _LIST, _RECORD, \
    _TUPLE, _VARIANT, _ENUM, _OPTION, _RESULT, _FLAGS = (getattr(ffi, f"WASMTIME_COMPONENT_{k}").value for k in (
        "BOOL", "S8", "U8", "S16", "U16", "S32", "U32", "S64", "U64", "F32", "F64", "CHAR", "STRING", "LIST",
        "RECORD", "TUPLE", "VARIANT", "ENUM", "OPTION", "RESULT", "FLAGS"))

_VEC = struct.Struct("=B7xQQ")      # kind, (size, data): string, enum, list, record, tuple, flags
_PTR = struct.Struct("=B7xQ")       # kind, heap cell: option
_RES = struct.Struct("=B7x?7xQ")    # kind, is_ok, heap cell: result
_VAR = struct.Struct("=B7xQQQ")     # kind, discriminant (size, data), heap cell: variant
_PAIR = struct.Struct("=QQ")        # (size, data) of a string or name
_Q = struct.Struct("=Q")
_CLEARED = bytes(16)                # Bool(false): what a freed value is left as
# where a bytes object's contents start, from its address (`id`): a lowered string points into its
# encoded bytes rather than into a copy
_BYTES_DATA = bytes.__basicsize__ - 1
_probe = b"probe"
if ctypes.cast(ctypes.c_char_p(_probe), ctypes.c_void_p).value != id(_probe) + _BYTES_DATA:
    raise ImportError("unexpected bytes object layout")
del _probe

_C = ctypes.PyDLL(ffi.dll._name, handle=ffi.dll._handle)     # these keep the GIL: all are quick


def _c_fn(name: str, *argtypes):
    fn = _C[name]  # a private function object: `_keep_gil_for_quick_calls` retypes the shared ones
    fn.restype, fn.argtypes = None, list(argtypes)
    return fn


_clone = _c_fn("wasmtime_component_val_clone", ctypes.c_void_p, ctypes.c_void_p)
_delete = _c_fn("wasmtime_component_val_delete", ctypes.c_void_p)
_new_list = _c_fn("wasmtime_component_vallist_new_uninit", ctypes.c_void_p, ctypes.c_size_t)


# ---- the arena ----------------------------------------------------------------------------------
_CHUNK = 1 << 16
# a list<u8> this long is grafted rather than copied (measured: shorter ones gain nothing, a 2 MiB
# one lowers in half the time, and without a second 64 MiB array)
_GRAFT_MIN = 32768


class _Arena:
    """Scratch memory for lowering one value: bump-allocated, 8-byte aligned, reused per thread."""

    __slots__ = ("busy", "chunk", "end", "extra", "held", "off", "patches", "start")

    def __init__(self) -> None:
        self.chunk = (ctypes.c_ubyte * _CHUNK)()
        self.start = self.off = addressof(self.chunk)
        self.end = self.start + _CHUNK
        self.extra: list = []
        self.held: list = []        # encoded strings the arena's values point into
        self.patches: dict = {}     # arena address of a placeholder list<u8> -> its bytes
        self.busy = False

    def grow(self, size: int) -> int:
        """Room for `size` bytes that did not fit: a new chunk, kept until `release`."""
        chunk = (ctypes.c_ubyte * max(size, _CHUNK))()
        self.extra.append(chunk)
        p = addressof(chunk)
        self.off, self.end = p + size, p + len(chunk)
        return p

    def release(self) -> None:
        self.off, self.end = self.start, self.start + _CHUNK
        if self.extra:
            self.extra.clear()
        self.held.clear()
        if self.patches:
            self.patches.clear()
        self.busy = False


_tls = threading.local()


def _arena() -> _Arena:
    a = getattr(_tls, "arena", None)
    if a is None:
        a = _tls.arena = _Arena()
    elif a.busy:  # lowering re-entered on this thread (a getattr calling into Wasm): a private one
        a = _Arena()
    a.busy = True
    return a


def _reserve(a: _Arena, size: int) -> int:
    p = a.off
    if p + size > a.end:
        return a.grow(size)
    a.off = p + size
    return p


def _hold(a: _Arena, b: bytes) -> int:
    """The address of `b`'s contents, kept alive until the arena is released."""
    a.held.append(b)
    return id(b) + _BYTES_DATA


class _Names:
    """Encoded names at fixed addresses, for field names, variant cases and enum cases. Lowered
    values point at them, so they are never freed: `_names` keeps one per distinct list of names."""

    def __init__(self, names: tuple[str, ...]):
        encoded = [n.encode() for n in names]
        self._buf = ctypes.create_string_buffer(b"".join(encoded) or b"\0")
        base = addressof(self._buf)
        self.vecs = []          # (size, data) per name
        self.by_bytes = {}      # encoded name -> (index, name)
        for i, (n, b) in enumerate(zip(names, encoded)):
            self.vecs.append((len(b), base))
            self.by_bytes[b] = (i, n)
            base += len(b)


_NAMES: dict = {}


def _names(names: tuple[str, ...]) -> _Names:
    found = _NAMES.get(names)
    if found is None:  # setdefault: of two threads compiling at once, both use the one kept
        found = _NAMES.setdefault(names, _Names(names))
    return found


# ---- converters ---------------------------------------------------------------------------------
class _Conv:
    """How to convert one type. Modelled types have `lower(val, at, arena)`, which writes `val` as a
    wasmtime_component_val_t at arena address `at`, and `lift(at)`, which reads one without freeing
    it. `to_c(store, val, dst)` and `from_c(src)` convert at a caller-owned address, with stock
    ownership: `dst` receives a value owned by wasmtime's allocator, `src`'s value is freed."""

    __slots__ = ("from_c", "lift", "lower", "to_c")

    def __init__(self, lower, lift, owns_memory: bool = True, stock=None):
        self.lower, self.lift = lower, lift
        if stock is not None:
            self.to_c, self.from_c = stock
        elif owns_memory:
            self.to_c, self.from_c = _top_to_c(lower), _top_from_c(lift)
        else:  # a scalar: written straight into place, nothing to copy or free
            self.to_c = lambda store, val, dst: lower(val, dst, None)
            self.from_c = lift


def _top_to_c(lower):
    def to_c(store, val, dst):
        a = _arena()
        try:
            root = _reserve(a, _STRIDE)
            lower(val, root, a)
            _clone(root, dst)
            if a.patches:
                try:
                    _graft(root, dst, a.patches)
                except BaseException:
                    _delete(dst)
                    MEM[dst:dst + 16] = _CLEARED
                    raise
        finally:
            a.release()
    return to_c


def _top_from_c(lift):
    def from_c(src):
        try:
            return lift(src)
        finally:
            _delete(src)
            MEM[src:src + 16] = _CLEARED  # whoever owns `src` may still drop it
    return from_c


_CELL_AT = {_OPTION: _OPTION_PTR, _RESULT: _RESULT_PTR, _VARIANT: _VARIANT_PTR}


def _graft(a: int, c: int, patches: dict) -> None:
    """Allocate each placeholder list<u8> of the arena value at `a` in place in its copy at `c`."""
    data = patches.pop(a, None)
    if data is not None:
        _new_list(c + _OF, len(data))  # the copy's placeholder is empty: it owns nothing to free
        _write_u8s(_Q.unpack_from(MEM, c + _VEC_DATA)[0], data)
        return
    kind = MEM[a]
    if kind in (_LIST, _TUPLE, _RECORD):
        n, pa = _PAIR.unpack_from(MEM, a + _OF)
        if kind == _LIST and n and MEM[pa] == _U8:
            return  # a small list<u8>: nothing inside
        pc = _Q.unpack_from(MEM, c + _VEC_DATA)[0]
        step, at = (_ENTRY, _ENTRY_VAL) if kind == _RECORD else (_STRIDE, 0)
        for off in range(at, n * step, step):
            _graft(pa + off, pc + off, patches)
            if not patches:
                return
    elif kind in _CELL_AT:
        at = _CELL_AT[kind]
        pa = _Q.unpack_from(MEM, a + at)[0]
        if pa:
            _graft(pa, _Q.unpack_from(MEM, c + at)[0], patches)


def _scalar(kind: int, code: str, check, message: str, convert=None) -> _Conv:
    read = struct.Struct("=" + code).unpack_from
    if code in "bBhHiIqQ":  # ctypes' integer fields wrap out-of-range values; so does this
        convert = ((1 << (8 * struct.calcsize(code))) - 1).__and__
        code = code.upper()
    pack = struct.Struct("=B7x" + code).pack_into

    def lower(val, at, a):
        if not check(val):
            raise TypeError(message)
        pack(MEM, at, kind, convert(val) if convert else val)

    def lift(at):
        return read(MEM, at + _OF)[0]
    return _Conv(lower, lift, owns_memory=False)


def _is_int(v):
    return isinstance(v, int)


def _is_float(v):
    return isinstance(v, float)


def _char() -> _Conv:
    pack = struct.Struct("=B7xI").pack_into
    read = struct.Struct("=I").unpack_from

    def lower(val, at, a):
        if not isinstance(val, str) or len(val) != 1:
            raise TypeError("expected single-character string for Char type")
        pack(MEM, at, _CHAR, ord(val))

    def lift(at):
        return chr(read(MEM, at + _OF)[0])
    return _Conv(lower, lift, owns_memory=False)


def _string() -> _Conv:
    pack = _VEC.pack_into
    read = _PAIR.unpack_from

    def lower(val, at, a):
        if not isinstance(val, str):
            raise TypeError("expected string type")
        b = val.encode()
        a.held.append(b)
        pack(MEM, at, _STRING, len(b), id(b) + _BYTES_DATA)

    def lift(at):
        n, p = read(MEM, at + _OF)
        return MEM[p:p + n].tobytes().decode() if n else ""
    return _Conv(lower, lift)


_PRIMITIVES = {
    _types.Bool: _scalar(_BOOL, "?", lambda v: isinstance(v, bool), "expected bool for Bool type"),
    _types.S8: _scalar(_S8, "b", _is_int, "expected int for S8 type"),
    _types.U8: _scalar(_U8, "B", _is_int, "expected int for U8 type"),
    _types.S16: _scalar(_S16, "h", _is_int, "expected int for S16 type"),
    _types.U16: _scalar(_U16, "H", _is_int, "expected int for U16 type"),
    _types.S32: _scalar(_S32, "i", _is_int, "expected int for S32 type"),
    _types.U32: _scalar(_U32, "I", _is_int, "expected int for U32 type"),
    _types.S64: _scalar(_S64, "q", _is_int, "expected int for S64 type"),
    _types.U64: _scalar(_U64, "Q", _is_int, "expected int for U64 type"),
    # ctypes rounds to single precision and overflows to infinity; struct would raise instead
    _types.F32: _scalar(_F32, "f", _is_float, "expected float for F32 type", lambda v: ctypes.c_float(v).value),
    _types.F64: _scalar(_F64, "d", _is_float, "expected float for F64 type"),
    _types.Char: _char(),
    _types.String: _string(),
}


def _list(ty: _types.ListType) -> _Conv | None:
    if isinstance(ty.element, _types.U8):
        return _bytes_list()
    elem = _conv(ty.element)
    if elem.lower is None:
        return None
    elower, elift = elem.lower, elem.lift
    pack = _VEC.pack_into
    read = _PAIR.unpack_from

    def lower(val, at, a):
        if not isinstance(val, list):
            raise TypeError("expected list value")
        n = len(val)
        p = _reserve(a, n * _STRIDE)
        for e_at, e in zip(range(p, p + n * _STRIDE, _STRIDE), val):
            elower(e, e_at, a)
        if len(val) != n:  # shrunk by a side effect: slots left unwritten
            raise RuntimeError("list changed size during conversion")
        pack(MEM, at, _LIST, n, p)

    def lift(at):
        n, p = read(MEM, at + _OF)
        return [elift(e_at) for e_at in range(p, p + n * _STRIDE, _STRIDE)]
    return _Conv(lower, lift)


# list<u8> elements are converted this many at a time: a bytearray's strided slice copy is several
# times faster than a memoryview's, and a bounded step keeps a 2 MiB list from doubling in memory
_SPAN = 2048
_U8_RUN = memoryview((bytes((_U8,)) + bytes(_STRIDE - 1)) * _SPAN)  # u8 vals holding 0


def _write_u8s(p: int, data) -> None:
    """Write `data` as list<u8> elements at `p`."""
    n = len(data)
    if n > _SPAN:
        for i in range(0, n, _SPAN):
            _write_u8s(p + i * _STRIDE, data[i:i + _SPAN])
        return
    run = bytearray(_U8_RUN[:n * _STRIDE])
    run[_OF::_STRIDE] = data
    MEM[p:p + n * _STRIDE] = run


def _read_u8s(p: int, n: int) -> bytes:
    """The bytes of the `n` list<u8> elements at `p`."""
    if n <= _SPAN:
        return MEM[p + _OF:p + n * _STRIDE].tobytes()[::_STRIDE]
    return b"".join(_read_u8s(p + i * _STRIDE, min(_SPAN, n - i)) for i in range(0, n, _SPAN))


def _bytes_list() -> _Conv:
    pack = _VEC.pack_into
    read = _PAIR.unpack_from

    def lower(val, at, a):
        if not isinstance(val, (bytes, bytearray, memoryview)):
            raise TypeError(f"expected bytes for list<u8>, got {type(val).__name__}")
        n = len(val)
        if n > MAX_LIST_BYTES:
            raise WasmtimeError(
                f"list<u8> of {n} bytes is over this host's {MAX_LIST_BYTES}-byte per-call limit; "
                "use the kinode-py:host-ext/blobs interface for large blobs")
        if n >= _GRAFT_MIN:
            a.patches[at] = val
            pack(MEM, at, _LIST, 0, at)
            return
        p = _reserve(a, n * _STRIDE)
        _write_u8s(p, val)
        pack(MEM, at, _LIST, n, p)

    def lift(at):
        n, p = read(MEM, at + _OF)
        return _read_u8s(p, n) if n else b""
    return _Conv(lower, lift)


def _record(ty: _types.RecordType) -> _Conv | None:
    fields = ty.fields
    convs = [_conv(t) for _, t in fields]
    if any(c.lower is None for c in convs):
        return None
    names = [n for n, _ in fields]
    labels = _names(tuple(names))
    n = len(fields)
    size = n * _ENTRY
    # the field names in place, vals to be written over the zeros
    template = b"".join(_PAIR.pack(*v) + bytes(_STRIDE) for v in labels.vecs)
    lowers = [(name, c.lower, i * _ENTRY + _ENTRY_VAL) for i, (name, c) in enumerate(zip(names, convs))]
    lifts = [(name, c.lift, i * _ENTRY + _ENTRY_VAL) for i, (name, c) in enumerate(zip(names, convs))]
    pack = _VEC.pack_into
    read = _Q.unpack_from

    def lower(val, at, a):
        p = _reserve(a, size)
        MEM[p:p + size] = template
        for name, flower, off in lowers:
            flower(getattr(val, name), p + off, a)
        pack(MEM, at, _RECORD, n, p)

    def lift(at):
        p = read(MEM, at + _VEC_DATA)[0]
        r = Record()
        d = r.__dict__
        for name, flift, off in lifts:
            d[name] = flift(p + off)
        return r
    return _Conv(lower, lift)


def _tuple(ty: _types.TupleType) -> _Conv | None:
    convs = [_conv(t) for t in ty.elements]
    if any(c.lower is None for c in convs):
        return None
    n = len(convs)
    size = n * _STRIDE
    lowers = [c.lower for c in convs]
    lifts = [(c.lift, i * _STRIDE) for i, c in enumerate(convs)]
    pack = _VEC.pack_into
    read = _Q.unpack_from

    def lower(val, at, a):
        if not isinstance(val, tuple):
            raise TypeError("expected tuple type")
        if len(val) != n:
            raise TypeError("tuple length mismatch")
        p = _reserve(a, size)
        for elower, e_at, e in zip(lowers, range(p, p + size, _STRIDE), val):
            elower(e, e_at, a)
        pack(MEM, at, _TUPLE, n, p)

    def lift(at):
        p = read(MEM, at + _VEC_DATA)[0]
        return tuple([elift(p + off) for elift, off in lifts])
    return _Conv(lower, lift)


class _Labels:
    """An enum's or flags' case names, to their encoded (size, data) and back; a name that is not a
    case still converts (wasmtime rejects it, as with stock conversion)."""

    def __init__(self, names: list[str]):
        encoded = _names(tuple(names))
        self.known = dict(zip(names, encoded.vecs))
        self.by_bytes = {b: name for b, (_, name) in encoded.by_bytes.items()}

    def vec(self, name: str, arena) -> tuple:
        vec = self.known.get(name)
        if vec is None:
            b = name.encode()
            vec = (len(b), _hold(arena, b))
        return vec

    def name(self, size: int, data: int) -> str:
        b = MEM[data:data + size].tobytes()
        name = self.by_bytes.get(b)
        return b.decode() if name is None else name


def _enum(ty: _types.EnumType) -> _Conv:
    labels = _Labels(ty.names)
    pack = _VEC.pack_into
    read = _PAIR.unpack_from

    def lower(val, at, a):
        if not isinstance(val, str):
            raise TypeError("expected str type")
        pack(MEM, at, _ENUM, *labels.vec(val, a))

    def lift(at):
        return labels.name(*read(MEM, at + _OF))
    return _Conv(lower, lift)


def _flags(ty: _types.FlagsType) -> _Conv:
    labels = _Labels(ty.names)
    pack = _VEC.pack_into
    pack_name = _PAIR.pack_into
    read = _PAIR.unpack_from

    def lower(val, at, a):
        if not isinstance(val, set):
            raise TypeError("expected set type for Flags type")
        for s in val:
            if not isinstance(s, str):
                raise TypeError("expected set of strings for Flags type")
        p = _reserve(a, len(val) * _NAME)
        for s_at, s in zip(range(p, p + len(val) * _NAME, _NAME), val):
            pack_name(MEM, s_at, *labels.vec(s, a))
        pack(MEM, at, _FLAGS, len(val), p)

    def lift(at):
        n, p = read(MEM, at + _OF)
        return {labels.name(*read(MEM, s_at)) for s_at in range(p, p + n * _NAME, _NAME)}
    return _Conv(lower, lift)


def _variant_like(ty) -> _Conv | None:
    """variant, option and result: choose the case (by tag, or by the value's Python class when the
    cases' classes are disjoint, as `VariantLikeType._tagged` decides) and box its payload."""
    cases = ty._cases()
    convs = [None if t is None else _conv(t) for _, t in cases]
    if any(c is not None and c.lower is None for c in convs):
        return None
    names = [n for n, _ in cases]
    tagged = ty._tagged()
    lowers = [None if c is None else c.lower for c in convs]
    lifts = [None if c is None else c.lift for c in convs]

    if tagged:
        index = {n: i for i, n in enumerate(names)}

        def pick(val):
            if not isinstance(val, Variant):
                raise TypeError("expected Variant type")
            try:
                return index[val.tag], val.payload
            except (KeyError, TypeError):
                raise ValueError("value not valid for this variant") from None
    else:
        tests = []
        for i, (_, t) in enumerate(cases):
            classes: set = set()
            if t is not None:
                t.add_classes(classes)
            tests.append((i, tuple(classes) if t is not None else None))

        def pick(val):
            for i, classes in tests:
                if classes is None:
                    if val is None:
                        return i, None
                elif isinstance(val, classes):
                    return i, val
            raise ValueError("value not valid for this variant")

    def box(val, a):
        """The chosen case and the arena address of its payload's cell (0 for none)."""
        i, payload = pick(val)
        plower = lowers[i]
        if plower is None:
            return i, 0
        p = _reserve(a, _STRIDE)
        plower(payload, p, a)
        return i, p

    def unbox(i, p):
        plift = lifts[i]
        if plift is None:
            return Variant(names[i]) if tagged else None
        payload = plift(p)
        return Variant(names[i], payload) if tagged else payload

    read = _Q.unpack_from
    if isinstance(ty, _types.OptionType):
        pack = _PTR.pack_into

        def lower(val, at, a):
            pack(MEM, at, _OPTION, box(val, a)[1])

        def lift(at):
            p = read(MEM, at + _OPTION_PTR)[0]
            return unbox(1 if p else 0, p)
    elif isinstance(ty, _types.ResultType):
        pack = _RES.pack_into

        def lower(val, at, a):
            i, p = box(val, a)
            pack(MEM, at, _RESULT, i == 0, p)

        def lift(at):
            return unbox(0 if MEM[at + _OF] else 1, read(MEM, at + _RESULT_PTR)[0])
    else:
        labels = _names(tuple(names))
        by_bytes = labels.by_bytes
        pack = _VAR.pack_into
        read_tag = _PAIR.unpack_from

        def lower(val, at, a):
            i, p = box(val, a)
            pack(MEM, at, _VARIANT, *labels.vecs[i], p)

        def lift(at):
            n, data = read_tag(MEM, at + _OF)
            tag = MEM[data:data + n].tobytes()
            case = by_bytes.get(tag)
            if case is None:
                raise ValueError(f"tag {tag.decode()} not found in variant cases")
            return unbox(case[0], read(MEM, at + _VARIANT_PTR)[0])
    return _Conv(lower, lift)


_COMPILERS: dict[type[_types.ValType], Callable[[Any], _Conv | None]] = {
    _types.ListType: _list, _types.RecordType: _record, _types.TupleType: _tuple,
    _types.VariantType: _variant_like, _types.OptionType: _variant_like, _types.ResultType: _variant_like,
    _types.EnumType: _enum, _types.FlagsType: _flags,
}
# the classes whose conversions are replaced, with wasmtime-py's own methods (set by `install`)
_STOCK: dict = {}


def _stock(ty) -> _Conv:
    """A type with a part this module does not model (resource, future, ...): stock conversion."""
    cls = type(ty)
    to_c, from_c = _STOCK.get(cls) or (cls.convert_to_c, cls.convert_from_c)
    return _Conv(None, None, stock=(
        lambda store, val, dst: to_c(ty, store, val, ctypes.pointer(_VAL.from_address(dst))),
        lambda src: from_c(ty, _VAL.from_address(src))))


def _conv(ty) -> _Conv:
    """The converter of a type object, compiled on first use and kept on the object."""
    conv = _PRIMITIVES.get(type(ty))
    if conv is None:
        conv = ty.__dict__.get("_fast_conv")
        if conv is None:
            compiler = _COMPILERS.get(type(ty))
            conv = (compiler and compiler(ty)) or _stock(ty)
            ty.__dict__["_fast_conv"] = conv
    return conv


def _convert_to_c(self, store, val, ptr):
    _conv(self).to_c(store, val, addressof(ptr.contents))


def _convert_from_c(self, c):
    return _conv(self).from_c(addressof(c))


# ---- type property caches -------------------------------------------------------------------------
def _cached_property(prop: property) -> property:
    """A property whose value is kept on the instance after the first FFI lookup."""
    fget = prop.fget
    assert fget is not None
    key = f"_cache_{fget.__name__}"

    @functools.wraps(fget)
    def get(self):
        d = self.__dict__
        if key not in d:
            d[key] = fget(self)
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


# ---- calls in both directions -----------------------------------------------------------------------
# linked function index -> (param from_c converters, result to_c converter or None); a host function
# has one fixed type
_HOST_SIGS: dict = {}


@ffi.wasmtime_component_func_callback_t
def _func_impl(idx, context, ty_raw, args, nargs, results, nresults):  # mirrors wasmtime-py's func_impl
    def run(store) -> None:
        sig = _HOST_SIGS.get(idx)
        if sig is None:
            with _types.FuncType._from_ptr(ty_raw, owner=store) as fty:
                result_ty = fty.result
                sig = _HOST_SIGS[idx] = ([_conv(ty).from_c for _, ty in fty.params],
                                         None if result_ty is None else _conv(result_ty).to_c)
        lifts, lower = sig
        func = _linker.FUNCTIONS.get(idx or 0)
        base = addressof(args.contents) if lifts else 0
        pyargs = [lift(base + i * _STRIDE) for i, lift in enumerate(lifts)]
        result = func(store, *pyargs)
        if lower is not None:
            lower(store, result, addressof(results.contents))
    return catch_exceptions(context, run)


# bytes of a wasmtime_component_func_t (store id, instance, export) -> (param to_c converters,
# result from_c converter or None). Store ids are never reused, so a key never changes meaning; the
# cache is emptied now and then because stores come and go.
_EXPORT_SIGS: dict = {}
_EXPORT_SIGS_MAX = 512


def _func_call(self, store, *params):  # mirrors wasmtime-py's Func.__call__
    key = bytes(self._func)
    sig = _EXPORT_SIGS.get(key)
    if sig is None:
        with self.type(store) as fty:
            result_ty = fty.result
            sig = (tuple(_conv(ty).to_c for _, ty in fty.params),
                   None if result_ty is None else _conv(result_ty).from_c)
        if len(_EXPORT_SIGS) >= _EXPORT_SIGS_MAX:
            _EXPORT_SIGS.clear()
        _EXPORT_SIGS[key] = sig
    lowers, lift = sig
    if len(params) != len(lowers):
        raise TypeError(f"wrong number of parameters provided: given {len(params)}, expected {len(lowers)}")
    param_capi = (_VAL * len(params))()
    base = addressof(param_capi)
    n = 0
    try:
        for lower, val in zip(lowers, params):
            lower(store, val, base + n * _STRIDE)
            n += 1
        result_space = None if lift is None else _VAL()

        def run():
            return ffi.wasmtime_component_func_call(
                ctypes.byref(self._func), store._context(), param_capi, n,
                None if result_space is None else ctypes.byref(result_space), 0 if lift is None else 1)
        enter_wasm(run)
        return None if lift is None or result_space is None else lift(addressof(result_space))
    finally:
        for i in range(n):
            _delete(base + i * _STRIDE)


# C functions that may run guest code, compile, instantiate or unmap memory: these must let other
# threads run meanwhile, so they keep ctypes' default of releasing the GIL
_RELEASES_GIL = re.compile(r"call|instantiate|post_return|serialize|validate|wat2wasm|"
                           r"(module|component|store|engine)_(new|delete)|linker_add_wasip|future")


_C_FUNCTION: Any = ctypes.CFUNCTYPE(None).__base__  # the class of every foreign function


def _keep_gil_for_quick_calls() -> None:
    for name, fn in list(vars(_bindings).items()):
        if not (name.startswith("_was") and isinstance(fn, _C_FUNCTION)) or _RELEASES_GIL.search(name):
            continue
        quick = getattr(_C, name[1:])
        quick.restype, quick.argtypes = fn.restype, fn.argtypes
        setattr(_bindings, name, quick)


def wasmtime_version() -> str:
    return private.VERSION


def install() -> bool:
    """Patch wasmtime-py, once per process; call before any `add_func` (a host function's callback
    is bound when it is added). Returns False, patching nothing, on a wasmtime version this module
    was not written for."""
    if _STOCK:  # patched already: `_STOCK` must keep wasmtime-py's methods, not ours
        return True
    version = wasmtime_version()
    if version.split(".")[0] != WRITTEN_FOR:
        log.warning("fastconv was written for wasmtime %s.x and this is wasmtime %s: not installed; "
                    "using wasmtime-py's own value conversion, which is slower", WRITTEN_FOR, version)
        return False
    _keep_gil_for_quick_calls()
    for cls, names in ((_types.ListType, ["element"]), (_types.RecordType, ["fields"]),
                       (_types.TupleType, ["elements"]), (_types.VariantType, ["cases"]),
                       (_types.OptionType, ["payload"]), (_types.ResultType, ["ok", "err"]),
                       (_types.EnumType, ["names"]), (_types.FlagsType, ["names"])):
        for name in names:
            setattr(cls, name, _cached_property(getattr(cls, name)))
    # replacing methods of wasmtime-py's classes is what this module is for
    for tagged in (_types.VariantType, _types.OptionType, _types.ResultType):
        tagged._cases = _cached_method(tagged._cases)  # type: ignore[method-assign]
        tagged._tagged = _cached_method(tagged._tagged)  # type: ignore[method-assign]
    converted: type[_types.ValType]
    for converted in (*_COMPILERS, _types.String):
        _STOCK[converted] = (converted.convert_to_c, converted.convert_from_c)
        converted.convert_to_c = _convert_to_c  # type: ignore[method-assign]
        converted.convert_from_c = _convert_from_c  # type: ignore[method-assign]
    _linker.func_impl = _func_impl
    _func.Func.__call__ = _func_call  # type: ignore[method-assign]
    log.debug("fastconv installed")
    return True
