"""The corpus builder renders man pages without a shell: a file name is data, never a command."""

from __future__ import annotations

import gzip
import shutil

import pytest

from moelens.training.corpus import _render_man_page

PAGE = b""".TH DEMO 1 "2026" "moelens" "User Commands"
.SH NAME
demo \\- a page written by this test
.SH DESCRIPTION
Renders the same whatever its file is called. The builder keeps pages of more than two hundred
characters, so this one says a little more: it names no command, touches no file, and exists only
to be rendered by man and col into plain text.
.SH AUTHOR
Nobody.
"""


@pytest.mark.skipif(shutil.which("man") is None or shutil.which("col") is None, reason="man and col (man-db, bsdextrautils) are not installed")
def test_a_man_page_renders_whatever_its_file_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rendered = []
    for name in ["plain.1.gz", "it's \"quoted\" $(touch pwned) `touch pwned`.1.gz"]:
        (tmp_path / name).write_bytes(gzip.compress(PAGE))
        rendered.append(_render_man_page(tmp_path / name))
    assert "a page written by this test" in rendered[0] and "Renders the same" in rendered[0]
    assert rendered[1] == rendered[0]
    assert not (tmp_path / "pwned").exists()
