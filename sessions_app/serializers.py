from django.conf import settings
from rest_framework import serializers

from billing_app.models import ModelPrice
from core.money import format_money
from sessions_app.models import ChatSession, Message, Turn


class SessionSerializer(serializers.ModelSerializer):
    class Meta:
        model = ChatSession
        fields = ["id", "title", "model", "system_prompt", "created_at", "updated_at"]


class SessionCreateSerializer(serializers.Serializer):
    title = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    model = serializers.CharField(max_length=200, required=False)
    system_prompt = serializers.CharField(required=False, allow_blank=True, default="", trim_whitespace=False,
                                          max_length=settings.PANTHEON_MAX_MESSAGE_CHARS)

    def validate_model(self, value: str) -> str:
        if not ModelPrice.objects.filter(model=value).exists():
            raise serializers.ValidationError(f"Model {value!r} is not in the price list.", code="unknown_model")
        return value

    def validate(self, attrs):
        if "model" not in attrs:
            attrs["model"] = self.validate_model(settings.PANTHEON_DEFAULT_MODEL)
        return attrs


def turn_usage(turn: Turn) -> dict:
    return {"prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
            "total_tokens": turn.total_tokens, "estimated": turn.usage_estimated,
            # SPEC section 13: replaced by the provider's own record after an estimate.
            "reconciled": turn.reconciled}


def turn_data(turn: Turn) -> dict:
    """The turn object of SPEC section 4 (also used by the turn endpoints)."""
    return {
        "id": str(turn.id), "session_id": str(turn.session_id), "status": turn.status,
        "model": turn.model, "provider_model": turn.provider_model, "usage": turn_usage(turn),
        "cost": format_money(turn.cost),
        "created_at": serializers.DateTimeField().to_representation(turn.created_at),
        "finished_at": serializers.DateTimeField().to_representation(turn.finished_at),
    }


class TurnSerializer(serializers.BaseSerializer):
    def to_representation(self, instance: Turn) -> dict:
        return turn_data(instance)


class MessageSerializer(serializers.ModelSerializer):
    class Meta:
        model = Message
        fields = ["id", "turn_id", "role", "content", "created_at"]
