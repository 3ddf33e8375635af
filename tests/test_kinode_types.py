"""host/kinode_types.py: the one set of Kinode ids and naming rules, shared by the host and guests."""
from __future__ import annotations

import ast
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host import kinode_types as kt  # noqa: E402
from host import messages as host_types  # noqa: E402

BAD_PART_CHARS = "@:/\\" + "".join(map(chr, range(32))) + "".join(map(chr, range(0x7F, 0xA0)))
parts = st.text(st.characters(blacklist_characters=BAD_PART_CHARS, blacklist_categories=("Cs",)), min_size=1)


@given(parts, parts, parts, parts)
def test_valid_ids_round_trip(node, process, package, publisher):
    text = f"{node}@{process}:{package}:{publisher}"
    a = kt.Address.parse(text)
    assert str(a) == text and a == kt.Address(node, kt.ProcessId(process, package, publisher))
    assert str(kt.ProcessId.parse(str(a.process))) == f"{process}:{package}:{publisher}"
    assert str(kt.PackageId.parse(f"{package}:{publisher}")) == f"{package}:{publisher}"
    assert a.package_id() == a.process.package_id == kt.PackageId(package, publisher)


@given(parts, parts, parts, parts, st.sampled_from(BAD_PART_CHARS), st.integers(0, 3))
def test_a_bad_character_in_any_part_is_refused(node, process, package, publisher, bad, where):
    pieces = [node, process, package, publisher]
    pieces[where] += bad
    text = f"{pieces[0]}@{pieces[1]}:{pieces[2]}:{pieces[3]}"
    with pytest.raises(kt.ParseError):
        kt.Address.parse(text)


@pytest.mark.parametrize("text,why", [
    ("node", "expected node@process:package:publisher"),
    ("a@b@c:d:e", "expected node@process:package:publisher"),
    ("a@b:c", "expected process:package:publisher"),
    ("a@b:c:d:e", "expected process:package:publisher"),
    ("@b:c:d", "empty part"),
    ("a@b::d", "empty part"),
    ("a\\b@c:d:e", "bad character"),
    ("a@c:d\x7f:e", "bad character"),
    ("a@c:d:e\n", "bad character"),
])
def test_invalid_addresses_get_a_clear_error(text, why):
    with pytest.raises(kt.ParseError, match=why.replace("(", r"\(")):
        kt.Address.parse(text)
    assert issubclass(kt.ParseError, ValueError)  # callers that catch ValueError still do


def test_package_id_needs_exactly_two_parts():
    assert kt.PackageId.parse("file_transfer:template.os") == kt.PackageId("file_transfer", "template.os")
    for bad in ("file_transfer", "a:b:c", "a:", ":b", "a/b:c"):
        with pytest.raises(kt.ParseError):
            kt.PackageId.parse(bad)


def test_the_host_uses_the_shared_types():
    assert host_types.Address is kt.Address and host_types.ProcessId is kt.ProcessId
    assert host_types.PackageId is kt.PackageId and host_types.ParseError is kt.ParseError


def test_guests_use_the_shared_types_and_it_imports_only_the_standard_library():
    core = (REPO / "components/process_lib/core.py").read_text()
    assert "from host.kinode_types import Address, PackageId, ParseError, ProcessId" in core
    assert "class Address" not in core and "class ProcessId" not in core
    tree = ast.parse((REPO / "host/kinode_types.py").read_text())
    imported = {n.names[0].name.split(".")[0] if isinstance(n, ast.Import) else n.module.split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    for guest in ("file_transfer/common/ft_common.py", "courier/courier/main.py"):
        text = (REPO / "components" / guest).read_text()
        assert "check_file_name" in text and "unicodedata" not in text


# ---- the file-name rule --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["my_file.txt", "a", "x" * 255, "é" * 127, "with space", "a..b", "日本語.txt",
                                  "trailing.", "a:b@c"])
def test_plain_file_names_pass(name):
    assert kt.check_file_name(name) == ""


@pytest.mark.parametrize("name,why", [
    ("", "empty"), (None, "empty"), (42, "empty"),
    ("x" * 256, "longer than 255 bytes"), ("é" * 128, "longer than 255 bytes"),
    (".", "may not start with '.'"), ("..", "may not start with '.'"), (".hidden", "may not start with '.'"),
    ("a/b", "path separator"), ("a\\b", "path separator"), ("a\x00b", "control character"),
    ("tab\there", "control character"), ("del\x7f", "control character"), ("c1\x85", "control character"),
    ("lone\ud800", "control character"),
])
def test_other_file_names_are_refused_with_a_reason(name, why):
    assert why in kt.check_file_name(name)


@given(st.text(max_size=300))
def test_file_name_rule_matches_its_definition(name):
    """Refused exactly when empty, over 255 bytes, hidden, holding a separator, a control or an
    invisible formatting character, or not in NFC."""
    plain = (0 < len(name.encode("utf-8", "surrogatepass")) <= 255 and not name.startswith(".")
             and not any(c in "/\\" or unicodedata.category(c) in ("Cc", "Cs", "Cf", "Zl", "Zp") for c in name)
             and unicodedata.normalize("NFC", name) == name)
    assert (kt.check_file_name(name) == "") == plain


# ---- names cannot lie --------------------------------------------------------------------------
FORMAT_CHARS = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf"]
plain_names = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Cf", "Zl", "Zp"), blacklist_characters="/\\"),
                      min_size=1, max_size=60).map(lambda n: unicodedata.normalize("NFC", n)).filter(
                          lambda n: not n.startswith(".") and kt.check_file_name(n) == "")


@pytest.mark.parametrize("name,code", [
    ("rtl\u202etxt.exe", "U+202E"), ("isolate\u2066x\u2069.txt", "U+2066"), ("lrm\u200e.txt", "U+200E"),
    ("zero\u200bwidth", "U+200B"), ("joiner\u200d.txt", "U+200D"), ("non\u200cjoiner", "U+200C"),
    ("bom\ufeff.txt", "U+FEFF"), ("soft\u00adhyphen", "U+00AD"), ("word\u2060joiner", "U+2060"),
    ("line\u2028sep", "U+2028"), ("para\u2029sep", "U+2029"), ("tag\U000e0041.txt", "U+E0041"),
])
def test_invisible_formatting_characters_are_refused(name, code):
    assert "invisible formatting character" in kt.check_file_name(name) and code in kt.check_file_name(name)


@given(plain_names, st.sampled_from(FORMAT_CHARS + ["\u2028", "\u2029"]), st.integers(0, 60))
def test_a_format_character_anywhere_is_refused(name, bad, at):
    at = min(at, len(name))
    assert kt.check_file_name(name) == ""  # the control: the name without it passes
    assert kt.check_file_name(name[:at] + bad + name[at:]) != ""


def test_nfc_and_nfd_look_alikes_are_one_name():
    composed, decomposed = "caf\u00e9.txt", "cafe\u0301.txt"
    assert kt.check_file_name(composed) == ""
    assert "not in Unicode NFC form" in kt.check_file_name(decomposed) and "caf\\xe9.txt" in kt.check_file_name(decomposed)
    assert kt.nfc(decomposed) == composed and kt.nfc(None) is None and kt.nfc(42) == 42
    assert "not in Unicode NFC form" in kt.check_relative_path(f"album/{decomposed}", 4)
    assert kt.check_file_name("\u212b") != "" and kt.check_file_name(kt.nfc("\u212b")) == ""  # ANGSTROM SIGN -> Å


@given(st.text(max_size=80))
def test_accepted_names_are_their_own_single_spelling(text):
    """Of all the canonically equivalent spellings of a name, the rule takes at most one (its NFC):
    two accepted names that look the same are the same string."""
    spellings = {unicodedata.normalize(form, text) for form in ("NFC", "NFD")} | {text}
    assert len({s for s in spellings if kt.check_file_name(s) == ""}) <= 1
    # and normalizing a person's input never makes a name the rule refuses for its spelling
    assert "NFC" not in kt.check_file_name(kt.nfc(text))


@pytest.mark.parametrize("path,why", [
    ("a/b/c.txt", ""), ("one.txt", ""),
    ("", "file name is empty"), (None, "file name is empty"),
    ("a/../b", "may not start with '.'"), ("a//b", "file name is empty"), ("/abs", "file name is empty"),
    ("a/.git/x", "may not start with '.'"), ("a\\b/c", "path separator"),
    ("/".join(["d"] * 5), "deeper than 4 levels (the limit)"),
])
def test_relative_paths_follow_the_file_name_rule_in_every_part(path, why):
    got = kt.check_relative_path(path, 4)
    assert (why in got and got != "") if why else got == "", got
