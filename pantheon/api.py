"""API plumbing shared by every app: error bodies, pagination, money format, and
authentication for the plain (non-DRF) async views."""

from __future__ import annotations

from decimal import Decimal

from django.http import Http404, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from rest_framework import exceptions, pagination
from rest_framework.views import exception_handler as drf_exception_handler

from accounts.authentication import parse_bearer, user_for_key
from billing_app.services import quantize_money


class ApiError(exceptions.APIException):
    """An error with an explicit status and machine code: `raise ApiError(400, "unknown_model", "...")`."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status_code = status
        super().__init__(detail=detail, code=code)


def error_response(status: int, code: str, detail: str) -> JsonResponse:
    return JsonResponse({"detail": detail, "code": code}, status=status)


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
        response.data = {"detail": detail, "code": code}
    elif isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        response.data = {"detail": str(exc.detail), "code": codes if isinstance(codes, str) else "error"}
    return response


class Pagination(pagination.PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200


def format_money(value: Decimal) -> str:
    """Money on the wire: a decimal string with exactly 6 places."""
    return f"{quantize_money(Decimal(value)):f}"


class AuthFailure(Exception):
    """Raised by `authenticate_request`; `.response()` is the JSON answer to send."""

    def __init__(self, message: str, *, status: int = 401, code: str = "not_authenticated") -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JsonResponse:
        response = error_response(self.status, self.code, self.message)
        if self.status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="api"'
        return response


def authenticate_request(request):
    """The user of a plain Django view: Bearer key, else the browser session (CSRF-checked).

    Sync: call it inside the view's one `sync_to_async` block. Raises AuthFailure.
    """
    raw = parse_bearer(request.META.get("HTTP_AUTHORIZATION", ""))
    if raw is not None:
        user = user_for_key(raw)
        if user is None:
            raise AuthFailure("Invalid or revoked API key.", code="authentication_failed")
        return user
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        raise AuthFailure("Authentication credentials were not provided.")
    # Cookies ride along on cross-site requests; a session-authenticated write needs CSRF.
    reason = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
    if reason is not None:
        raise AuthFailure("CSRF check failed.", status=403, code="csrf_failed")
    return user
