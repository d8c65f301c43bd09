import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from billing_app.models import MONEY


class ChatSession(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_sessions")
    title = models.CharField(max_length=200, blank=True)
    model = models.CharField(max_length=200)
    system_prompt = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "chat session"
        indexes = [models.Index(fields=["user", "-created_at"], name="session_user_idx")]

    def __str__(self) -> str:
        return self.title or str(self.id)


class Turn(models.Model):
    """One exchange. Written once, when it ends (see sessions_app.services.record_turn)."""

    class Status(models.TextChoices):
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="turns")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="turns")
    status = models.CharField(max_length=16, choices=Status.choices)
    model = models.CharField(max_length=200)
    provider_model = models.CharField(max_length=200, blank=True)
    streamed = models.BooleanField(default=False)
    tools_enabled = models.BooleanField(default=False)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    usage_estimated = models.BooleanField(default=False)
    cost = models.DecimalField(**MONEY, default=Decimal("0"))
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["user", "-created_at"], name="turn_user_idx"),
            models.Index(fields=["session", "-created_at"], name="turn_session_idx"),
        ]
        constraints = [models.CheckConstraint(condition=Q(cost__gte=0), name="turn_cost_not_negative")]

    def __str__(self) -> str:
        return f"turn {self.id} ({self.status})"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"
        TOOL = "tool"
        SYSTEM = "system"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="messages")
    turn = models.ForeignKey(Turn, on_delete=models.CASCADE, related_name="messages")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    # OpenAI-format tool calls of an assistant message, and the call a tool message answers.
    tool_calls = models.JSONField(null=True, blank=True)
    tool_call_id = models.CharField(max_length=200, blank=True)
    position = models.PositiveSmallIntegerField(help_text="Order within the turn.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "position"]
        indexes = [
            models.Index(fields=["user"], name="message_user_idx"),
            models.Index(fields=["session", "created_at", "position"], name="message_session_idx"),
        ]
        constraints = [models.UniqueConstraint(fields=["turn", "position"], name="message_turn_position")]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"


class LlmEvent(models.Model):
    """One upstream call (one HTTP request to the provider), success or not."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="llm_events")
    turn = models.ForeignKey(Turn, on_delete=models.CASCADE, related_name="llm_events")
    requested_model = models.CharField(max_length=200)
    provider_model = models.CharField(max_length=200, blank=True)
    provider = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=16)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    streamed = models.BooleanField(default=False)
    latency_ms = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "LLM event"
        indexes = [models.Index(fields=["user", "-created_at"], name="llmevent_user_idx")]

    def __str__(self) -> str:
        return f"{self.requested_model} {self.status}"
