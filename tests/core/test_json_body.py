"""core.json_body.load_json (the plain turn views) and core.parsers.JSONParser (DRF views):
hostile JSON is a 400 code, never an exception that becomes a 500."""

import io

import pytest
from rest_framework import exceptions

from core.json_body import InvalidJson, load_json
from core.parsers import JSONParser

DEEP = [b"[" * 20_000 + b"]" * 20_000, b'{"a":' * 20_000 + b"1" + b"}" * 20_000, b"[" * 20_000]


@pytest.mark.parametrize("raw", DEEP)
def test_load_json_refuses_deep_nesting_as_invalid_json(raw):
    with pytest.raises(InvalidJson) as caught:
        load_json(raw)
    assert caught.value.code == "invalid_json" and caught.value.detail


@pytest.mark.parametrize("raw", [b"\xff\xfe\xfd", b'{"a": "caf\xe9"}', b"{not json", b'{"a": 1} x', b'"\x00"',
                                 b"9" * 5000, b"{", "[1,]"])
def test_load_json_refuses_malformed_json_as_parse_error(raw):
    with pytest.raises(InvalidJson) as caught:
        load_json(raw)
    assert caught.value.code == "parse_error"


@pytest.mark.parametrize(("raw", "value"), [
    (b"", None), (b"null", None), (b"[]", []), (b'{"a": "\\u0000"}', {"a": "\x00"}),
    (b'{"a": "\\ud800"}', {"a": "\ud800"}),  # parsed: the field checks (find_unstorable) refuse it
    ('{"a": "é"}', {"a": "é"}),
])
def test_load_json_parses_what_json_allows(raw, value):
    assert load_json(raw) == value


def parse(raw: bytes):
    return JSONParser().parse(io.BytesIO(raw), "application/json", {"encoding": "utf-8"})


@pytest.mark.parametrize("raw", DEEP)
def test_drf_parser_refuses_deep_nesting_as_invalid_json(raw):
    with pytest.raises(exceptions.ParseError) as caught:
        parse(raw)
    assert caught.value.get_codes() == "invalid_json"


def test_drf_parser_still_parses_and_refuses_malformed_json_as_parse_error():
    assert parse(b'{"title": "x"}') == {"title": "x"}
    with pytest.raises(exceptions.ParseError) as caught:
        parse(b"{not json")
    assert caught.value.get_codes() == "parse_error"
