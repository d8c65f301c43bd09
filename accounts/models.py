import hashlib
import secrets
import uuid
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

KEY_PREFIX = "pk_"


def hash_key(raw_key: str) -> str:
    # Keys carry 256 bits of randomness, so a plain SHA-256 is enough (no slow KDF needed)
    # and lets the lookup be one indexed equality query.
    return hashlib.sha256(raw_key.encode()).hexdigest()


class ApiKeyQuerySet(models.QuerySet):
    def active(self) -> "ApiKeyQuerySet":
        """Keys neither revoked nor expired."""
        return self.filter(revoked_at__isnull=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=timezone.now()))


class BudgetPeriod(models.TextChoices):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    TOTAL = "total"


class ApiKey(models.Model):
    """A bearer key. Only its hash is stored; the key itself is shown once at creation.

    It may carry limits (SPEC section 16; null: none), enforced in every turn's preflight by
    sessions_app.limits, exactly under concurrency: `rpm` turns started per rolling 60 s,
    `tpm` tokens per rolling 60 s (running turns count their reservation), `max_parallel`
    turns running at once, `budget` credits per `budget_period` (calendar periods in UTC, or
    `total`), `allowed_models` an allow-list (`models` in the API), `expires_at` after which
    the key is refused (401).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys",
                             db_index=False)  # apikey_user_idx is its index
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, editable=False, help_text="First characters, to recognise a key.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    rpm = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)],
                                      help_text="Turns started per rolling 60 seconds; blank: no limit.")
    tpm = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)],
                                      help_text="Tokens (prompt + completion) per rolling 60 seconds; running turns "
                                                "count what they may use. Blank: no limit.")
    max_parallel = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)],
                                               help_text="Turns running at once; blank: no limit.")
    budget = models.DecimalField(max_digits=20, decimal_places=6, null=True, blank=True,
                                 validators=[MinValueValidator(Decimal(0))],
                                 help_text="Credits this key may spend per budget period; blank: no limit.")
    budget_period = models.CharField(max_length=8, choices=BudgetPeriod.choices, blank=True,
                                     help_text="Calendar day, week (from Monday) or month in UTC, or total.")
    # `models` in the API (SPEC section 16).
    allowed_models = models.JSONField(null=True, blank=True, help_text='The models this key may use, e.g. '
                                                                       '["m1", "m2"]; blank: any priced model.')
    expires_at = models.DateTimeField(null=True, blank=True, help_text="After this the key is refused (401).")

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        indexes = [models.Index(fields=["user", "-created_at"], name="apikey_user_idx")]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None and not self.is_expired

    @property
    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    @property
    def is_restricted(self) -> bool:
        """Any limit, allow-list or expiry: such a key may not manage keys (SPEC section 16)."""
        return any(value is not None for value in (self.rpm, self.tpm, self.max_parallel, self.budget,
                                                   self.allowed_models, self.expires_at))

    def clean(self) -> None:
        if (self.budget is None) != (not self.budget_period):
            raise ValidationError("A budget needs a budget period, and a budget period a budget.")
        allowed = self.allowed_models
        if allowed is not None and (not isinstance(allowed, list) or not all(
                isinstance(name, str) and name for name in allowed)):
            raise ValidationError({"allowed_models": "A list of model names."})

    @classmethod
    def issue(cls, *, user, name: str = "") -> tuple["ApiKey", str]:
        """Create a key; returns the row and the raw key, which is never stored."""
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(user=user, name=name, prefix=raw[:10], key_hash=hash_key(raw))
        return key, raw

    def revoke(self) -> None:
        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])


class LoginAttempt(models.Model):
    """A password login (the chat page's or the admin's) that was tried and has not
    succeeded: while its password is being checked, and then, if it failed, for
    PANTHEON_LOGIN_WINDOW_SECONDS. accounts.login_limit counts these rows per username and
    per client address; being rows of the database, the counts hold across every worker."""

    id = models.BigAutoField(primary_key=True)
    # Case-folded; "" once the user logged in (the row then counts for the address only).
    username = models.CharField(max_length=150, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        indexes = [
            models.Index(fields=["username", "created_at"], name="loginattempt_user_idx"),
            models.Index(fields=["ip", "created_at"], name="loginattempt_ip_idx"),
            models.Index(fields=["created_at"], name="loginattempt_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.username or '-'} from {self.ip or '?'}"
