import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from billing_app.models import MONEY


class ChatSession(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own on a foreign key that an index of the model starts with (here
    # session_user_idx): every insert and every non-HOT update would write both.
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_sessions",
                             db_index=False)
    title = models.CharField(max_length=200, blank=True)
    model = models.CharField(max_length=200)
    system_prompt = models.TextField(blank=True)
    # The session of an API key's OpenAI-compatible calls (SPEC section 14), made on first use.
    api_key = models.OneToOneField("accounts.ApiKey", null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="api_session")
    # The end of the branch shown and continued (SPEC section 17); null: no message yet.
    current_leaf = models.ForeignKey("Message", null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    # A title task was queued (SPEC section 17: once, after the first completed turn), so
    # the turns completing before it runs, or after it failed, queue no other.
    title_requested = models.BooleanField(default=False, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "chat session"
        indexes = [models.Index(fields=["user", "-created_at"], name="session_user_idx")]

    def __str__(self) -> str:
        return self.title or str(self.id)


class Turn(models.Model):
    """One exchange, from the moment its preflight passed (`running`, with a lease and a
    checkpoint of the partial answer) to the one close-time transaction that ends it
    (sessions_app.turns: `begin_turn`, `renew_turn`, `close_turn`, `sweep_lapsed_turns`)."""

    class Status(models.TextChoices):
        RUNNING = "running"
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        FAILED = "failed"
        INTERRUPTED = "interrupted"  # its process died; closed by the sweep

    class Kind(models.TextChoices):
        CHAT = "chat"  # an exchange of the conversation: its messages are in the tree
        TITLE = "title"  # the session's title, written by a model (SPEC section 17): no messages

    class Reconciliation(models.TextChoices):
        # SPEC section 13: a turn billed on an estimate is checked later against the
        # provider's own record of its generation(s).
        NOT_NEEDED = "", "not needed"  # billed on the provider's own usage, or free
        PENDING = "pending"  # estimated; the reconcile task will look it up
        RECONCILED = "reconciled"  # billed on the provider's record now
        UNRECONCILED = "unreconciled"  # the estimate stands: no record found (or none to look up)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Their indexes: turn_session_idx, turn_user_idx, turn_key_idx (as ChatSession.user).
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="turns", db_index=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="turns", db_index=False)
    # The API key that made it (none: the browser session); its limits count its turns.
    api_key = models.ForeignKey("accounts.ApiKey", null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="turns", db_index=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.CHAT)
    # The user message this turn answers (its own, or for a regenerate an earlier one): its
    # answer's first message is a child of it (SPEC section 17). Null for a title turn.
    reply_to = models.ForeignKey("Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model = models.CharField(max_length=200)  # the model asked for
    # The catalogue model that answered (a fallback's, SPEC section 15; for a failed turn the
    # last one tried), billed at its price; saved with the checkpoints while running.
    served_model = models.CharField(max_length=200, blank=True)
    provider_model = models.CharField(max_length=200, blank=True)
    streamed = models.BooleanField(default=False)
    tools_enabled = models.BooleanField(default=False)
    max_tokens = models.PositiveIntegerField(default=0, help_text="The output cap the preflight granted.")
    # While running: the prompt estimate (usage_estimated); once closed: what was billed.
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    usage_estimated = models.BooleanField(default=False)
    cost = models.DecimalField(**MONEY, default=Decimal("0"))
    finish_reason = models.CharField(max_length=32, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    # While running: renewed by the serving process; a lapsed lease means that process died.
    lease_until = models.DateTimeField(null=True, blank=True)
    # While running: the partial answer as last saved; emptied at close.
    checkpoint = models.TextField(blank=True)
    # Where each streamed delta ends in the checkpoint (while running) or in the stored
    # answer (once closed): replays cut the text the same way, so every event keeps its id.
    chunk_ends = models.JSONField(null=True, blank=True)
    # The client going away does not cancel it (SPEC section 12).
    resumable = models.BooleanField(default=False)
    # POST .../cancel reached a process that does not serve the turn; the serving one
    # stops at its next lease write if the signal did not reach it sooner.
    cancel_requested = models.BooleanField(default=False)
    reconciliation = models.CharField(max_length=16, choices=Reconciliation.choices, blank=True, default="")
    # While a stream runs: the provider's generation id, saved with the checkpoints, so a turn
    # whose process died (closed by the sweep) can still be reconciled.
    generation_id = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["user", "-created_at"], name="turn_user_idx"),
            models.Index(fields=["session", "-created_at"], name="turn_session_idx"),
            # The sweep's question: which running turns' leases lapsed?
            models.Index(fields=["lease_until"], condition=Q(status="running"), name="turn_running_lease_idx"),
            # A key's limits (sessions_app.limits): its recent and running turns.
            models.Index(fields=["api_key", "created_at"], name="turn_key_idx"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(cost__gte=0), name="turn_cost_not_negative"),
            models.CheckConstraint(condition=~Q(status="running") | Q(lease_until__isnull=False),
                                   name="turn_running_has_lease"),
        ]

    def __str__(self) -> str:
        return f"turn {self.id} ({self.status})"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def reconciled(self) -> bool:
        return self.reconciliation == self.Reconciliation.RECONCILED


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"
        TOOL = "tool"
        SYSTEM = "system"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Their indexes: message_session_idx, message_turn_position, message_user_idx (as
    # ChatSession.user), and message_parent_idx for `parent`.
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="messages", db_index=False)
    turn = models.ForeignKey(Turn, on_delete=models.CASCADE, related_name="messages", db_index=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_messages",
                             db_index=False)
    # The message this one follows (SPEC section 17): messages form a tree, regenerated
    # answers and edited messages are siblings; null for a root.
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="children",
                               db_index=False)
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
            models.Index(fields=["parent", "created_at"], name="message_parent_idx"),
        ]
        constraints = [models.UniqueConstraint(fields=["turn", "position"], name="message_turn_position")]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"


class LlmEvent(models.Model):
    """One upstream call (one HTTP request to the provider), success or not."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="llm_events",
                             db_index=False)  # llmevent_user_idx (as ChatSession.user)
    turn = models.ForeignKey(Turn, on_delete=models.CASCADE, related_name="llm_events")
    # The catalogue model this call tried, and the provider (our name for it) it went to.
    model = models.CharField(max_length=200, blank=True)
    upstream = models.CharField(max_length=100, blank=True)
    requested_model = models.CharField(max_length=200)  # the id sent to the provider
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
    # The provider's generation id and reported cost (SPEC section 13); the counts and the
    # cost are replaced by the provider's record when the turn is reconciled.
    generation_id = models.CharField(max_length=200, blank=True)
    provider_cost = models.DecimalField(**MONEY, null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "LLM event"
        indexes = [models.Index(fields=["user", "-created_at"], name="llmevent_user_idx")]

    def __str__(self) -> str:
        return f"{self.requested_model} {self.status}"


class IdempotencyKey(models.Model):
    """An `Idempotency-Key` a user sent with a turn request (SPEC section 11). The unique
    constraint arbitrates concurrent repeats: the row is inserted in the transaction that
    creates the turn, so exactly one request per key gets a turn, and a refused request
    (rolled back) leaves the key unused."""

    id = models.BigAutoField(primary_key=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="idempotency_keys",
                             db_index=False)  # idempotency_user_key starts with it
    key = models.CharField(max_length=200)
    # sha256 of the endpoint, the session and the request body.
    fingerprint = models.CharField(max_length=64)
    turn = models.ForeignKey(Turn, on_delete=models.CASCADE, related_name="idempotency_keys")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "key"], name="idempotency_user_key")]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created_idx")]

    def __str__(self) -> str:
        return f"{self.key} -> {self.turn_id}"
