from django.contrib import admin
from django.template.response import TemplateResponse
from django.utils import timezone

from accounts.login_limit import AdminLoginForm
from accounts.models import ApiKey, LoginAttempt

# The admin's password form counts towards the login rate limit, as the chat page's does.
admin.site.login_form = AdminLoginForm


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "user", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["user__username", "name", "prefix"]
    ordering = ["-created_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    fields = ["user", "name", "prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def has_change_permission(self, request, obj=None):
        return obj is None  # a key is created or revoked, never edited

    def save_model(self, request, obj, form, change):
        if change:
            return
        key, raw = ApiKey.issue(user=obj.user, name=obj.name)
        obj.pk = key.pk
        # Kept in this request's memory only, for response_add: the key is stored as a hash.
        obj._issued = (key, raw)

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
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} key(s).")


@admin.register(LoginAttempt)
class LoginAttemptAdmin(admin.ModelAdmin):
    """Failed password logins still counted by the login rate limit; deleting a username's
    rows lifts its lock at once."""

    list_display = ["created_at", "username", "ip"]
    search_fields = ["username", "ip"]
    ordering = ["-created_at"]
    readonly_fields = ["username", "ip", "created_at"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
