import datetime
from decimal import Decimal

from django.utils import timezone
from rest_framework import serializers

from accounts.models import ApiKey, BudgetPeriod
from billing_app.models import LedgerEntry, ModelPrice, UsageRecord

MONEY = {"max_digits": 20, "decimal_places": 6}


class ModelPriceSerializer(serializers.ModelSerializer):
    prompt_price_per_mtok = serializers.DecimalField(**MONEY)
    completion_price_per_mtok = serializers.DecimalField(**MONEY)

    class Meta:
        model = ModelPrice
        fields = ["model", "prompt_price_per_mtok", "completion_price_per_mtok"]


class WalletSerializer(serializers.Serializer):
    balance = serializers.DecimalField(**MONEY)
    held = serializers.DecimalField(**MONEY)
    available = serializers.DecimalField(**MONEY)
    enforcement = serializers.BooleanField()


class LedgerEntrySerializer(serializers.ModelSerializer):
    amount = serializers.DecimalField(**MONEY)
    balance_after = serializers.DecimalField(**MONEY)

    class Meta:
        model = LedgerEntry
        fields = ["id", "kind", "amount", "balance_after", "turn_id", "note", "created_at"]


class UsageRecordSerializer(serializers.ModelSerializer):
    cost = serializers.DecimalField(**MONEY)
    key_id = serializers.UUIDField(source="api_key_id", allow_null=True,
                                   help_text="The API key that made the turn; null: the browser session.")

    class Meta:
        model = UsageRecord
        fields = ["id", "session_id", "turn_id", "key_id", "model", "provider_model", "prompt_tokens",
                  "completion_tokens", "total_tokens", "estimated", "reconciled", "cost", "created_at"]


# --- API keys users make themselves (SPEC section 16; billing_app.key_views) -----------------

MAX_COUNT = 2_147_483_647  # the largest value every database's PositiveIntegerField stores
MAX_EXPIRES_IN_DAYS = 36_500
MAX_ALLOWED_MODELS = 100


class ApiKeySerializer(serializers.ModelSerializer):
    """A key as its owner sees it: never its hash, never the key itself. Limits are null
    when unset. The row must carry `spent_this_period` (billing_app.selectors)."""

    prefix = serializers.CharField(help_text="The key's first characters, to recognise it.")
    budget = serializers.DecimalField(**MONEY, allow_null=True,
                                      help_text="Credits the key may spend per `budget_period`; null: no budget.")
    budget_period = serializers.ChoiceField(choices=BudgetPeriod.choices, allow_null=True,
                                            help_text="Calendar day, ISO week (from Monday) or month in UTC, or "
                                                      "`total`; null when the key has no budget.")
    models = serializers.ListField(child=serializers.CharField(), source="allowed_models", allow_null=True,
                                   help_text="The only models the key may use; null: any priced model.")
    spent_this_period = serializers.DecimalField(**MONEY, help_text=(
        "Credits this key spent in its current budget period; without a budget, since 00:00 UTC today."))

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "expires_at", "rpm", "tpm",
                  "max_parallel", "budget", "budget_period", "models", "spent_this_period"]
        read_only_fields = fields

    def to_representation(self, instance):
        data = super().to_representation(instance)
        data["budget_period"] = data["budget_period"] or None  # stored as "" without a budget
        return data


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(help_text="The key itself, for `Authorization: Bearer <key>`: shown in this answer "
                                          "only (it is stored as a hash).")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class BudgetPeriodField(serializers.ChoiceField):
    """One of the budget periods; anything else is `invalid_budget_period`."""

    def __init__(self, **kwargs):
        super().__init__(choices=BudgetPeriod.choices, **kwargs)

    def to_internal_value(self, data):
        try:
            return super().to_internal_value(data)
        except serializers.ValidationError as exc:
            message = " ".join(str(detail) for detail in exc.detail)
            raise serializers.ValidationError(message, code="invalid_budget_period") from None


def _count_field(help_text: str) -> serializers.IntegerField:
    return serializers.IntegerField(min_value=1, max_value=MAX_COUNT, required=False, allow_null=True,
                                    help_text=f"{help_text} Null: no limit.")


class ApiKeyUpdateSerializer(serializers.Serializer):
    """The body of `PATCH /keys/{id}`: fields left out stay as they are; null clears a
    limit. `budget` and `budget_period` come together (both set, or both null)."""

    name = serializers.CharField(max_length=100, required=False, allow_blank=True, help_text="A label.")
    rpm = _count_field("Turns the key may start per rolling 60 seconds.")
    tpm = _count_field("Tokens (prompt + completion) per rolling 60 seconds.")
    max_parallel = _count_field("Turns running at once.")
    budget = serializers.DecimalField(**MONEY, min_value=Decimal(0), required=False, allow_null=True,
                                      help_text="Credits per `budget_period`, at most 6 decimal places. Null: none.")
    budget_period = BudgetPeriodField(required=False, allow_null=True, help_text=(
        "`day`, `week`, `month` (calendar periods in UTC; weeks from Monday) or `total`."))
    models = serializers.ListField(
        child=serializers.CharField(max_length=200), source="allowed_models", required=False, allow_null=True,
        min_length=1, max_length=MAX_ALLOWED_MODELS,
        help_text="An allow-list of priced models (`unknown_model` otherwise). Null: any model.")
    expires_at = serializers.DateTimeField(required=False, allow_null=True,
                                           help_text="In the future; after it the key is refused (401). Null: never.")
    expires_in_days = serializers.IntegerField(min_value=1, max_value=MAX_EXPIRES_IN_DAYS, required=False,
                                               help_text="Instead of `expires_at`: now + N × 24 h.")

    def validate_models(self, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        names = list(dict.fromkeys(names))  # repeats dropped, order kept
        priced = set(ModelPrice.objects.filter(model__in=names).values_list("model", flat=True))
        unknown = [name for name in names if name not in priced]
        if unknown:
            raise serializers.ValidationError(f"Not in the price list: {', '.join(unknown)}.", code="unknown_model")
        return names

    def validate_expires_at(self, value):
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("Must be in the future.", code="invalid_expires_at")
        return value

    def validate(self, attrs):
        if "expires_in_days" in attrs:
            if "expires_at" in attrs:
                raise serializers.ValidationError("Give expires_at or expires_in_days, not both.",
                                                  code="invalid_expires_at")
            attrs["expires_at"] = timezone.now() + datetime.timedelta(days=attrs.pop("expires_in_days"))
        if "budget" in attrs or "budget_period" in attrs:
            if (attrs.get("budget") is None) != (attrs.get("budget_period") is None):
                raise serializers.ValidationError(
                    "budget and budget_period come together: give both, or both null.", code="invalid_budget")
            attrs["budget_period"] = attrs.get("budget_period") or ""  # the column is "" without a budget
        return attrs


class ApiKeyCreateSerializer(ApiKeyUpdateSerializer):
    """The body of `POST /keys`: every field optional (no limit, no expiry, no name)."""
