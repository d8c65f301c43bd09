"""Django's deployment checks of the security middleware, for core/middleware.py's subclasses.

Django's checks look for the exact dotted paths `django.middleware.security.SecurityMiddleware`,
`...clickjacking.XFrameOptionsMiddleware` and `...csrf.CsrfViewMiddleware` in MIDDLEWARE; with
`core.middleware.*` in their place they warn that the middleware is missing (security.W001,
W002, W003, silenced in settings) and skip every check of HSTS, SSL redirect, nosniff, the
referrer policy, X-Frame-Options and the CSRF cookie. Here those checks run with MIDDLEWARE
read as the Django classes each entry subclasses, so `check --deploy` still judges those
settings; a middleware really missing is reported as core.W001, W002 or W003.
"""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Tags, Warning, register
from django.core.checks.security import base, csrf
from django.test.utils import override_settings
from django.utils.module_loading import import_string

_DJANGO_MIDDLEWARE = (
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
)
_PRESENCE = {"security.W001": "core.W001", "security.W002": "core.W002", "security.W003": "core.W003"}
_CHECKS = (
    base.check_security_middleware, base.check_xframe_options_middleware, csrf.check_csrf_middleware,
    base.check_sts, base.check_sts_include_subdomains, base.check_sts_preload,
    base.check_content_type_nosniff, base.check_ssl_redirect, base.check_xframe_deny,
    base.check_referrer_policy, base.check_cross_origin_opener_policy, csrf.check_csrf_cookie_secure,
)


def _as_django_paths(middleware: list[str]) -> list[str]:
    paths = list(middleware)
    for entry in middleware:
        try:
            cls = import_string(entry)
        except ImportError:
            continue  # Django reports a middleware that cannot be imported
        for path in _DJANGO_MIDDLEWARE:
            if path not in paths and isinstance(cls, type) and issubclass(cls, import_string(path)):
                paths.append(path)
    return paths


@register(Tags.security, deploy=True)
def check_security_middleware_subclasses(app_configs, **kwargs):
    messages = []
    with override_settings(MIDDLEWARE=_as_django_paths(settings.MIDDLEWARE)):
        for check in _CHECKS:
            messages.extend(check(app_configs))
    return [Warning(m.msg, hint=m.hint, obj=m.obj, id=_PRESENCE[m.id]) if m.id in _PRESENCE else m
            for m in messages]
