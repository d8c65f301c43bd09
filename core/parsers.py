"""DRF parsers (apart from core.api: DRF imports them while it loads its views)."""

from rest_framework import exceptions, parsers


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, with nesting too deep for Python's parser a 400 `invalid_json`
    (DRF lets the RecursionError through: a 500)."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("The JSON body is nested too deeply.", code="invalid_json") from None
