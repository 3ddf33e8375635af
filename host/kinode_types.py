"""Kinode's identities and naming rules, shared by the host and the guests.

Standard library only: build.sh stages this file as the module `host.kinode_types` beside
process_lib, so a guest parses an address exactly as the host does.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import overload

MAX_FILE_NAME_BYTES = 255

# Names taken in an upload drive (a Bind's `upload_to`), one empty-or-text file per name, so the
# HTTP server and the drive's package refuse each other's use of a name in flight. Each side makes
# its own mark first and then looks for the other's, so of two racing uses at least one is refused.
UPLOADING_DIR = ".partial/.uploading"      # the HTTP server's: NAME is being uploaded
DOWNLOADING_DIR = ".partial/.downloading"  # the package's: NAME is being downloaded (text: from where)

# a part of an id may not hold its separators, a path separator or a control character
_BAD_PART_CHAR = re.compile(r"[@:/\\\x00-\x1f\x7f-\x9f]")
# a file name may not hold a path separator, a control character or a lone surrogate
_BAD_NAME_CHAR = re.compile("[/\\\\\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class ParseError(ValueError):
    """A malformed address, process id or package id."""


def _check_part(part: str, what: str, text: str) -> str:
    if not part:
        raise ParseError(f"{what} {text!r}: empty part")
    if _BAD_PART_CHAR.search(part):
        raise ParseError(f"{what} {text!r}: bad character in {part!r}")
    return part


@dataclass(frozen=True)
class PackageId:
    package_name: str
    publisher_node: str

    @classmethod
    def parse(cls, text: str) -> PackageId:
        parts = text.split(":")
        if len(parts) != 2:
            raise ParseError(f"package id {text!r}: expected package:publisher")
        return cls(*(_check_part(p, "package id", text) for p in parts))

    def __str__(self) -> str:
        return f"{self.package_name}:{self.publisher_node}"


@dataclass(frozen=True)
class ProcessId:
    process_name: str
    package_name: str
    publisher_node: str

    @classmethod
    def parse(cls, text: str) -> ProcessId:
        parts = text.split(":")
        if len(parts) != 3:
            raise ParseError(f"process id {text!r}: expected process:package:publisher")
        return cls(*(_check_part(p, "process id", text) for p in parts))

    @property
    def package_id(self) -> PackageId:
        return PackageId(self.package_name, self.publisher_node)

    def __str__(self) -> str:
        return f"{self.process_name}:{self.package_name}:{self.publisher_node}"


@dataclass(frozen=True)
class Address:
    node: str
    process: ProcessId

    @classmethod
    def parse(cls, text: str) -> Address:
        node, at, rest = text.partition("@")
        if not at or "@" in rest:
            raise ParseError(f"address {text!r}: expected node@process:package:publisher")
        return cls(_check_part(node, "address", text), ProcessId.parse(rest))

    def package_id(self) -> PackageId:
        """A method, as in kinode_process_lib (ProcessId's is a property, as the host uses it)."""
        return self.process.package_id

    def __str__(self) -> str:
        return f"{self.node}@{self.process}"


# invisible characters that change how a name reads: format characters (bidi controls such as U+202E,
# which shows `rtl\u202etxt.exe` as `rtlexe.txt`, zero-width spaces and joiners, soft hyphen, BOM) and
# the line and paragraph separators
INVISIBLE_CATEGORIES = frozenset({"Cf", "Zl", "Zp"})


@overload
def nfc(name: str) -> str: ...
@overload
def nfc(name: object) -> object: ...


def nfc(name: object) -> object:
    """A name as a person's input becomes one the rule takes: its Unicode NFC form (a Mac sends `é` as
    `e` + U+0301). Not a string: returned as is, for the rule to refuse."""
    return unicodedata.normalize("NFC", name) if isinstance(name, str) else name


def check_file_name(name: object) -> str:
    """Why `name` is not a plain file name (one path component, not hidden, nothing invisible, in
    Unicode NFC form), or '' if it is.

    A name is compared and stored as given, so the rule takes one spelling only, NFC: two names
    that look the same are the same string. Where a person's input enters (an upload, a typed
    name), it is passed through `nfc` first; a peer must send NFC names."""
    if not isinstance(name, str) or not name:
        return "file name is empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES:
        return f"file name is longer than {MAX_FILE_NAME_BYTES} bytes"
    if name.startswith("."):
        return f"file name {name!r} may not start with '.'"
    if _BAD_NAME_CHAR.search(name):
        return f"file name {name!r} holds a path separator or control character"
    for c in name:
        if unicodedata.category(c) in INVISIBLE_CATEGORIES:
            return f"file name {name!r} holds an invisible formatting character (U+{ord(c):04X}) that can disguise it"
    if not unicodedata.is_normalized("NFC", name):
        # ascii(): the two spellings look the same on screen
        return f"file name {ascii(name)} is not in Unicode NFC form ({ascii(unicodedata.normalize('NFC', name))} is)"
    return ""


MAX_NODE_NAME = 253   # as a DNS name
_NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


def check_node_name(name: object) -> str:
    """Why `name` is not a node name (lowercase letters, digits and hyphens in dot-separated labels,
    as `fake.dev` or `my-node.os`), or '' if it is. It never holds a comma, a space or an `@`."""
    if not isinstance(name, str) or not name:
        return "node name is empty"
    if len(name) > MAX_NODE_NAME:
        return f"node name is longer than {MAX_NODE_NAME} characters"
    if not _NODE_NAME.fullmatch(name):
        return (f"node name {name!r} may hold only lowercase letters, digits and hyphens, in labels "
                f"separated by dots (e.g. fake.dev)")
    return ""


def check_relative_path(path: object, max_depth: int) -> str:
    """Why `path` is not a relative path of plain file names (`trip/day1/a.jpg`, at most `max_depth`
    parts: a folder's entry, a browser's folder upload), or '' if it is."""
    if not isinstance(path, str) or not path:
        return "file name is empty"
    parts = path.split("/")
    if len(parts) > max_depth:
        return f"deeper than {max_depth} levels (the limit): {path[:200]!r}"
    for part in parts:
        problem = check_file_name(part)
        if problem:
            return f"{path[:200]!r}: {problem}" if len(parts) > 1 else problem
    return ""


def vfs_path_problem(path: object, *, exact: bool = False, relative: bool = False) -> str:
    """Why `path` may not name a place in the VFS, or '' if it may: the one VFS path rule, for the
    host and the guests. Parts are split on '/'; a `..` part, a backslash or a NUL is refused in every
    path. `exact`: an empty or `.` part is refused too (a path built by a program, where a request's
    `//` and `/./` would merely collapse). `relative`: no leading '/' and no drive letter (`C:`)."""
    if not isinstance(path, str):
        return "is not a string"
    if "\x00" in path:
        return "contains a NUL byte"
    if "\\" in path:
        return "contains a backslash"
    if relative and (path.startswith("/") or (len(path) > 1 and path[1] == ":")):
        return "is absolute"
    parts = path.split("/")
    if ".." in parts:
        return "may not contain '..'"
    if exact and any(p in ("", ".") for p in parts):
        return "has an empty or '.' part"
    return ""
