"""The Content-Security-Policy header, from django-csp (policy: CONTENT_SECURITY_POLICY in
pantheon/settings.py; docs/chat-page.md).

django-csp's `CSPMiddleware` is a `MiddlewareMixin`: in async mode Django would run both of
its hooks through `sync_to_async`, two thread hops on every request. Neither hook does I/O
(one sets a lazy nonce, the other builds the header from settings), so they run inline on
the event loop, like Django's own middleware in core/middleware.py."""

from csp.middleware import CSPMiddleware as DjangoCSPMiddleware

from core.middleware import InlineHooks


class CSPMiddleware(InlineHooks, DjangoCSPMiddleware):
    pass
