import datetime
from decimal import Decimal, InvalidOperation
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.contrib.auth import get_user_model
from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied
from django.db.models import Count, Q
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils import timezone

from accounts.models import ApiKey
from billing_app import selectors, services, usage_report
from billing_app.models import CreditHold, LedgerEntry, ModelPrice, Provider, UsageRecord, Wallet
from core.money import format_money

LIMIT_FIELDS = ["rpm", "tpm", "max_parallel", "budget", "budget_period", "allowed_models", "expires_at"]


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
    list_display = ["user", "balance", "held", "available", "updated_at"]
    search_fields = ["user__username", "user__email"]
    fields = ["user", "balance", "held", "available", "created_at", "updated_at"]
    readonly_fields = fields
    ordering = ["-created_at"]
    inlines = [LedgerEntryInline]
    action_form = GrantForm
    actions = ["grant_credits"]

    def has_add_permission(self, request):
        return False  # wallets are created with the first grant or turn

    def has_delete_permission(self, request, obj=None):
        return False  # a wallet holds a ledger: it is never deleted (this also drops "delete selected")

    @admin.display(description="available")
    def available(self, obj: Wallet) -> Decimal:
        """What a new turn can reserve: the balance less the open holds."""
        return obj.balance - obj.held

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
    ordering = ["-created_at"]


@admin.register(CreditHold)
class CreditHoldAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "user", "model", "amount", "max_tokens", "released_at", "turn_id"]
    search_fields = ["user__username", "turn_id"]
    ordering = ["-created_at"]


class ProviderForm(forms.ModelForm):
    """The stored key is write-only: never rendered back, and a blank field keeps it."""

    api_key = forms.CharField(
        required=False, max_length=500, label="API key", widget=forms.PasswordInput(render_value=False),
        help_text="Stored as given, when it is not in the environment. Leave blank to keep the stored key; "
                  "giving an environment variable instead replaces it.")
    clear_api_key = forms.BooleanField(required=False, label="Remove the stored key")

    class Meta:
        model = Provider
        fields = ["name", "base_url", "api_key_env", "api_key", "timeout_seconds"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial["api_key"] = ""  # the key never reaches the page, and a blank field is "unchanged"

    def clean(self):
        data = super().clean()
        if data.get("clear_api_key"):
            data["api_key"] = ""
        elif not data.get("api_key") and not data.get("api_key_env"):
            data["api_key"] = self.instance.api_key  # the instance still holds the saved value here
        return data


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderForm
    list_display = ["name", "base_url", "key_source", "timeout_seconds", "model_count", "updated_at"]
    search_fields = ["name", "base_url"]
    fields = ["name", "base_url", "api_key_env", "api_key", "clear_api_key", "key_source", "timeout_seconds",
              "model_count", "created_at", "updated_at"]
    readonly_fields = ["key_source", "model_count", "created_at", "updated_at"]
    ordering = ["-created_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(model_total=Count("models"))

    @admin.display(description="key")
    def key_source(self, obj: Provider) -> str:
        """Where the key comes from, never the key."""
        if obj.api_key_env:
            return f"env ${obj.api_key_env}"
        return "stored" if obj.api_key else "none"

    @admin.display(description="models", ordering="model_total")
    def model_count(self, obj: Provider) -> int:
        total = getattr(obj, "model_total", None)  # absent on an unsaved row
        return total if total is not None else (obj.models.count() if obj.pk else 0)


class FallbacksField(forms.CharField):
    """The JSON list of fallbacks as "m2, m3": a list in, a comma-separated text out."""

    def prepare_value(self, value):
        return ", ".join(value) if isinstance(value, list) else value

    def to_python(self, value) -> list[str]:
        text = super().to_python(value)
        return [name.strip() for name in text.split(",") if name.strip()]


class ModelPriceForm(forms.ModelForm):
    # ModelPrice.clean() checks the list (priced, not itself, no repeats) when the form validates the row.
    fallbacks = FallbacksField(required=False, widget=forms.TextInput(attrs={"size": 60}),
                               help_text="Catalogue models tried in order when this one fails, comma-separated: "
                                         "m2, m3. Blank: none.")

    class Meta:
        model = ModelPrice
        fields = ["model", "prompt_price_per_mtok", "completion_price_per_mtok", "provider", "upstream_model",
                  "fallbacks"]


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    form = ModelPriceForm
    list_display = ["model", "prompt_price_per_mtok", "completion_price_per_mtok", "provider_name",
                    "upstream_model", "fallback_list", "updated_at"]
    list_filter = ["provider"]
    list_select_related = ["provider"]
    search_fields = ["model", "upstream_model"]

    @admin.display(description="provider", ordering="provider__name")
    def provider_name(self, obj: ModelPrice) -> str:
        return obj.provider.name if obj.provider_id else "(configured)"

    @admin.display(description="fallbacks")
    def fallback_list(self, obj: ModelPrice) -> str:
        return ", ".join(obj.fallbacks or [])


class UsageReportForm(forms.Form):
    """The report's filters, from the query string. Both dates are included."""

    start = forms.DateField(required=False, label="From",
                            widget=forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d"))
    end = forms.DateField(required=False, label="To",
                          widget=forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d"))
    # No max_length: a name that is too long names nobody, which the report says.
    user = forms.CharField(required=False, label="User",
                           widget=forms.TextInput(attrs={"placeholder": "username or id", "size": 16}))

    # Far enough for any usage, near enough that a day's bounds are datetimes in every time zone.
    earliest, latest = datetime.date(1970, 1, 1), datetime.date(9998, 12, 31)

    def _in_range(self, name: str):
        day = self.cleaned_data.get(name)
        if day and not self.earliest <= day <= self.latest:
            raise forms.ValidationError(f"Enter a date from {self.earliest} to {self.latest}.")
        return day

    def clean_start(self):
        return self._in_range("start")

    def clean_end(self):
        return self._in_range("end")

    def clean(self):
        data = super().clean()
        if data.get("start") and data.get("end") and data["start"] > data["end"]:
            raise forms.ValidationError("The start date is after the end date.")
        return data


def find_user(value: str):
    """The user named `value`, else the one whose id it is; None if neither exists."""
    query = Q(username=value)
    if value.isascii() and value.isdigit() and len(value) < 19:
        query |= Q(pk=int(value))
    found = list(get_user_model().objects.filter(query)[:2])
    return next((u for u in found if u.get_username() == value), found[0] if found else None)


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "user", "model", "served_model", "provider_model", "prompt_tokens",
                    "completion_tokens", "estimated", "reconciled", "cost", "provider_cost"]
    list_filter = ["estimated", "reconciled", "model", "served_model"]
    search_fields = ["user__username", "turn_id", "session_id"]
    ordering = ["-created_at"]
    change_list_template = "admin/billing_app/usagerecord/change_list.html"
    report_template = "admin/billing_app/usage_report.html"
    report_days = 30

    def get_urls(self):
        report = path("report/", self.admin_site.admin_view(self.report_view), name="billing_app_usagerecord_report")
        return [report, *super().get_urls()]  # before the catch-all "<object_id>/"

    def report_view(self, request):
        """Usage by day and model with what it was billed, the provider's cost and the margin
        (SPEC section 13), for a date range and optionally one user; a chart of the last
        30 days. A constant number of queries."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        default_start, default_end = usage_report.last_days(self.report_days)
        form = UsageReportForm(request.GET or None)
        notes: list[str] = []
        data = {}
        if form.is_bound and not form.is_valid():
            data = dict(form.cleaned_data)
            if {"start", "end", NON_FIELD_ERRORS} & set(form.errors):
                data.pop("start", None)
                data.pop("end", None)
                notes.append(f"Showing the last {self.report_days} days instead.")
        elif form.is_bound:
            data = form.cleaned_data
        start = data.get("start") or default_start
        end = data.get("end") or max(default_end, start)
        if not data.get("start") and data.get("end"):
            start = data["end"] - datetime.timedelta(days=self.report_days - 1)

        # A name the form refused (e.g. a NUL in it) names nobody; it is not looked up.
        refused = "user" in form.errors
        wanted = (data.get("user") or "").strip()
        user = find_user(wanted) if wanted else None
        unknown_user = refused or (bool(wanted) and user is None)
        user_id = user.pk if user else None
        if unknown_user:
            notes.append(f"No user “{wanted}”: the report is empty." if not refused
                         else "No such user: the report is empty.")
            report = usage_report.empty_report(start, end)
        else:
            report = usage_report.usage_report(start, end, user_id)
        days = usage_report.daily_totals(self.report_days, user_id, empty=unknown_user)

        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Usage report",
            "subtitle": f"{start:%Y-%m-%d} to {end:%Y-%m-%d}" + (f" · {user.get_username()}" if user else ""),
            "form": form,
            "notes": notes,
            "report": report,
            "report_user": user,
            "unknown_user": unknown_user,
            "chart": usage_report.chart(days),
            "chart_days": self.report_days,
            "timezone_name": timezone.get_current_timezone_name(),
            "on_estimate_turns_url": self._on_estimate_turns_url(start, end, user_id),
            "on_estimate_usage_url": self._on_estimate_usage_url(start, end, user_id),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, self.report_template, context)

    def _on_estimate_turns_url(self, start, end, user_id) -> str:
        """The turn changelist, filtered to the range's turns still billed on an estimate."""
        try:
            url = reverse(f"{self.admin_site.name}:sessions_app_turn_changelist")
        except NoReverseMatch:
            return ""
        query = {"reconciliation__in": "pending,unreconciled",
                 "created_at__date__gte": start.isoformat(), "created_at__date__lte": end.isoformat()}
        if user_id is not None:
            query["user__id__exact"] = user_id
        return f"{url}?{urlencode(query)}"

    def _on_estimate_usage_url(self, start, end, user_id) -> str:
        url = reverse(f"{self.admin_site.name}:billing_app_usagerecord_changelist")
        query = {"estimated__exact": 1, "reconciled__exact": 0,
                 "created_at__date__gte": start.isoformat(), "created_at__date__lte": end.isoformat()}
        if user_id is not None:
            query["user__id__exact"] = user_id
        return f"{url}?{urlencode(query)}"


# --- API keys (accounts.ApiKey; here because it shows what each key spent) -----------------

class AllowedModelsField(FallbacksField):
    """A key's allow-list as "m1, m2"; blank is no allow-list (any model), not an empty one."""

    def to_python(self, value) -> list[str] | None:
        return list(dict.fromkeys(super().to_python(value))) or None


class ApiKeyForm(forms.ModelForm):
    allowed_models = AllowedModelsField(
        required=False, label="Models", widget=forms.TextInput(attrs={"size": 60}),
        help_text="The only catalogue models this key may use, comma-separated: m1, m2. Blank: any priced model.")

    class Meta:
        model = ApiKey
        fields = ["user", "name", *LIMIT_FIELDS]

    def clean_allowed_models(self):
        names = self.cleaned_data.get("allowed_models")
        if names:
            unknown = set(names) - set(ModelPrice.objects.filter(model__in=names).values_list("model", flat=True))
            if unknown:
                raise forms.ValidationError(f"Not in the catalogue: {', '.join(sorted(unknown))}.")
        return names


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys: made here (the key shown once, in the answer to the POST), their limits edited,
    revoked by the action. The key itself and its hash are never shown."""

    form = ApiKeyForm
    list_display = ["prefix", "name", "user", "created_at", "last_used_at", "expires_at", "revoked_at",
                    "limits", "spent_this_period", "turn_count"]
    list_filter = ["revoked_at", "budget_period"]
    list_select_related = ["user"]
    search_fields = ["user__username", "name", "prefix"]
    ordering = ["-created_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at", "spent_this_period", "turn_count"]
    actions = ["revoke"]
    limits_fieldset = ("Limits", {
        "fields": LIMIT_FIELDS,
        "description": "Blank: no limit. A budget needs its period. Enforced in every turn's preflight, exactly "
                       "across workers (SPEC section 16); a key with any of these cannot manage keys.",
    })

    def get_fieldsets(self, request, obj=None):
        if obj is None:
            return [(None, {"fields": ["user", "name"]}), self.limits_fieldset]
        return [(None, {"fields": ["user", "name", "prefix", "created_at", "last_used_at", "revoked_at"]}),
                self.limits_fieldset,
                ("Use", {"fields": ["spent_this_period", "turn_count"]})]

    def get_readonly_fields(self, request, obj=None):
        fields = list(self.readonly_fields)
        return fields + ["user"] if obj is not None else fields

    def get_queryset(self, request):
        keys = super().get_queryset(request).annotate(turn_total=Count("turns"))
        return selectors.with_spend_this_period(keys, timezone.now())

    @admin.display(description="limits")
    def limits(self, obj: ApiKey) -> str:
        parts = [f"{obj.rpm} rpm" if obj.rpm is not None else "",
                 f"{obj.tpm} tpm" if obj.tpm is not None else "",
                 f"{obj.max_parallel} parallel" if obj.max_parallel is not None else "",
                 f"{obj.budget:f}/{obj.budget_period}" if obj.budget is not None else "",
                 f"models: {', '.join(obj.allowed_models)}" if obj.allowed_models is not None else ""]
        return "; ".join(part for part in parts if part) or "-"

    @admin.display(description="spent this period", ordering="spent_this_period")
    def spent_this_period(self, obj: ApiKey) -> str:
        """In the key's budget period; without a budget, since 00:00 UTC."""
        spent = getattr(obj, "spent_this_period", None)  # absent on a row not read through get_queryset
        if spent is None:
            spent = selectors.key_spend_this_period(obj, timezone.now())
        period = obj.budget_period if obj.budget is not None else "today (UTC)"
        return f"{format_money(spent)} ({period})"

    @admin.display(description="turns", ordering="turn_total")
    def turn_count(self, obj: ApiKey) -> int:
        total = getattr(obj, "turn_total", None)
        return total if total is not None else obj.turns.count()

    def save_model(self, request, obj, form, change):
        if change:
            # Only what the form changed: a revoke racing this edit is not undone.
            changed = [field for field in form.changed_data if field in ("name", *LIMIT_FIELDS)]
            if changed:
                obj.save(update_fields=changed)
            return
        key, raw = ApiKey.issue(user=obj.user, name=obj.name)
        limits = {field: getattr(obj, field) for field in LIMIT_FIELDS}
        ApiKey.objects.filter(pk=key.pk).update(**limits)
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = key.pk, key.prefix, key.key_hash, key.created_at
        obj._state.adding = False
        # Kept in this request's memory only, for response_add: the key is stored as a hash.
        obj._issued = (obj, raw)

    def response_add(self, request, obj, post_url_continue=None):
        """The only time a key is ever shown: in the answer to the POST that created it.
        Not through a redirect and a message, which would carry it in the messages cookie
        (signed, not encrypted); admin pages are sent `Cache-Control: no-store`."""
        issued = getattr(obj, "_issued", None)
        if issued is None:
            return super().response_add(request, obj, post_url_continue)
        key, raw = issued
        context = {
            **self.admin_site.each_context(request),
            "title": "New API key",
            "opts": self.opts,
            "api_key": key,
            "raw_key": raw,
        }
        return TemplateResponse(request, "admin/accounts/apikey/key_created.html", context)

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        # By id: the changelist's rows carry annotations an UPDATE cannot take.
        selected = list(queryset.values_list("pk", flat=True))
        count = ApiKey.objects.filter(pk__in=selected, revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} key(s).")
