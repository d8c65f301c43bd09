import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

# Credits are stored with 6 decimal places (SPEC section 7).
MONEY = {"max_digits": 20, "decimal_places": 6}


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
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="ledger_entries")
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
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="credit_holds")
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


class ModelPrice(models.Model):
    """Credits per million tokens for one model."""

    model = models.CharField(max_length=200, unique=True)
    prompt_price_per_mtok = models.DecimalField(**MONEY)
    completion_price_per_mtok = models.DecimalField(**MONEY)
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


class UsageRecord(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage_records")
    session_id = models.UUIDField(db_index=True)
    turn_id = models.UUIDField(unique=True)
    model = models.CharField(max_length=200)
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
        indexes = [models.Index(fields=["user", "-created_at"], name="usage_user_idx")]

    def __str__(self) -> str:
        return f"{self.model}: {self.total_tokens} tokens"
