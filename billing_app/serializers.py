from rest_framework import serializers

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

    class Meta:
        model = UsageRecord
        fields = ["id", "session_id", "turn_id", "model", "provider_model", "prompt_tokens",
                  "completion_tokens", "total_tokens", "estimated", "reconciled", "cost", "created_at"]
