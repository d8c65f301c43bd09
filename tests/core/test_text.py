"""core.text: what the database can store, and how provider text is made storable."""

import pytest

from core.text import REPLACEMENT, clean_text, find_unstorable


@pytest.mark.parametrize(("text", "index"), [
    ("", -1),
    ("plain text", -1),
    ("émoji \U0001f600 and CJK 日本", -1),  # a real astral character is one code point, not a pair
    ("\x00", 0),
    ("ab\x00", 2),
    ("a\ud800b", 1),
    ("a\udfffb", 1),
    ("\ud83d\ude00", 0),  # a surrogate *pair* as two str code points is still unstorable
    ("ok\x01\x7f\u200b", -1),  # other control and format characters are storable
])
def test_find_unstorable(text, index):
    assert find_unstorable(text) == index


def test_clean_text_replaces_each_unstorable_code_point():
    assert clean_text("a\x00b\ud800c\udfff") == f"a{REPLACEMENT}b{REPLACEMENT}c{REPLACEMENT}"
    assert find_unstorable(clean_text("\x00\ud800" * 100)) == -1
    assert clean_text("a\x00b").encode() == "a\ufffdb".encode()


def test_clean_text_keeps_storable_text_as_is():
    text = "nothing to clean \U0001f600\n"
    assert clean_text(text) is text
