"""The portable build (PORTABLE=1 ./build.sh, into build/portable/): its components import only
Kinode's own interfaces and WASI, and a portable file_transfer pair, or a portable node with a
normal one, downloads a file intact through plain `standard` (no host extension)."""
from __future__ import annotations

import hashlib
import os

import pytest
from conftest import REPO

PORTABLE = REPO / "build" / "portable"
FT_WASMS = sorted((PORTABLE / "file_transfer" / "pkg").glob("*.wasm"))

pytestmark = pytest.mark.skipif(
    not FT_WASMS and not os.environ.get("CI"),
    reason="no portable build: run PORTABLE=1 PORTABLE_PACKAGES=file_transfer ./build.sh")


def test_portable_components_import_only_kinode_and_wasi():
    from host.runtime.wasm import Runtime
    from host.settings import runtime_from_environment
    rt = Runtime(runtime_from_environment())
    wasms = sorted(PORTABLE.glob("*/pkg/*.wasm"))
    assert {w.name for w in FT_WASMS} >= {"file_transfer.wasm", "file_transfer_worker.wasm",
                                          "file_transfer_worker_api.wasm", "download.wasm"}, \
        "CI must build file_transfer portable (see .ci/run)"
    for wasm in wasms:
        imports = rt.load_file(wasm).imports
        foreign = {i for i in imports if not i.startswith("wasi:")
                   and not (i.startswith("kinode:process/") and i.endswith("@0.8.0"))}
        assert not foreign, (wasm.name, foreign)
        assert "kinode:process/standard@0.8.0" in imports, (wasm.name, imports)
    # the check can fail: the normal build of the same process imports the host's extension
    normal = rt.load_file(REPO / "components" / "file_transfer" / "pkg" / "file_transfer_worker.wasm")
    assert "kinode-py:host-ext/blobs@0.1.0" in normal.imports


def _download(fake, fake2, name: str, data: bytes) -> list[str]:
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / name).write_bytes(data)
    code, lines = fake.run(f"download:file_transfer:template.os {name} fake2.dev",
                           until=rf"{name} downloaded|error:", timeout=120)
    assert code == 0, lines
    got = (fake.files / name).read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    return lines


@pytest.mark.parametrize("requestor, provider", [("portable", "portable"), ("portable", "normal"),
                                                 ("normal", "portable")])
def test_portable_file_transfer_downloads_intact(node_factory, requestor, provider):
    pkgs = {"portable": str(PORTABLE), "normal": str(REPO / "components")}
    fake = node_factory("fake.dev", extra_args=["--packages", pkgs[requestor]])
    fake2 = node_factory("fake2.dev", extra_args=["--packages", pkgs[provider]])
    # several of the seed's 1 MiB chunks and a short last one; and one small file
    _download(fake, fake2, "multi.bin", os.urandom((3 << 20) + 12345))
    _download(fake, fake2, "small.txt", b"hello world\n")
    # the requestor holds an older version of a file big enough to be offered only what changed
    # (ft_delta): a plain peer on either side still moves it whole, as the seed does
    old = os.urandom(6 << 20)
    fake.files.mkdir(parents=True, exist_ok=True)
    (fake.files / "changed.bin").write_bytes(old)
    lines = _download(fake, fake2, "changed.bin", old[:3 << 20] + os.urandom(1000) + old[3 << 20:])
    assert not any("moved" in ln for ln in lines), lines
