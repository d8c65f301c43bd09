from django.apps import AppConfig


class WebConfig(AppConfig):
    """The browser chat page at `/` and the session login pages (SPEC section 9)."""

    name = "web"
    verbose_name = "Web chat page"
