from django.conf import settings
from rest_framework import serializers

from billing_app.models import ModelPrice
from core.money import format_money
from sessions_app.models import ChatSession, Message, Turn


class SessionSerializer(serializers.ModelSerializer):
    current_leaf_id = serializers.UUIDField(read_only=True, allow_null=True, help_text=(
        "The last message of the branch shown and continued (SPEC section 17); null before the first answer."))

    class Meta:
        model = ChatSession
        fields = ["id", "title", "model", "system_prompt", "current_leaf_id", "created_at", "updated_at"]


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


class SessionUpdateSerializer(serializers.Serializer):
    """The body of `PATCH /sessions/{id}`: what a user may change, validated as on create
    (a NUL or an unpaired surrogate is a 400 `invalid_text`). Fields left out stay as they are."""

    title = serializers.CharField(max_length=200, required=False, allow_blank=True,
                                  help_text="The new title; empty makes the session untitled.")
    system_prompt = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False,
                                          max_length=settings.PANTHEON_MAX_MESSAGE_CHARS)

    current_leaf_id = serializers.UUIDField(required=False, help_text=(
        "Switch branch (SPEC section 17): a message of the session; one that is not a leaf selects the most "
        "recently created leaf below it. Another session's (or user's) message is a 400 `invalid_parent`."))


def turn_usage(turn: Turn) -> dict:
    return {"prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
            "total_tokens": turn.total_tokens, "estimated": turn.usage_estimated,
            # SPEC section 13: replaced by the provider's own record after an estimate.
            "reconciled": turn.reconciled}


def turn_data(turn: Turn) -> dict:
    """The turn object of SPEC section 4 (also used by the turn endpoints)."""
    return {
        "id": str(turn.id), "session_id": str(turn.session_id), "kind": turn.kind, "status": turn.status,
        "model": turn.model, "served_model": turn.served_model or (turn.model if turn.status != "running" else None),
        "provider_model": turn.provider_model, "usage": turn_usage(turn),
        "cost": format_money(turn.cost),
        "created_at": serializers.DateTimeField().to_representation(turn.created_at),
        "finished_at": serializers.DateTimeField().to_representation(turn.finished_at),
    }


MONEY_FIELD = {"max_digits": 20, "decimal_places": 6}


class TurnUsageSerializer(serializers.Serializer):
    """A turn's token counts (schema of `turn_usage`)."""

    prompt_tokens = serializers.IntegerField(min_value=0)
    completion_tokens = serializers.IntegerField(min_value=0)
    total_tokens = serializers.IntegerField(min_value=0)
    estimated = serializers.BooleanField(help_text="The provider reported no usage: counted from the text.")
    reconciled = serializers.BooleanField(help_text="An estimate since replaced by the provider's own record.")


class TurnSerializer(serializers.Serializer):
    """The turn object of SPEC section 4. The fields declare its schema; the data is `turn_data`."""

    id = serializers.UUIDField()
    session_id = serializers.UUIDField()
    kind = serializers.ChoiceField(choices=Turn.Kind.choices, help_text=(
        "`chat`: a turn of the conversation; `title`: the session's title, written by a model (SPEC section 17): "
        "billed like a turn, no messages."))
    status = serializers.ChoiceField(choices=Turn.Status.choices, help_text=(
        "`running` until the turn ends; then `completed`, `cancelled` (the client went away or asked to stop), "
        "`failed` (upstream error) or `interrupted` (the process serving it died)."))
    model = serializers.CharField(help_text="The model asked for.")
    served_model = serializers.CharField(allow_null=True, help_text=(
        "The catalogue model that answered: `model`, or one of its fallbacks (for a failed turn the last one "
        "tried); billed at its price. Null while running until known."))
    provider_model = serializers.CharField(allow_blank=True, help_text="The model that answered, as the provider "
                                                                       "named it (empty until known).")
    usage = TurnUsageSerializer()
    cost = serializers.DecimalField(**MONEY_FIELD, help_text="Credits debited for the turn.")
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)

    def to_representation(self, instance: Turn) -> dict:
        return turn_data(instance)


class MessageSerializer(serializers.ModelSerializer):
    parent_id = serializers.UUIDField(read_only=True, allow_null=True,
                                      help_text="The message this one follows; null for a root (SPEC section 17).")
    sibling_index = serializers.SerializerMethodField(help_text="1-based position among the messages with the "
                                                                "same parent, oldest first.")
    sibling_count = serializers.SerializerMethodField(help_text="How many messages share this one's parent.")

    class Meta:
        model = Message
        fields = ["id", "turn_id", "parent_id", "role", "content", "created_at", "sibling_index", "sibling_count"]

    def get_sibling_index(self, message: Message) -> int:
        return getattr(message, "sibling_index", 1)

    def get_sibling_count(self, message: Message) -> int:
        return getattr(message, "sibling_count", 1)


# --- The turn endpoints' bodies (sessions_app.turn_views parses them itself: these declare
# the schema, `/api/schema/`).

class TurnRequestSerializer(serializers.Serializer):
    """The body of `POST .../turns` and `POST .../turns/stream`."""

    content = serializers.CharField(max_length=settings.PANTHEON_MAX_MESSAGE_CHARS, trim_whitespace=False,
                                    help_text="The user's message (not only whitespace; no NUL characters).")
    model = serializers.CharField(required=False, min_length=1, help_text="A priced model for this turn; "
                                                                          "default: the session's.")
    models = serializers.ListField(child=serializers.CharField(min_length=1), required=False, max_length=16,
                                   help_text=(
        "Fallbacks for this turn, tried in order after `model` when it fails before any output (provider "
        "down, timeout, 429, 5xx); replaces the model's configured fallbacks, `[]` for none. Without "
        "`model`, the first is the model asked for. Every one must be priced."))
    tools_enabled = serializers.BooleanField(default=False, help_text=(
        "Offer the model the `file_read` tool over your ready files. Non-streaming turns only: the stream "
        "answers 422 `tools_not_supported_in_stream`."))
    max_tokens = serializers.IntegerField(required=False, min_value=1, help_text=(
        "Upper bound of the answer's tokens (capped by the server and by what the credits afford)."))
    resumable = serializers.BooleanField(default=False, help_text=(
        "Streams only: the turn goes on for a grace period when the client goes away; any client may "
        "attach with `GET /turns/{id}/events`."))


class TurnResultSerializer(serializers.Serializer):
    """The answer of `POST .../turns`: the closed turn, the stored answer and the balance after it."""

    turn = TurnSerializer()
    message = MessageSerializer(allow_null=True, help_text="The assistant's answer (null when there is none, "
                                                           "e.g. the turn was cancelled before any text).")
    usage = TurnUsageSerializer()
    cost = serializers.DecimalField(**MONEY_FIELD)
    balance = serializers.DecimalField(**MONEY_FIELD, help_text="The wallet's balance after the debit.")
