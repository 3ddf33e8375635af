"""host.runtime.fastconv against wasmtime-py's own conversions and through real components.

An echo component (written in component WAT below) imports `f-NAME: func(x: T) -> T` from the host
and exports `g-NAME: func(x: T) -> T`, which passes its argument to `f-NAME` and returns what that
returns. Calling `g-NAME` from Python therefore converts a value four times: lowered as a guest
call's argument, lifted as a host import's argument, lowered as the import's result, and lifted as
the guest call's result, with wasmtime checking the value against the type at each crossing.
Each `T` is `tuple<X, padding>`: with more than 16 flat values a component function passes its
parameters and its result through linear memory in the same layout, so the guest code is the same
few instructions for every type.

Run as a script (`python tests/test_fastconv.py`) it prints stock vs fastconv timings.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wasmtime import Engine, Store, WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import (
    Component,
    Linker,
    Record,
    ResourceAny,
    ResourceHost,
    ResourceType,
    Variant,
)

from host.runtime import fastconv
from host.runtime.wasm import STANDARD, Runtime
from host.settings import runtime_from_environment

assert fastconv.install(), "fastconv refused this wasmtime version"

# ---- the echo component ---------------------------------------------------------------------------
# named types, in dependency order: (name, definition); `$other` names another of them
NAMED = [
    ("process-id", ('(record (field "process-name" string) (field "package-name" string) '
                    '(field "publisher-node" string))')),
    ("address", '(record (field "node" string) (field "process" $process-id))'),
    ("capability", '(record (field "issuer" $address) (field "params" string))'),
    ("lazy-load-blob", '(record (field "mime" (option string)) (field "bytes" (list u8)))'),
    ("request", ('(record (field "inherit" bool) (field "expects-response" (option u64)) (field "body" (list u8)) '
                 '(field "metadata" (option string)) (field "capabilities" (list $capability)))')),
    ("response", ('(record (field "inherit" bool) (field "body" (list u8)) (field "metadata" (option string)) '
                  '(field "capabilities" (list $capability)))')),
    ("message", '(variant (case "request" $request) (case "response" (tuple $response (option (list u8)))))'),
    ("send-error-kind", '(enum "offline" "timeout")'),
    ("send-error", ('(record (field "kind" $send-error-kind) (field "target" $address) (field "message" $message) '
                    '(field "lazy-load-blob" (option $lazy-load-blob)))')),
    ("spawn-error", '(enum "name-taken" "no-file-at-path")'),
    ("on-exit", ('(variant (case "none") (case "restart") '
                 '(case "requests" (list (tuple $address $request (option $lazy-load-blob)))))')),
    ("perms", '(flags "read" "write-all" "x")'),
    ("scalars", ('(record (field "b" bool) (field "s-8" s8) (field "u-8" u8) (field "s-16" s16) (field "u-16" u16) '
                 '(field "s-32" s32) (field "u-32" u32) (field "s-64" s64) (field "u-64" u64) (field "f-32" f32) '
                 '(field "f-64" f64) (field "c" char))')),
    ("shape", '(variant (case "dot") (case "line" u32) (case "poly" (list (tuple s32 s32))))'),
    ("side", '(variant (case "left" string) (case "right" string) (case "neither"))'),
    ("res", "(sub resource)"),  # a host resource: its values keep wasmtime-py's own conversion
]
# echoed types: (function name suffix, type)
ECHOED = {
    "receive": "(result (tuple $address $message) (error (tuple $send-error (option (list u8)))))",
    "await": "(result (tuple $address $message) (error $send-error))",
    "spawn": "(result $process-id (error $spawn-error))",
    "on-exit": "$on-exit",
    "blob": "(option $lazy-load-blob)",
    "state": "(option (list u8))",
    "caps": "(list $capability)",
    "scalars": "$scalars",
    "perms": "$perms",
    "shape": "$shape",
    "side": "$side",
    "nested-option": "(option (option string))",
    "units": "(tuple (result) (result string) (result (error u8)) (option bool))",
    "lists": "(tuple (list string) (list (list u8)) (list $send-error-kind) (list (list (tuple u8))))",
    "string": "string",
    "res": "(tuple string (own $res) (list (tuple u8 (own $res))))",
}
RES = 7  # the host resource type's id
PAD = "(tuple " + " ".join(["u64"] * 16) + ")"
PAD_VALUE = tuple(range(16))


def _echo_wat() -> str:
    fn = {k: f"(tuple {t} {PAD})" for k, t in ECHOED.items()}
    host = "\n".join(f'(export "{n}" (type ${n} {d}))' if "resource" in d else
                     f'(type $_{n} {d}) (export "{n}" (type ${n} (eq $_{n})))' for n, d in NAMED)
    host += "\n".join(f'(export "f-{k}" (func (param "x" {t}) (result {t})))' for k, t in fn.items())
    aliases = "\n".join(f'(alias export $host "{n}" (type ${n}))' for n, _ in NAMED)
    imports = "\n".join(f'(alias export $host "f-{k}" (func $f-{k}))' for k in fn)
    lowered = "\n".join(f"(core func $l-{k} (canon lower (func $f-{k}) (memory $memory) (realloc $realloc)))"
                        for k in fn)
    core_imports = "\n".join(f'(import "h" "f-{k}" (func $f-{k} (param i32 i32)))' for k in fn)
    # the result is written at address 8 by the import and read from there by the export
    core_funcs = "\n".join(f'(func (export "g-{k}") (param i32) (result i32) '
                           f"(call $f-{k} (local.get 0) (i32.const 8)) (i32.const 8))" for k in fn)
    with_funcs = " ".join(f'(export "f-{k}" (func $l-{k}))' for k in fn)
    lifted = "\n".join(
        f'(func $g-{k} (param "x" {t}) (result {t}) (canon lift (core func $main "g-{k}") (memory $memory) '
        f'(realloc $realloc) (post-return (core func $main "post")))) (export "g-{k}" (func $g-{k}))'
        for k, t in fn.items())
    return f'''
(component
  (import "test:fastconv/echo" (instance $host {host}))
  {aliases}
  {imports}
  (core module $Mem
    (memory (export "memory") 1)
    (global $bump (mut i32) (i32.const 4096))
    ;; a bump allocator, emptied after each call
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.sub (i32.add (global.get $bump) (local.get 2)) (i32.const 1))
                             (i32.sub (i32.const 0) (local.get 2))))
      (global.set $bump (i32.add (local.get $p) (local.get 3)))
      (block $fits
        (br_if $fits (i32.le_u (global.get $bump) (i32.mul (memory.size) (i32.const 65536))))
        (drop (memory.grow (i32.add (i32.const 1) (i32.div_u
          (i32.sub (global.get $bump) (i32.mul (memory.size) (i32.const 65536))) (i32.const 65536))))))
      (local.get $p))
    (func (export "reset") (global.set $bump (i32.const 4096))))
  (core instance $mem (instantiate $Mem))
  (alias core export $mem "memory" (core memory $memory))
  (alias core export $mem "realloc" (core func $realloc))
  {lowered}
  (core module $Main
    {core_imports}
    (import "m" "reset" (func $reset))
    {core_funcs}
    (func (export "post") (param i32) (call $reset)))
  (core instance $main (instantiate $Main (with "h" (instance {with_funcs})) (with "m" (instance $mem))))
  {lifted}
)'''


class Echo:
    """An instance of the echo component; `seen` holds what the host imports received."""

    def __init__(self, reply=None):
        self.engine = Engine()
        self.component = Component(self.engine, _echo_wat())
        self.linker = Linker(self.engine)
        self.seen: list = []
        self.reply = reply  # host import result from its argument; the argument itself by default
        with self.linker.root() as root, root.add_instance("test:fastconv/echo") as inst:
            inst.add_resource("res", ResourceType.host(RES), lambda store, rep: None)
            for k in ECHOED:
                inst.add_func(f"f-{k}", self._host)
        self.store = Store(self.engine)
        self.instance = self.linker.instantiate(self.store, self.component)

    def _host(self, store, x):
        self.seen.append(x)
        return x if self.reply is None else self.reply(x)

    def __call__(self, name: str, value):
        g = self.instance.get_func(self.store, f"g-{name}")
        out = g(self.store, (value, PAD_VALUE))
        g.post_return(self.store)
        assert out[1] == PAD_VALUE
        return out[0]

    def type_of(self, name: str):
        """The type object of X in `g-NAME`'s `tuple<X, padding>`."""
        g = self.instance.get_func(self.store, f"g-{name}")
        return g.type(self.store).params[0][1].elements[0]


@pytest.fixture(scope="module")
def echo():
    return Echo()


def plain(v):
    """`v` with every Record and Variant spelled out, and the exact Python type of each part."""
    if isinstance(v, Record):
        return ("Record", {k: plain(x) for k, x in sorted(vars(v).items())})
    if isinstance(v, Variant):
        return ("Variant", v.tag, plain(v.payload))
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, [plain(x) for x in v])
    if isinstance(v, set):
        return ("set", sorted(v))
    return (type(v).__name__, v)


def rec(**fields) -> Record:
    r = Record()
    for k, v in fields.items():
        setattr(r, k.replace("_", "-"), v)
    return r


# ---- values ---------------------------------------------------------------------------------------
def pid(name="file-transfer"):
    return rec(process_name=name, package_name="file-transfer", publisher_node="template.os")


def address(node="fake.dev"):
    return rec(node=node, process=pid())


def cap(params='{"messaging": true}'):
    return rec(issuer=address("ünïcødé.os"), params=params)


def request(body=bytes(range(200)), caps=2):
    return rec(inherit=False, expects_response=30, body=body, metadata='{"a": 1}',
               capabilities=[cap() for _ in range(caps)])


def response():
    return rec(inherit=True, body=b"", metadata=None, capabilities=[])


def blob(n=3):
    return rec(mime="text/plain", bytes=bytes(n))


def send_error():
    return rec(kind="timeout", target=address(), message=request(caps=0), lazy_load_blob=blob())


def scalars(**over):
    return rec(**{"b": True, "s_8": -128, "u_8": 255, "s_16": -32768, "u_16": 65535, "s_32": -2**31,
                  "u_32": 2**32 - 1, "s_64": -2**63, "u_64": 2**64 - 1, "f_32": 1.5, "f_64": -2.25e300, "c": "€",
                  **over})


CASES = [
    ("receive", Variant("ok", (address(), request()))),
    ("receive", Variant("ok", (address(), (response(), b"ctx")))),
    ("receive", Variant("ok", (address(), (response(), None)))),
    ("receive", Variant("err", (send_error(), None))),
    ("receive", Variant("err", (send_error(), b"\x00\xff"))),
    ("await", (address(), request(body=b""))),        # untagged: a tuple is ok, a Record is err
    ("await", send_error()),
    ("spawn", pid("worker")),                         # untagged: a Record is ok, a str is err
    ("spawn", "no-file-at-path"),
    ("on-exit", Variant("none")),
    ("on-exit", Variant("restart")),
    ("on-exit", Variant("requests", [(address(), request(), None), (address("b.os"), request(caps=0), blob())])),
    ("on-exit", Variant("requests", [])),
    ("blob", None),
    ("blob", rec(mime=None, bytes=b"")),
    ("blob", blob(5000)),
    ("state", None),
    ("state", b""),
    ("state", bytes(range(256)) * 300),                 # over _GRAFT_MIN: grafted
    ("caps", []),
    ("caps", [cap(), cap(""), cap("x" * 10000)]),
    ("scalars", scalars()),
    ("scalars", scalars(b=False, s_8=0, u_8=0, f_32=float("inf"), f_64=0.0, c="\U0001f600")),
    ("perms", set()),
    ("perms", {"read", "write-all", "x"}),
    ("shape", None),                                  # untagged: the cases' classes differ
    ("shape", 7),
    ("shape", [(1, -2), (3, 4)]),
    ("side", Variant("left", "l")),                   # tagged: two cases hold a str
    ("side", Variant("right", "")),
    ("side", Variant("neither")),
    ("nested-option", Variant("none")),               # tagged: option<option<T>>
    ("nested-option", Variant("some", None)),
    ("nested-option", Variant("some", "")),
    ("units", (Variant("ok"), "ok", None, False)),    # result<_, _> is tagged, the others are not
    ("units", (Variant("err"), None, 3, None)),
    ("lists", (["", "a", "ü" * 1000], [b"", b"x", bytes(40000)], ["offline", "timeout"], [[], [(1,)]])),
    ("string", ""),
    ("string", "mixed ascii, ünïcødé and 😀"),
]


# ---- stock conversions, for comparison -----------------------------------------------------------
@contextlib.contextmanager
def stock_conversions():
    """wasmtime-py's own convert_to_c/convert_from_c on every class fastconv replaces."""
    patched = {cls: (cls.convert_to_c, cls.convert_from_c) for cls in fastconv._STOCK}
    for cls, (to_c, from_c) in fastconv._STOCK.items():
        cls.convert_to_c, cls.convert_from_c = to_c, from_c
    try:
        yield
    finally:
        for cls, (to_c, from_c) in patched.items():
            cls.convert_to_c, cls.convert_from_c = to_c, from_c


def stock_to_c(ty, value) -> ffi.wasmtime_component_val_t:
    c = ffi.wasmtime_component_val_t()
    with stock_conversions():
        ty.convert_to_c(None, value, ctypes.pointer(c))
    return c


def stock_from_c(ty, c):
    with stock_conversions():
        return ty.convert_from_c(c)


def fast_to_c(ty, value) -> ffi.wasmtime_component_val_t:
    c = ffi.wasmtime_component_val_t()
    ty.convert_to_c(None, value, ctypes.pointer(c))
    return c


def stock_value(v):
    """`v` as stock conversion accepts it: list<u8> only as bytes."""
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, Record):
        return rec(**{k.replace("-", "_"): stock_value(x) for k, x in vars(v).items()})
    if isinstance(v, Variant):
        return Variant(v.tag, stock_value(v.payload))
    if isinstance(v, tuple):
        return tuple(stock_value(x) for x in v)
    if isinstance(v, list):
        return [stock_value(x) for x in v]
    return v


# ---- tests through the echo component ---------------------------------------------------------------
@pytest.mark.parametrize("name,value", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_echo_round_trip(echo, name, value):
    echo.seen.clear()
    out = echo(name, value)
    assert plain(echo.seen[0][0]) == plain(value)  # lifted as the host import's argument
    assert plain(out) == plain(value)               # and back, lowered twice and lifted twice


@pytest.mark.parametrize("graft_min", [0, 1 << 40], ids=["graft-all", "graft-none"])
def test_graft(echo, monkeypatch, graft_min):
    """Every list<u8> grafted into wasmtime's copy after the clone, or none: the same values."""
    monkeypatch.setattr(fastconv, "_GRAFT_MIN", graft_min)
    for name, value in CASES:
        assert plain(echo(name, value)) == plain(value)


@pytest.mark.parametrize("name,value", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_same_c_value_as_stock(echo, name, value):
    ty = echo.type_of(name)
    value = stock_value(value)
    # ours lowered, stock lifted
    assert plain(stock_from_c(ty, fast_to_c(ty, value))) == plain(value)
    # stock lowered, ours lifted
    assert plain(ty.convert_from_c(stock_to_c(ty, value))) == plain(value)


def test_kinode_types_from_a_built_component():
    rt = Runtime(runtime_from_environment())
    comp = rt.load_file(REPO / "components/file_transfer/pkg/file_transfer_worker.wasm")
    iface = comp.component.type.imports(rt.engine)[STANDARD].ty
    funcs = {n: e.ty for n, e in iface.exports(rt.engine).items()}
    receive = funcs["receive"].result
    spawn = funcs["spawn"].result
    target, req = (ty for _, ty in funcs["send-request"].params[:2])
    assert receive._tagged() and not spawn._tagged()
    for ty, value in [(receive, Variant("ok", (address(), request()))),
                      (receive, Variant("err", (send_error(), None))),
                      (spawn, pid()), (spawn, "name-taken"), (target, address()), (req, request(caps=3))]:
        assert plain(stock_from_c(ty, fast_to_c(ty, value))) == plain(value)
        assert plain(ty.convert_from_c(stock_to_c(ty, value))) == plain(value)


def test_lift_types_match_stock(echo):
    """Hyphenated attributes, untagged payloads, None for unit cases, bytes for list<u8>."""
    out = echo("receive", Variant("ok", (address(), request())))
    assert type(out) is Variant and out.tag == "ok"
    addr, msg = out.payload
    assert type(addr) is Record and getattr(addr.process, "publisher-node") == "template.os"
    assert type(msg) is Record and type(msg.body) is bytes and getattr(msg, "expects-response") == 30
    assert echo("spawn", "name-taken") == "name-taken"
    assert echo("units", (Variant("err"), None, None, None)) == (Variant("err"), None, None, None)
    # list<u8> also takes a bytearray or memoryview, but as stock, an untagged case is chosen by
    # `bytes` (option<list<u8>> here)
    assert echo("lists", ([], [bytearray(b"ab"), memoryview(b"cd")], [], [])) == ([], [b"ab", b"cd"], [], [])
    with pytest.raises(ValueError):
        echo("state", bytearray(b"ab"))


BAD = [
    ("string", 5, TypeError),
    ("string", b"bytes", TypeError),
    ("string", "\ud800", UnicodeEncodeError),
    ("scalars", scalars(u_8="1"), TypeError),
    ("scalars", scalars(f_64=1), TypeError),                         # an int is not a float
    ("scalars", scalars(c="ab"), TypeError),
    ("scalars", scalars(b=1), TypeError),
    ("spawn", 3, ValueError),                                        # no case of the untagged result
    ("on-exit", "restart", TypeError),                               # tagged: needs a Variant
    ("on-exit", Variant("reboot"), ValueError),
    ("on-exit", Variant("requests", [(address(), request())]), TypeError),  # tuple length
    ("receive", Variant("ok", [address(), request()]), TypeError),  # a list is not a tuple
    ("caps", (cap(),), TypeError),
    ("caps", [cap(), rec(params="p")], AttributeError),              # a record without `issuer`
    ("state", [1, 2], ValueError),                                   # option<list<u8>> has no list case
    ("lists", ([], [[1, 2]], [], []), TypeError),                    # list<u8> takes bytes
    ("state", bytes(fastconv.MAX_LIST_BYTES + 1), WasmtimeError),
    ("perms", ["read"], TypeError),
    ("perms", {"read", 3}, TypeError),
    ("nested-option", None, TypeError),
    ("side", Variant("up", "u"), ValueError),
    ("side", Variant(["left"], "l"), ValueError),                    # an unhashable tag
]


@pytest.mark.parametrize("name,value,error", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_values_raise_like_stock(echo, name, value, error):
    ty = echo.type_of(name)
    with pytest.raises(error):
        fast_to_c(ty, value)
    if error is not WasmtimeError:  # the list<u8> size limit is this host's, not stock's
        with pytest.raises(error):
            stock_to_c(ty, stock_value(value))
    with pytest.raises(error):      # as a guest call's argument
        echo(name, value)
    echo.seen.clear()
    assert echo("string", "still fine") == "still fine"
    assert not fastconv._tls.arena.busy and not fastconv._tls.arena.extra


def test_resources_fall_back_to_stock(echo):
    """A type holding a resource keeps stock conversion, around fastconv's for its other parts."""
    assert fastconv._conv(echo.type_of("res")).lower is None
    value = ("label", ResourceHost.own(11, RES), [(1, ResourceHost.own(12, RES)), (2, ResourceHost.own(13, RES))])
    out = echo("res", value)
    assert out[0] == "label" and [n for n, _ in out[2]] == [1, 2]
    handles = [out[1]] + [r for _, r in out[2]]
    assert all(isinstance(r, ResourceAny) and r.owned for r in handles)
    assert [r.to_host(echo.store).rep for r in handles] == [11, 12, 13]


def test_bad_host_result_raises():
    bad = Echo(reply=lambda x: 42)
    with pytest.raises(TypeError):
        bad("receive", Variant("ok", (address(), request())))
    with pytest.raises(ValueError):
        Echo(reply=lambda x: (object(), PAD_VALUE))("spawn", "name-taken")


def test_reentrant_lowering(echo):
    """A value whose attribute lookup converts another value on the same thread."""
    spawn = echo.type_of("spawn")

    class Sneaky:
        def __getattr__(self, name):
            return getattr(spawn.convert_from_c(fast_to_c(spawn, pid("inner"))), name)
    ty = echo.type_of("caps").element
    out = ty.convert_from_c(fast_to_c(ty, rec(issuer=rec(node="n", process=Sneaky()), params="p")))
    assert plain(out) == plain(rec(issuer=rec(node="n", process=pid("inner")), params="p"))


def test_threads(echo):
    """Threads compiling the same types at once, each lowering in its own arena."""
    def work(i):
        ty = echo.type_of("receive")
        v = Variant("ok", (address(str(i)), request(body=bytes([i]) * i)))
        for _ in range(200):
            assert plain(ty.convert_from_c(fast_to_c(ty, v))) == plain(v)
    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(work, i) for i in range(8)]:
            f.result()


def test_converter_outlives_its_type(echo):
    """Cached converters (as for host functions) keep working once their type objects are gone."""
    conv = fastconv._conv(echo.type_of("on-exit"))
    ty = echo.type_of("on-exit")
    gc.collect()
    churn = [bytes(48) * i for i in range(2000)]  # reuse freed memory
    value = Variant("requests", [(address(), request(), blob())])
    c = ffi.wasmtime_component_val_t()
    conv.to_c(None, value, ctypes.addressof(c))
    del churn
    assert plain(stock_from_c(ty, c)) == plain(value)


def test_func_signature_cache(echo):
    g = echo.instance.get_func(echo.store, "g-string")
    assert g(echo.store, ("a", PAD_VALUE)) == ("a", PAD_VALUE)
    g.post_return(echo.store)
    with pytest.raises(TypeError, match="wrong number of parameters"):
        g(echo.store)
    other = Echo()  # another store: another key
    assert other("string", "b") == "b"


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_no_leak():
    rt = Runtime(runtime_from_environment())
    comp = rt.load_file(REPO / "components/file_transfer/pkg/file_transfer_worker.wasm")
    iface = comp.component.type.imports(rt.engine)[STANDARD].ty
    ty = {n: e.ty for n, e in iface.exports(rt.engine).items()}["receive"].result
    conv = fastconv._conv(ty)
    c = ffi.wasmtime_component_val_t()
    at = ctypes.addressof(c)
    value = Variant("ok", (address(), request()))

    def rounds(n):
        for _ in range(n):
            conv.to_c(None, value, at)
            conv.from_c(at)
    rounds(20_000)
    gc.collect()
    before = _rss_kb()
    rounds(200_000)
    gc.collect()
    assert _rss_kb() - before < 8 * 1024, "RSS grew by more than 8 MiB over 200,000 round trips"


@pytest.mark.parametrize("graft_min", [0, 1 << 40], ids=["graft-all", "graft-none"])
def test_no_leak_through_wasm(echo, monkeypatch, graft_min):
    monkeypatch.setattr(fastconv, "_GRAFT_MIN", graft_min)
    value = Variant("ok", (address(), request()))
    for _ in range(2_000):
        echo("receive", value)
    echo.seen.clear()
    gc.collect()
    before = _rss_kb()
    for _ in range(20_000):
        echo("receive", value)
        echo.seen.clear()
    gc.collect()
    assert _rss_kb() - before < 8 * 1024


# ---- timings ----------------------------------------------------------------------------------------
def _time(fn, n: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    rt = Runtime(runtime_from_environment())
    comp = rt.load_file(REPO / "components/file_transfer/pkg/file_transfer_worker.wasm")
    iface = comp.component.type.imports(rt.engine)[STANDARD].ty
    ty = {n: e.ty for n, e in iface.exports(rt.engine).items()}["receive"].result
    value = Variant("ok", (address(), request()))
    c = ffi.wasmtime_component_val_t()
    p = ctypes.pointer(c)

    def round_trip():
        ty.convert_to_c(None, value, p)
        ty.convert_from_c(c)

    def lower():
        ty.convert_to_c(None, value, p)
        ffi.wasmtime_component_val_delete(p)
    fast = _time(round_trip, 20_000), _time(lower, 20_000)
    with stock_conversions():
        stock = _time(round_trip, 5_000), _time(lower, 5_000)
    print("receive() result: result<tuple<address, message>, tuple<send-error, option<list<u8>>>>, "
          "a request with a 200-byte body, metadata and 2 capabilities")
    print(f"  stock:    lower+lift {stock[0]:7.1f} us   lower only {stock[1]:7.1f} us")
    print(f"  fastconv: lower+lift {fast[0]:7.1f} us   lower only {fast[1]:7.1f} us")
    echo = Echo()
    print(f"  echo component g-receive (4 conversions + 2 calls): {_time(lambda: echo('receive', value), 5_000):.1f} us")


if __name__ == "__main__":
    main()


# ---- without fastconv ------------------------------------------------------------------------------
# runs the node's command line with fastconv believing wasmtime is a version it was not written for
FAKE_VERSION_LAUNCHER = ("import sys; from host.runtime import fastconv; fastconv.wasmtime_version = lambda: '99.0.0'; "
                         "from host.__main__ import main; sys.exit(main(sys.argv[1:]))")


def test_a_node_without_fastconv_still_transfers_files(node_factory):
    """One node turned off with --no-fastconv, its peer refusing fastconv on a faked wasmtime 99:
    both convert with wasmtime-py's own code, and a file of several chunks still arrives intact."""
    import hashlib
    import os
    fake = node_factory("fake.dev", extra_args=["--no-fastconv", "-v"])
    peer = node_factory("fake2.dev", start=False)
    peer.launcher = [sys.executable, "-c", FAKE_VERSION_LAUNCHER]
    peer.start()
    assert any("fastconv is off" in ln for ln in fake.lines), fake.lines
    assert any("fastconv was written for wasmtime 50.x and this is wasmtime 99.0.0: not installed" in ln
               for ln in peer.lines), peer.lines
    data = os.urandom(9 << 20)  # three chunks between our nodes
    peer.files.mkdir(parents=True, exist_ok=True)
    (peer.files / "big.bin").write_bytes(data)
    code, lines = fake.run("download:file_transfer:template.os big.bin fake2.dev",
                           until=r"big\.bin downloaded|error:", timeout=240)
    assert code == 0, lines
    assert hashlib.sha256((fake.files / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_fastconv_is_in_use_by_default(node_factory):
    """The positive control of the test above: a plain node installs fastconv and says nothing of it."""
    node = node_factory("fake.dev", extra_args=["-vv"])
    assert any("fastconv installed" in ln for ln in node.lines), node.lines
    assert not any("fastconv is off" in ln or "not installed" in ln for ln in node.lines)
