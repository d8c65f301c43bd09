"""Text the database can store.

PostgreSQL's text and jsonb refuse NUL (U+0000), and no UTF-8 encoder accepts an unpaired
surrogate (U+D800-U+DFFF), which a JSON `"\\ud800"` escape produces. A client's text with
either is refused (`find_unstorable`); text from a provider is cleaned (`clean_text`), each
such code point becoming U+FFFD, so what is sent is exactly what is stored.
"""

from __future__ import annotations

import re

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def find_unstorable(text: str) -> int:
    """The index of the first code point that cannot be stored, or -1."""
    match = _UNSTORABLE.search(text)
    return match.start() if match else -1


def clean_text(text: str) -> str:
    """`text` with NUL and unpaired surrogates replaced by U+FFFD (unchanged if it has none)."""
    return _UNSTORABLE.sub(REPLACEMENT, text) if _UNSTORABLE.search(text) else text
