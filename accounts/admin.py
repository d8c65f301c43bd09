from django.contrib import admin, messages
from django.utils import timezone

from accounts.models import ApiKey


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
        # The only time the key is ever shown: it is stored as a hash.
        messages.warning(request, f"New API key for {obj.user} (copy it now, it will not be shown again): {raw}")

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} key(s).")
