"""API plumbing shared by every app: error bodies and pagination."""

from __future__ import annotations

from django.http import Http404
from rest_framework import exceptions, pagination
from rest_framework.views import exception_handler as drf_exception_handler


class ApiError(exceptions.APIException):
    """An error with an explicit status and machine code: `raise ApiError(400, "unknown_model", "...")`."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status_code = status
        super().__init__(detail=detail, code=code)


def _first_error(detail, codes, path: str = "") -> tuple[str, str]:
    """Flatten DRF's nested validation errors to one message and one code."""
    if isinstance(detail, dict):
        field, value = next(iter(detail.items()))
        name = field if field != "non_field_errors" else ""
        return _first_error(value, codes[field], f"{path}.{name}".strip(".") if name else path)
    if isinstance(detail, list):
        return _first_error(detail[0], codes[0], path)
    message = str(detail)
    return (f"{path}: {message}" if path else message), str(codes)


# DRF's CharField refuses NUL and unpaired surrogates (text PostgreSQL cannot store, or no
# UTF-8 encoder can write); SPEC 10 names both `invalid_text`, as the turn endpoints do.
_TEXT_CODES = {"null_characters_not_allowed": "invalid_text", "surrogate_characters_not_allowed": "invalid_text"}


def exception_handler(exc, context):
    """Every API error body is `{"detail": "...", "code": "..."}`."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        detail, code = _first_error(exc.detail, exc.get_codes())
        # DRF's generic codes become ours: a bad body is `invalid`, unless a field said more.
        if code in {"invalid", "required", "null", "blank", "max_length", "min_length",
                    "max_value", "min_value", "invalid_choice", "max_string_length"}:
            code = f"invalid_{code}" if code != "invalid" else "invalid"
        code = _TEXT_CODES.get(code, code)
        response.data = {"detail": detail, "code": code}
    elif isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        response.data = {"detail": str(exc.detail), "code": codes if isinstance(codes, str) else "error"}
    return response


class Pagination(pagination.PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200
