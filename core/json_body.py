"""Parsing a JSON request body without letting hostile input become a 500."""

from __future__ import annotations

import json
from typing import Any


class InvalidJson(ValueError):
    """The body is not JSON we accept; `code` is the error code to answer with (400)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def load_json(raw: bytes | str) -> Any:
    """The parsed body. Raises InvalidJson: `parse_error` for malformed JSON or bytes that are
    not UTF-8, `invalid_json` for nesting deeper than the parser can follow."""
    try:
        return json.loads(raw or b"null")
    except RecursionError:
        raise InvalidJson("invalid_json", "The JSON body is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidJson("parse_error", "The body is not valid JSON.") from None
