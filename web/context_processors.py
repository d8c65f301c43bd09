"""Template context for the Content-Security-Policy (web/csp.py)."""

from django.http import HttpRequest


def csp_nonce(request: HttpRequest) -> dict:
    """`csp_nonce` for Django's `{% csp_nonce_attr %}` (the admin's templates use it): django-csp's
    lazy nonce, made and put in the header's script-src and style-src only by a page that
    renders it. The chat page renders none, so its policy has no nonce: 'self' only."""
    return {"csp_nonce": getattr(request, "csp_nonce", None)}
