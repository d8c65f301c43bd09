"""Error answers of the plain (non-DRF) views: `{"detail", "code"}` with a status.

Kept apart from `core.api`, which imports DRF's views (and through them the
authentication classes that raise these).
"""

from django.http import JsonResponse


def error_response(status: int, code: str, detail: str, **extra: object) -> JsonResponse:
    """The error body of every API answer: `detail` and `code`, and `extra` fields (a
    402's `needed` and `available`)."""
    return JsonResponse({"detail": detail, "code": code, **extra}, status=status)


class AuthFailure(Exception):
    """The request is not authenticated (401) or fails CSRF (403); `.response()` is the JSON
    answer to send."""

    def __init__(self, message: str, *, status: int = 401, code: str = "not_authenticated") -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JsonResponse:
        response = error_response(self.status, self.code, self.message)
        if self.status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="api"'
        return response
