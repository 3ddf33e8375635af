"""host/ and each guest process have no import cycle: every import counts, including ones under `if TYPE_CHECKING:` and
inside functions (a cycle hidden there still couples the modules)."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

HOST = Path(__file__).resolve().parent.parent / "host"
COMPONENTS = HOST.parent / "components"


def package_modules(package_dir: Path, package: str) -> dict[str, Path]:
    """Module name -> source file, for every module of a package."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports, from every import statement in its source."""
    return graph_of(package_modules(package_dir, package))


def graph_of(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module name -> the modules of `modules` it imports."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
                targets = subs or [source]
            for target in targets:
                # importing a.b.c runs a.b.c (its parents are packages, not counted as edges)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
                elif target == name and not is_package:
                    graph[name].add(target)  # a module importing itself is a cycle too
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; host/ is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]
    return f"{', '.join(component)} ({'; '.join(edges)})"


def test_host_has_no_import_cycle():
    graph = import_graph(HOST, "host")
    assert "host.kernel.kernel" in graph and "host.kernel.process" in graph  # the walk found host/'s modules
    assert "host.kernel.kernel" in graph["host.node"]                 # and their imports
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in host/: " + " | ".join(_describe(graph, c) for c in cycles)


def guest_modules(process_dir: Path) -> dict[str, Path]:
    """What componentize-py bundles for one process: its folder's modules and its package's common/
    as top-level modules, and process_lib as a package."""
    modules = package_modules(COMPONENTS / "process_lib", "process_lib")
    for folder in (process_dir.parent / "common", process_dir):
        for path in sorted(folder.glob("*.py")):
            modules[path.stem] = path
    return modules


def test_guests_have_no_import_cycle():
    processes = sorted(p.parent for p in COMPONENTS.glob("*/*/main.py"))
    assert {p.name for p in processes} >= {"file_transfer", "file_transfer_worker", "download"}
    for process in processes:
        graph = graph_of(guest_modules(process))
        assert any(m.split(".")[0] == "process_lib" for m in graph["main"]), process  # the walk saw imports
        cycles = find_cycles(graph)
        assert not cycles, f"import cycles in {process}: " + " | ".join(_describe(graph, c) for c in cycles)


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name == goal:
            return True
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return False


def test_the_node_installs_the_abi_and_the_kernel_does_not_depend_on_it():
    graph = import_graph(HOST, "host")
    assert "host.kernel.standard_host" in graph["host.node"]       # the node installs the process ABI
    assert _reaches(graph, "host.node", "host.kernel.standard_host")  # (the walk sees such paths)
    assert "host.kernel.standard_host" not in graph["host.kernel.kernel"]
    assert not _reaches(graph, "host.kernel.kernel", "host.kernel.standard_host")


def _sources(root: Path):
    for path in sorted(root.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def test_one_owner_for_wasmtime_private_modules_and_the_vfs_folder():
    """wasmtime-py's private modules are reached through host/runtime/private.py alone, and the VFS's
    folder in a home is named in host/vfs/ alone (others ask the Vfs)."""
    private, vfs_named = set(), set()
    for path, tree in _sources(HOST):
        rel = path.relative_to(HOST).as_posix()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wasmtime"):
                names = [f"{node.module}.{a.name}" for a in node.names]
            if any(part.startswith("_") for n in names if n.startswith("wasmtime") for part in n.split(".")):
                private.add(rel)
            if isinstance(node, ast.Constant) and node.value == "vfs":
                vfs_named.add(rel)
    assert private == {"runtime/private.py"}
    assert vfs_named and all(rel.startswith("vfs/") for rel in vfs_named), vfs_named


def test_one_vfs_path_rule():
    """The VFS path rule (no `..` part, backslash or NUL) is written once, in kinode_types; the
    host's checks call it."""
    from host.kinode_types import vfs_path_problem
    assert vfs_path_problem("/p:pub/drive/a/./b//c") == ""
    assert vfs_path_problem("a/b/c", exact=True) == vfs_path_problem("a/b", relative=True) == ""
    assert "'..'" in vfs_path_problem("/p:pub/drive/../x")
    assert "backslash" in vfs_path_problem("a\\b") and "NUL" in vfs_path_problem("a\x00b")
    assert vfs_path_problem("a//b", exact=True) and vfs_path_problem("a/./b", exact=True)
    assert vfs_path_problem("/a", relative=True) and vfs_path_problem("C:/a", relative=True)
    assert vfs_path_problem(3)
    written = set()
    for path, tree in _sources(HOST):
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in ("..", "\\", "\x00"):
                written.add(path.relative_to(HOST).as_posix())
    assert written == {"kinode_types.py"}, written

def _write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, text in files.items():
        (pkg / name).write_text(textwrap.dedent(text))
    return pkg


def test_a_kernel_on_a_runtime_without_the_abi_refuses_to_start_a_process(tmp_path):
    """The node installs the ABI; a kernel given a runtime without it says so (the node's own tests,
    whose processes run, are the control)."""
    from host.kernel.api import OnExit
    from host.kernel.kernel import Kernel
    from host.messages import ProcessId
    from host.runtime.wasm import Runtime
    from host.settings import RuntimeSettings

    class Output:
        def __getattr__(self, name):
            return lambda *a, **k: None

    kernel = Kernel("a.dev", tmp_path, Runtime(RuntimeSettings(cache_dir=tmp_path / "cache")), Output())
    with pytest.raises(ValueError, match="process ABI is not installed"):
        kernel.start_process(ProcessId("p", "app", "pub.os"), "app:pub.os/pkg/p.wasm", set(), False, OnExit("none"))
    kernel.shutdown()


def test_checker_finds_a_cycle_through_a_type_only_import(tmp_path):
    pkg = _write_package(tmp_path, {
        "a.py": "from pkg import b\n",
        "b.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from pkg.a import Thing
        """,
    })
    graph = import_graph(pkg, "pkg")
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]


def test_checker_finds_longer_cycles_through_function_level_and_relative_imports(tmp_path):
    pkg = _write_package(tmp_path, {
        "a.py": "import pkg.b\n",
        "b.py": "def later():\n    from .c import x\n",
        "c.py": "from . import a\n",
        "d.py": "from pkg.a import y\n",  # imports into the cycle but is not part of it
    })
    graph = import_graph(pkg, "pkg")
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_checker_passes_an_acyclic_package(tmp_path):
    pkg = _write_package(tmp_path, {
        "a.py": "from pkg import b\nimport os\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import X\n",
        "c.py": "import json\n",
    })
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"}
    assert find_cycles(graph) == []


def test_a_registered_service_gets_its_messages_without_the_kernel_knowing_its_class(tmp_path):
    from host.kernel.host_service import HostService
    from host.kernel.kernel import Kernel
    from host.messages import Address, KernelMessage, ProcessId, Request, SendErrorKind
    from host.runtime.wasm import Runtime
    from host.settings import RuntimeSettings

    class Output:
        def __init__(self):
            self.errors = []

        def process_output(self, pid, text, verbosity=0):
            pass

        def info(self, text):
            pass

        def error(self, text):
            self.errors.append(text)

    class Echo(HostService):
        def __init__(self, kernel, pid):
            super().__init__(kernel, pid)
            self.got, self.failed, self.stopped = [], [], False

        def deliver(self, km):
            self.got.append(km.message.body)

        def fail(self, mid, kind):
            self.failed.append((mid, kind))

        def stop(self):
            self.stopped = True

    kernel = Kernel("a.dev", tmp_path, Runtime(RuntimeSettings(cache_dir=tmp_path / "cache")), Output())
    echo, sender = Echo(kernel, ProcessId("echo", "test", "sys")), Echo(kernel, ProcessId("sender", "test", "sys"))
    kernel.register(echo)
    kernel.register(sender)
    kernel.route(KernelMessage(1, sender.address, echo.address, None, Request(body=b"hi"), None), sender)
    assert echo.got == [b"hi"] and sender.failed == []
    # control: an id nobody registered fails back to the sender
    nobody = Address("a.dev", ProcessId("nobody", "test", "sys"))
    kernel.route(KernelMessage(2, sender.address, nobody, None, Request(body=b"hi"), None), sender)
    assert sender.failed == [(2, SendErrorKind.TIMEOUT)] and echo.got == [b"hi"]  # as Kinode: a missing local target
    with pytest.raises(ValueError, match="already running"):
        kernel.register(Echo(kernel, echo.id))
    assert not kernel.kill(echo.id) and not echo.stopped  # the node's services are not the user's to kill
    kernel.shutdown()
    assert echo.stopped and sender.stopped
