from decimal import Decimal, InvalidOperation

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm

from billing_app import services
from billing_app.models import CreditHold, LedgerEntry, ModelPrice, UsageRecord, Wallet


class ReadOnlyAdminMixin:
    """Money records are written by services only; the admin shows them."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class LedgerEntryInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = LedgerEntry
    fields = ["created_at", "kind", "amount", "balance_after", "turn_id", "note"]
    readonly_fields = fields
    ordering = ["-created_at"]
    extra = 0


class GrantForm(ActionForm):
    amount = forms.CharField(required=False, label="Amount", widget=forms.TextInput(attrs={"size": 10}))
    note = forms.CharField(required=False, label="Note")


@admin.register(Wallet)
class WalletAdmin(admin.ModelAdmin):
    list_display = ["user", "balance", "updated_at"]
    search_fields = ["user__username", "user__email"]
    readonly_fields = ["user", "balance", "created_at", "updated_at"]
    inlines = [LedgerEntryInline]
    action_form = GrantForm
    actions = ["grant_credits"]

    def has_add_permission(self, request):
        return False  # wallets are created with the first grant or turn

    @admin.action(description="Grant credits (amount and note beside the action)")
    def grant_credits(self, request, queryset):
        try:
            amount = Decimal(request.POST.get("amount", ""))
        except InvalidOperation:
            self.message_user(request, "Enter an amount to grant.", messages.ERROR)
            return
        note = request.POST.get("note", "") or f"admin grant by {request.user}"
        try:
            for wallet in queryset:
                services.grant(user_id=wallet.user_id, amount=amount, note=note)
        except services.BillingError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(request, f"Granted {amount} credits to {queryset.count()} wallet(s).")


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "user", "kind", "amount", "balance_after", "turn_id", "note"]
    list_filter = ["kind"]
    search_fields = ["user__username", "turn_id"]


@admin.register(CreditHold)
class CreditHoldAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "user", "model", "amount", "max_tokens", "released_at", "turn_id"]
    search_fields = ["user__username", "turn_id"]


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = ["model", "prompt_price_per_mtok", "completion_price_per_mtok", "updated_at"]
    search_fields = ["model"]


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "user", "model", "provider_model", "prompt_tokens",
                    "completion_tokens", "estimated", "cost"]
    list_filter = ["estimated", "model"]
    search_fields = ["user__username", "turn_id", "session_id"]
