"""The repository stands on its own: no file points at notes outside it, and every docs/upstream.md link resolves."""

import re
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("STACK" + ".md", "../" + "shared")  # spelled in pieces so that this file does not match itself

# Files that other branches were editing when docs/upstream.md replaced the outside notes; their few references
# (comments only) are to be pointed at the section named here once those edits are merged. An entry whose file no
# longer matches fails the test, so this list can only shrink.
PENDING: dict[str, str] = {}


def _text_files() -> dict[str, str]:
    """Tracked and new (not ignored) files of the checkout, as text; binary files are left out."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = {}
    for name in filter(None, out.decode().split("\0")):
        path = ROOT / name
        if path.is_file():
            try:
                files[name] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
    return files


def test_no_file_points_outside_the_repository():
    found = {name for name, text in _text_files().items() if any(word in text for word in FORBIDDEN)}
    assert not found - set(PENDING), f"point these at docs/upstream.md instead: {sorted(found - set(PENDING))}"
    assert not set(PENDING) - found, f"fixed now, drop from PENDING: {sorted(set(PENDING) - found)}"


def test_every_upstream_link_has_its_section():
    files = _text_files()
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', files["docs/upstream.md"]))
    used = {(name, anchor) for name, text in files.items() for anchor in re.findall(r"upstream\.md#([a-z0-9-]+)", text)}
    used |= {("docs/upstream.md", anchor) for anchor in re.findall(r"\]\(#([a-z0-9-]+)\)", files["docs/upstream.md"])}
    assert used, "no file links to docs/upstream.md"
    assert {(name, anchor) for name, anchor in used if anchor not in anchors} == set()
