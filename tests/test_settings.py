"""host/settings.py: defaults written once, the environment read in one place, flags win."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from host import settings
from host.__main__ import build_settings, node_parser
from host.settings import SettingsError, defaults_from

REPO = Path(__file__).resolve().parent.parent


def test_defaults_without_environment():
    d = defaults_from({"HOME": "/home/u"})
    assert (d.compute_limit, d.max_processes, d.pooling, d.fastconv) == (30.0, 1000, False, True)
    assert d.directory == Path("/home/u/.local/share/kinode-py/directory.sqlite")
    assert d.cache_dir == Path("/home/u/.cache/kinode-py/compiled")


def test_each_variable_changes_its_default():
    d = defaults_from({"HOME": "/home/u", "KINODE_COMPUTE_LIMIT": "2.5", "KINODE_MAX_PROCESSES": "7",
                       "KINODE_DIRECTORY": "/x/d.sqlite", "KINODE_POOLING": "1", "KINODE_FASTCONV": "0",
                       "XDG_CACHE_HOME": "/xdg"})
    assert (d.compute_limit, d.max_processes, d.pooling, d.fastconv) == (2.5, 7, True, False)
    assert d.directory == Path("/x/d.sqlite") and d.cache_dir == Path("/xdg/kinode-py/compiled")
    assert defaults_from({"KINODE_CACHE": "/c", "XDG_CACHE_HOME": "/xdg"}).cache_dir == Path("/c")
    assert defaults_from({}).cache_max_mb == 2048 and defaults_from({"KINODE_CACHE_MAX_MB": "64"}).cache_max_mb == 64


@pytest.mark.parametrize("env, message", [
    ({"KINODE_MAX_PROCESSES": "many"}, "KINODE_MAX_PROCESSES='many' is not an integer"),
    ({"KINODE_COMPUTE_LIMIT": "1s"}, "KINODE_COMPUTE_LIMIT='1s' is not a number"),
    ({"KINODE_POOLING": "maybe"}, "KINODE_POOLING='maybe' is not 0 or 1"),
    ({"KINODE_CACHE_MAX_MB": "-1"}, "KINODE_CACHE_MAX_MB=-1 is below 0"),
])
def test_a_bad_variable_is_a_clear_error(env, message):
    with pytest.raises(SettingsError, match=message):
        defaults_from(env)


def test_flags_win_over_the_environment():
    d = defaults_from({"HOME": "/home/u", "KINODE_MAX_PROCESSES": "7", "KINODE_COMPUTE_LIMIT": "3"})
    s = build_settings(node_parser(d).parse_args(["--node", "a.dev", "--max-processes", "9", "--no-fastconv"]), d)
    assert (s.runtime.max_instances, s.compute_limit, s.runtime.fastconv) == (9, 3.0, False)
    assert (s.home, s.port, s.packages) == (settings.DEFAULT_HOME, settings.DEFAULT_PORT, (settings.DEFAULT_PACKAGES,))
    with pytest.raises(SettingsError, match="at least 1"):
        build_settings(node_parser(d).parse_args(["--node", "a.dev", "--max-processes", "0"]), d)


def test_only_the_settings_module_reads_the_environment():
    readers = []
    paths = sorted((REPO / "host").rglob("*.py"))
    assert REPO / "host/net/network.py" in paths   # every room, not only host/'s top level
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in ("environ", "getenv", "environb"):
                readers.append(f"{path.relative_to(REPO / 'host').as_posix()}:{node.lineno}")
    # __main__ hands os.environ to settings.defaults_from, once
    assert [r for r in readers if not r.startswith("settings.py")] == [
        f"__main__.py:{n}" for n in _lines(REPO / "host/__main__.py", "defaults_from(os.environ)")], readers


def _lines(path: Path, text: str) -> list[int]:
    return [i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line]


def test_the_cli_reports_a_bad_variable_before_starting(tmp_path):
    env = dict(os.environ, KINODE_MAX_PROCESSES="lots")
    out = subprocess.run([sys.executable, "-m", "host", "--node", "x.dev", "--home", str(tmp_path / "x")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "KINODE_MAX_PROCESSES='lots' is not an integer" in out.stderr, out.stderr
    assert not (tmp_path / "x").exists()


def test_the_compiled_cache_keeps_the_recently_used_within_its_cap(tmp_path):
    """Each build compiles new components: beyond KINODE_CACHE_MAX_MB the least recently used go, and
    a component loaded from the cache counts as used."""
    import wasmtime

    from host.runtime.wasm import Runtime
    from host.settings import RuntimeSettings
    cache = tmp_path / "cache"
    cache.mkdir()
    old = [cache / f"{i:032x}-old.cwasm" for i in range(6)]
    for age, p in enumerate(old):  # 1 MiB each, old[0] the most recently used
        p.write_bytes(bytes(1 << 20))
        os.utime(p, (1e9 - age * 100, 1e9 - age * 100))
    os.utime(old[5], (2e9, 2e9))  # used after the others: stays
    runtime = Runtime(RuntimeSettings(cache_dir=cache, cache_max_bytes=3 << 20))
    runtime.load(bytes(wasmtime.wat2wasm("(component (core module))")))
    new = [p for p in cache.glob("*.cwasm") if p not in old]
    assert len(new) == 1
    # the new one, then old[5] and old[0] fill the cap with what is under it; the rest went
    assert sorted(cache.glob("*.cwasm")) == sorted([new[0], old[5], old[0]])
    # control: loading it again from the cache touches it, and a cap of 0 keeps only what was just written
    os.utime(new[0], (1e9, 1e9))
    Runtime(RuntimeSettings(cache_dir=cache, cache_max_bytes=3 << 20)).load(
        bytes(wasmtime.wat2wasm("(component (core module))")))
    assert new[0].stat().st_mtime > 1.5e9
    Runtime(RuntimeSettings(cache_dir=cache, cache_max_bytes=0)).load(
        bytes(wasmtime.wat2wasm("(component (core module) (core module))")))
    assert len(list(cache.glob("*.cwasm"))) == 1 and not new[0].exists()


def test_a_start_problem_reads_as_a_line_naming_the_places():
    import errno
    import sqlite3

    from host.__main__ import start_problem
    s = build_settings(node_parser(defaults_from({"HOME": "/home/u"})).parse_args(["--node", "a.dev"]),
                       defaults_from({"HOME": "/home/u"}))
    where = f"home {s.home}, directory /home/u/.local/share/kinode-py/directory.sqlite"
    full = f"the disk is full ({where}); free some space and start it again"
    assert start_problem(OSError(errno.ENOSPC, "No space left on device"), s) == full
    assert start_problem(sqlite3.OperationalError("database or disk is full"), s) == full
    assert start_problem(PermissionError(errno.EACCES, "Permission denied", "/x/y"), s) == \
        f"Permission denied: /x/y ({where})"


@pytest.mark.parametrize("name", ["Bad Name", "Fake.dev", "a,b.dev", "x@y.dev", "-a.dev", "a..dev", "a.dev.", "", "a" * 254])
def test_a_node_name_that_cannot_be_one_is_refused(name):
    d = defaults_from({"HOME": "/home/u"})
    with pytest.raises(SettingsError, match="--node: node name"):
        build_settings(node_parser(d).parse_args([f"--node={name}"]), d)


def test_node_names_as_kinode_writes_them_are_taken():
    d = defaults_from({"HOME": "/home/u"})
    for name in ("fake.dev", "my-node.os", "a", "n0de2.x-y.dev", "a" * 253):
        assert build_settings(node_parser(d).parse_args(["--node", name]), d).name == name
