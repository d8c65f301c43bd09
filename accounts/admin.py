from django.contrib import admin

from accounts.login_limit import AdminLoginForm
from accounts.models import LoginAttempt

# The admin's password form counts towards the login rate limit, as the chat page's does.
admin.site.login_form = AdminLoginForm

# The API key admin is billing_app.admin.ApiKeyAdmin: it shows what each key spent, which
# this app cannot read (billing_app sits above accounts).


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
