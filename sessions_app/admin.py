from django.contrib import admin

from billing_app.admin import ReadOnlyAdminMixin
from sessions_app.models import ChatSession, LlmEvent, Message, Turn


class TurnInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Turn
    fields = ["created_at", "status", "model", "served_model", "provider_model", "prompt_tokens",
              "completion_tokens", "cost", "reconciliation"]
    readonly_fields = fields
    ordering = ["-created_at"]
    extra = 0
    show_change_link = True


class MessageInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Message
    fields = ["created_at", "role", "content"]
    readonly_fields = fields
    ordering = ["created_at", "position"]  # a turn reads in conversation order
    extra = 0


@admin.register(ChatSession)
class ChatSessionAdmin(admin.ModelAdmin):
    list_display = ["title", "user", "model", "created_at", "updated_at"]
    search_fields = ["title", "user__username", "id"]
    readonly_fields = ["id", "created_at"]
    ordering = ["-created_at"]
    inlines = [TurnInline]


@admin.register(Turn)
class TurnAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "user", "status", "model", "served_model", "provider_model", "streamed", "cost",
                    "reconciliation"]
    list_filter = ["status", "streamed", "reconciliation"]
    search_fields = ["id", "user__username"]
    ordering = ["-created_at"]
    inlines = [MessageInline]


@admin.register(LlmEvent)
class LlmEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "user", "model", "upstream", "requested_model", "provider_model", "status",
                    "http_status", "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "provider_cost"]
    list_filter = ["status", "streamed", "upstream"]
    search_fields = ["turn__id", "user__username", "model", "requested_model", "generation_id"]
    readonly_fields = ["generation_id", "provider_cost"]  # the provider's record (SPEC section 13)
    ordering = ["-created_at"]
