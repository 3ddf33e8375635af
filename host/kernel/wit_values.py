"""WIT values <-> host values for the `standard` interface (wasmtime's Record/Variant <-> host.messages)."""
from __future__ import annotations

from typing import Any

from wasmtime.component import Record, Variant

from host.kernel.api import OnExit
from host.messages import Address, Blob, Capability, ProcessId, Request, Response, SendError


def _rec(**fields) -> Record:
    r = Record()
    for k, v in fields.items():
        setattr(r, k.replace("_", "-"), v)
    return r


def _f(r: Any, name: str) -> Any:
    return getattr(r, name.replace("_", "-"))


def wit_pid(p: ProcessId) -> Record:
    return _rec(process_name=p.process_name, package_name=p.package_name, publisher_node=p.publisher_node)


def wit_address(a: Address) -> Record:
    return _rec(node=a.node, process=wit_pid(a.process))


def py_pid(r: Any) -> ProcessId:
    return ProcessId(_f(r, "process_name"), _f(r, "package_name"), _f(r, "publisher_node"))


def py_address(r: Any) -> Address:
    return Address(r.node, py_pid(r.process))


def wit_cap(c: Capability) -> Record:
    return _rec(issuer=wit_address(c.issuer), params=c.params)


def py_cap(r: Any) -> Capability:
    return Capability(py_address(r.issuer), r.params).normalised()


def wit_blob(b: Blob | None) -> Record | None:
    return None if b is None else _rec(mime=b.mime, bytes=b.bytes)


def py_blob(r: Any) -> Blob | None:
    return None if r is None else Blob(r.mime, r.bytes)


def wit_request(q: Request) -> Record:
    return _rec(inherit=q.inherit, expects_response=q.expects_response, body=q.body,
                metadata=q.metadata, capabilities=[wit_cap(c) for c in q.capabilities])


def py_request(r: Any) -> Request:
    return Request(r.inherit, _f(r, "expects_response"), r.body, r.metadata,
                   [py_cap(c) for c in r.capabilities])


def wit_response(q: Response) -> Record:
    return _rec(inherit=q.inherit, body=q.body, metadata=q.metadata,
                capabilities=[wit_cap(c) for c in q.capabilities])


def py_response(r: Any) -> Response:
    return Response(r.inherit, r.body, r.metadata, [py_cap(c) for c in r.capabilities])


def wit_message(m, context: bytes | None = None):
    # `message` is an untagged variant: a Record is a request, a tuple a response
    if isinstance(m, Request):
        return wit_request(m)
    return (wit_response(m), context)


def wit_send_error(e: SendError) -> Record:
    return _rec(kind=e.kind, target=wit_address(e.target), message=wit_message(e.message),
                lazy_load_blob=wit_blob(e.lazy_load_blob))


def wit_on_exit(o: OnExit) -> Variant:
    if o.kind == "requests":
        return Variant("requests", [(wit_address(a), wit_request(q), wit_blob(b)) for a, q, b in o.requests])
    return Variant(o.kind)


def py_on_exit(v: Any) -> OnExit:
    if v.tag == "requests":
        return OnExit("requests", [(py_address(a), py_request(q), py_blob(b)) for a, q, b in v.payload])
    return OnExit(v.tag)


