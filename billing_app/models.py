import uuid
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

# Credits are stored with 6 decimal places (SPEC section 7).
MONEY = {"max_digits": 20, "decimal_places": 6}
# A catalogue model's configured fallbacks, at most (a request's `models` has its own bound).
MAX_FALLBACKS = 8


class Wallet(models.Model):
    """One per user. `balance` is a cache of the ledger's sum and `held` of the open holds'
    sum, both written only by billing_app.services, so a hold is one conditional UPDATE of
    this row (`balance - held >= amount`) instead of a lock held over an aggregate."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="wallet")
    balance = models.DecimalField(**MONEY, default=Decimal("0"))
    held = models.DecimalField(**MONEY, default=Decimal("0"))
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(held__gte=0), name="wallet_held_not_negative")]

    def __str__(self) -> str:
        return f"Wallet of {self.user} ({self.balance})"


class LedgerEntry(models.Model):
    class Kind(models.TextChoices):
        GRANT = "grant"
        DEBIT = "debit"
        REFUND = "refund"
        ADJUSTMENT = "adjustment"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="entries")
    # ledger_user_idx is its index: none of its own, which every entry would write too.
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="ledger_entries",
                             db_index=False)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    amount = models.DecimalField(**MONEY)
    balance_after = models.DecimalField(**MONEY)
    # Plain UUID, not a foreign key: the debit is written in the same transaction as the
    # turn, and a ledger entry must outlive anything it refers to.
    turn_id = models.UUIDField(null=True, blank=True)
    note = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        verbose_name_plural = "ledger entries"
        indexes = [models.Index(fields=["user", "-created_at"], name="ledger_user_idx")]
        constraints = [
            # A turn is debited at most once, whatever retries or races happen.
            models.UniqueConstraint(fields=["turn_id"], condition=Q(kind="debit"), name="ledger_one_debit_per_turn"),
            # ... and adjusted at most once, when its estimate is reconciled.
            models.UniqueConstraint(fields=["turn_id"], condition=Q(kind="adjustment"),
                                    name="ledger_one_adjustment_per_turn"),
            models.CheckConstraint(condition=~Q(kind="debit") | Q(amount__lte=0), name="ledger_debit_not_positive"),
            models.CheckConstraint(condition=~Q(kind="grant") | Q(amount__gt=0), name="ledger_grant_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount}"


class CreditHoldQuerySet(models.QuerySet):
    def open(self) -> "CreditHoldQuerySet":
        """Holds that still reserve credits: every hold until its turn settles."""
        return self.filter(released_at__isnull=True)


class CreditHold(models.Model):
    """Credits reserved by the preflight for one turn until it settles. A hold has no clock of
    its own: it lives as long as its turn's lease, and the sweep settles a turn whose lease
    lapsed (sessions_app.turns), which releases it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    wallet = models.ForeignKey(Wallet, on_delete=models.CASCADE, related_name="holds")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="credit_holds",
                             db_index=False)  # hold_user_idx is its index
    turn_id = models.UUIDField(unique=True)
    model = models.CharField(max_length=200)
    amount = models.DecimalField(**MONEY)
    max_tokens = models.PositiveIntegerField()
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    released_at = models.DateTimeField(null=True, blank=True)

    objects = CreditHoldQuerySet.as_manager()

    class Meta:
        indexes = [
            models.Index(fields=["user", "-created_at"], name="hold_user_idx"),
            models.Index(fields=["wallet"], condition=Q(released_at__isnull=True), name="hold_open_idx"),
        ]
        constraints = [models.CheckConstraint(condition=Q(amount__gte=0), name="hold_amount_not_negative")]

    def __str__(self) -> str:
        return f"hold {self.amount} for turn {self.turn_id}"


# Provider names that are not rows: they mean the provider the settings configure (SPEC 15).
BUILTIN_PROVIDERS = frozenset({"openrouter", "fake", "default"})

provider_name_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9_.-]{0,99}$", "A provider name is lower-case letters, digits, '.', '_' and '-'.")


def _not_builtin(name: str) -> None:
    if name in BUILTIN_PROVIDERS:
        raise ValidationError(f"{name!r} is the provider the settings configure; give this one another name.")


class Provider(models.Model):
    """An OpenAI-compatible upstream a catalogue model can be served by (SPEC section 15):
    vLLM, Ollama, llama.cpp, another OpenRouter account. The provider the settings configure
    (`OPENROUTER_*`, or the offline `fake`) is no row: a model without a provider uses it."""

    name = models.CharField(max_length=100, unique=True, validators=[provider_name_validator, _not_builtin])
    base_url = models.URLField(max_length=500, help_text="The OpenAI-compatible API root, e.g. "
                                                         "http://127.0.0.1:8000/v1 (POST {base_url}/chat/completions).")
    api_key_env = models.CharField(
        max_length=100, blank=True, validators=[RegexValidator(r"^[A-Za-z_][A-Za-z0-9_]*$", "An environment "
                                                               "variable name.")],
        help_text="The environment variable holding the key (preferred: the key stays out of the database).")
    api_key = models.CharField(max_length=500, blank=True,
                               help_text="The key itself, when it is not in the environment. Blank: none.")
    timeout_seconds = models.FloatField(null=True, blank=True,
                                        validators=[MinValueValidator(0.1), MaxValueValidator(3600)],
                                        help_text="Connect/read timeout; blank: PANTHEON_UPSTREAM_TIMEOUT_SECONDS.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.api_key_env and self.api_key:
            raise ValidationError("Give the key's environment variable or the key, not both.")


class ModelPrice(models.Model):
    """A catalogue model: credits per million tokens, and where it is served (SPEC section
    15): its provider (none: the configured one), the provider's id for it (blank: the same
    name) and the catalogue models to fall back to, in order."""

    model = models.CharField(max_length=200, unique=True)
    prompt_price_per_mtok = models.DecimalField(**MONEY)
    completion_price_per_mtok = models.DecimalField(**MONEY)
    provider = models.ForeignKey(Provider, null=True, blank=True, on_delete=models.PROTECT, related_name="models",
                                 help_text="Blank: the provider the settings configure (OPENROUTER_*, or fake).")
    upstream_model = models.CharField(max_length=200, blank=True,
                                      help_text="The provider's id of this model; blank: the same as its name.")
    fallbacks = models.JSONField(default=list, blank=True,
                                 help_text='Catalogue models tried in order when this one fails, e.g. ["m2", "m3"].')
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model"]
        constraints = [
            models.CheckConstraint(
                condition=Q(prompt_price_per_mtok__gte=0) & Q(completion_price_per_mtok__gte=0),
                name="price_not_negative",
            )
        ]

    def __str__(self) -> str:
        return self.model

    @property
    def sent_model(self) -> str:
        """The model id sent to the provider."""
        return self.upstream_model or self.model

    def clean(self) -> None:
        fallbacks = self.fallbacks
        if not isinstance(fallbacks, list) or not all(isinstance(name, str) and name for name in fallbacks):
            raise ValidationError({"fallbacks": "A list of catalogue model names."})
        if len(fallbacks) > MAX_FALLBACKS:
            raise ValidationError({"fallbacks": f"At most {MAX_FALLBACKS} fallbacks."})
        if self.model in fallbacks or len(set(fallbacks)) != len(fallbacks):
            raise ValidationError({"fallbacks": "A model cannot fall back to itself, nor list one model twice."})
        unknown = set(fallbacks) - set(ModelPrice.objects.filter(model__in=fallbacks).values_list("model", flat=True))
        if unknown:
            raise ValidationError({"fallbacks": f"Not in the catalogue: {', '.join(sorted(unknown))}."})


class UsageRecord(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage_records",
                             db_index=False)  # usage_user_idx is its index
    session_id = models.UUIDField(db_index=True)
    turn_id = models.UUIDField(unique=True)
    # The API key that made the turn (none: the browser session); plain, like the turn's id.
    api_key_id = models.UUIDField(null=True, blank=True)
    model = models.CharField(max_length=200)  # the model asked for
    # The catalogue model that answered, billed at its price (SPEC section 15).
    served_model = models.CharField(max_length=200, blank=True)
    provider_model = models.CharField(max_length=200, blank=True)
    prompt_tokens = models.PositiveIntegerField()
    completion_tokens = models.PositiveIntegerField()
    total_tokens = models.PositiveIntegerField()
    estimated = models.BooleanField(default=False)
    # The estimate was replaced by the provider's own record (SPEC section 13).
    reconciled = models.BooleanField(default=False)
    cost = models.DecimalField(**MONEY)
    # What the provider says it charged for the turn (its calls summed); None if it never said.
    provider_cost = models.DecimalField(**MONEY, null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        indexes = [models.Index(fields=["user", "-created_at"], name="usage_user_idx"),
                   models.Index(fields=["api_key_id", "-created_at"], name="usage_key_idx")]

    def __str__(self) -> str:
        return f"{self.model}: {self.total_tokens} tokens"
