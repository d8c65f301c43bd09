"""The login rate limit of the password forms: the chat page's `/accounts/login/` and the
admin's `/admin/login/` (API keys are not guessable and are not limited here).

A username with PANTHEON_LOGIN_FAILURES_PER_USER failed logins in the last
PANTHEON_LOGIN_WINDOW_SECONDS, or a client address with PANTHEON_LOGIN_FAILURES_PER_IP,
gets no further password check until its oldest failures leave the window: the chat page
answers 429 with `Retry-After`, the admin shows the same message on its form. A successful
login clears the username's failures (they still count for the addresses they came from).

The counts are rows of the database (`LoginAttempt`), so they hold across every worker
process, and they are race-free: an attempt's row is written (and committed) *before* its
password is checked, and the attempt counts the rows already there, its own included. Of N
concurrent attempts at most the limit get a password check; a refused attempt deletes its
row, so hammering a locked username does not lengthen its lock. Rows older than the window
are deleted as new attempts come in.

An address is the client's IP (`REMOTE_ADDR`, or with PANTHEON_TRUSTED_PROXY_COUNT proxies
in front, the address the outermost of them saw in `X-Forwarded-For`); an IPv6 address
counts as its /64, since one host usually has a whole /64 to pick from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
from datetime import timedelta

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from accounts.models import LoginAttempt

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Refused:
    """Too many failures: for the `username` or the `address`; try again in `retry_after` s."""

    reason: str  # "username" or "address"
    retry_after: int

    @property
    def message(self) -> str:
        minutes = max(1, math.ceil(self.retry_after / 60))
        wait = "1 minute" if minutes == 1 else f"{minutes} minutes"
        source = "for this username" if self.reason == "username" else "from your network address"
        return f"Too many failed login attempts {source}. Please wait {wait} and try again."


def client_address(request) -> str | None:
    """The address a login is counted against (see the module docstring), or None."""
    if request is None:
        return None
    raw = request.META.get("REMOTE_ADDR", "")
    proxies = settings.PANTHEON_TRUSTED_PROXY_COUNT
    if proxies:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        forwarded = [part for part in forwarded if part]
        # Each proxy appends the address it was reached from; entries before those of our
        # own proxies are whatever the client chose to send.
        if len(forwarded) >= proxies:
            raw = forwarded[-proxies]
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return None
    if address.version == 6:
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False).network_address)
    return str(address)


def _key(username: str) -> str:
    return username.casefold()[:150]


def begin(username: str, address: str | None) -> int | Refused:
    """Record a login attempt about to check its password: its row's id, or Refused (no row
    left behind). Must not run inside a transaction: the row has to be visible to concurrent
    attempts before this one counts."""
    now = timezone.now()
    window = timedelta(seconds=settings.PANTHEON_LOGIN_WINDOW_SECONDS)
    since = now - window
    LoginAttempt.objects.filter(created_at__lt=since).delete()
    key = _key(username)
    attempt = LoginAttempt.objects.create(username=key, ip=address, created_at=now)
    for reason, lookup, limit in (("username", {"username": key}, settings.PANTHEON_LOGIN_FAILURES_PER_USER),
                                  ("address", {"ip": address}, settings.PANTHEON_LOGIN_FAILURES_PER_IP)):
        if not next(iter(lookup.values())):
            continue
        recent = LoginAttempt.objects.filter(**lookup, created_at__gte=since)
        if recent.count() <= limit:
            continue
        attempt.delete()
        # Allowed again once fewer than `limit` others are left in the window. One read:
        # counted and indexed apart, concurrent attempts deleting theirs in between made
        # the index miss (an IndexError, a 500).
        others = list(recent.order_by("created_at").values_list("created_at", flat=True))
        count = len(others)
        if count < limit:  # some left the window meanwhile
            return Refused(reason, 1)
        oldest_to_leave = others[count - limit]
        return Refused(reason, max(1, math.ceil((oldest_to_leave + window - now).total_seconds())))
    return attempt.pk


def succeeded(attempt_id: int, username: str) -> None:
    """The password was right: this attempt is no failure, and the username starts afresh."""
    LoginAttempt.objects.filter(pk=attempt_id).delete()
    LoginAttempt.objects.filter(username=_key(username)).update(username="")


class RateLimitedLogin:
    """For an AuthenticationForm: the password is only checked when the limit allows it.
    After `is_valid()`, `refused` is the Refused of a refused attempt (else None)."""

    refused: Refused | None = None

    @sensitive_variables("password")
    def clean(self):
        username = self.cleaned_data.get("username")
        password = self.cleaned_data.get("password")
        if username is None or not password:  # no password is checked
            return super().clean()
        outcome = begin(username, client_address(self.request))
        if isinstance(outcome, Refused):
            self.refused = outcome
            logger.warning("login refused: too many failures for this %s (address %s; retry after %d s)",
                           outcome.reason, client_address(self.request) or "unknown", outcome.retry_after)
            raise ValidationError(outcome.message, code="too_many_attempts")
        cleaned = super().clean()  # a ValidationError leaves the attempt counted as a failure
        succeeded(outcome, username)
        return cleaned


class LoginForm(RateLimitedLogin, AuthenticationForm):
    pass


class AdminLoginForm(RateLimitedLogin, AdminAuthenticationForm):
    pass
