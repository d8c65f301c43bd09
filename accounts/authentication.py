"""Bearer API keys, for DRF views and for the plain async views that stream."""

from __future__ import annotations

from datetime import timedelta

from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone
from rest_framework import authentication, exceptions

from accounts.models import ApiKey, hash_key
from core.errors import AuthFailure

# last_used_at is informational: write it at most this often, not on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def parse_bearer(header: str) -> str | None:
    """The key from an `Authorization: Bearer <key>` header, '' if malformed, None if absent."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip()


def request_key_hash(request) -> str | None:
    """The hash of the request's Bearer key ("" when the header names no key), or None
    when the request has no Bearer header (a browser session, maybe)."""
    raw = parse_bearer(request.META.get("HTTP_AUTHORIZATION", ""))
    if raw is None:
        return None
    return hash_key(raw) if raw else ""


def key_for_raw(raw_key: str) -> ApiKey | None:
    """The key, neither revoked nor expired, of an active user (its `user` loaded), or None;
    records its use. Read from the database on every request, so a revoked key stops
    working at once on every worker."""
    if not raw_key:
        return None
    key = ApiKey.objects.active().select_related("user").filter(key_hash=hash_key(raw_key)).first()
    if key is None or not key.user.is_active:
        return None
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


def user_for_key(raw_key: str):
    """The active user owning a key neither revoked nor expired, or None."""
    key = key_for_raw(raw_key)
    return key.user if key is not None else None


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <key>`: `request.user` is the key's user and `request.auth`
    the ApiKey row (its limits; `is_restricted`). A browser session's `request.auth` is None."""

    def authenticate(self, request):
        raw = parse_bearer(request.META.get("HTTP_AUTHORIZATION", ""))
        if raw is None:
            return None  # let session authentication try
        key = key_for_raw(raw)
        if key is None:
            # Revoked, expired and unknown keys answer alike: the same 401.
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        return (key.user, key)

    def authenticate_header(self, request) -> str:
        # Makes DRF answer 401 (with WWW-Authenticate), not 403, when no credentials came.
        return 'Bearer realm="api"'


def session_user(request):
    """The browser session's user of a plain (async) Django view, CSRF-checked: for a
    request without a Bearer key (those go through `request_key_hash`).

    Sync: call it inside the view's one `db_call` block. Raises AuthFailure.
    """
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        raise AuthFailure("Authentication credentials were not provided.")
    # Cookies ride along on cross-site requests; a session-authenticated write needs CSRF.
    reason = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
    if reason is not None:
        raise AuthFailure("CSRF check failed.", status=403, code="csrf_failed")
    return user
