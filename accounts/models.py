import hashlib
import secrets
import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

KEY_PREFIX = "pk_"


def hash_key(raw_key: str) -> str:
    # Keys carry 256 bits of randomness, so a plain SHA-256 is enough (no slow KDF needed)
    # and lets the lookup be one indexed equality query.
    return hashlib.sha256(raw_key.encode()).hexdigest()


class ApiKeyQuerySet(models.QuerySet):
    def active(self) -> "ApiKeyQuerySet":
        return self.filter(revoked_at__isnull=True)


class ApiKey(models.Model):
    """A bearer key. Only its hash is stored; the key itself is shown once at creation."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, editable=False, help_text="First characters, to recognise a key.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        indexes = [models.Index(fields=["user", "-created_at"], name="apikey_user_idx")]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

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
