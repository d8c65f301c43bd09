"""Django's middleware, without a thread hop per hook.

In async mode Django's `MiddlewareMixin` runs every `process_request` and
`process_response` through `sync_to_async`: for the seven middleware of a request, a dozen
hops to the request's worker thread, on every request, streamed turns included. Most of
those hooks only read headers and set attributes. These subclasses run such hooks inline
on the event loop, and keep the thread for the ones that can touch the database: saving a
session that was used, storing messages, or checking a form's CSRF token.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.middleware import clickjacking, common, csrf, security


class InlineHooks:
    """`__acall__` running both hooks inline; `_response_needs_thread` says when the response
    hook might do I/O and must run in the request's thread instead."""

    async def __acall__(self, request):
        response = self.process_request(request) if hasattr(self, "process_request") else None
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            if self._response_needs_thread(request):
                response = await sync_to_async(self.process_response, thread_sensitive=True)(request, response)
            else:
                response = self.process_response(request, response)
        return response

    def _response_needs_thread(self, request) -> bool:
        return False


class SecurityMiddleware(InlineHooks, security.SecurityMiddleware):
    pass


class CommonMiddleware(InlineHooks, common.CommonMiddleware):
    pass


class SessionMiddleware(InlineHooks, sessions.SessionMiddleware):
    """Creating the lazy session is free; saving one the request used needs the database."""

    def _response_needs_thread(self, request) -> bool:
        session = getattr(request, "session", None)
        return session is not None and session.accessed


class AuthenticationMiddleware(InlineHooks, auth.AuthenticationMiddleware):
    """`request.user` stays lazy: it is loaded (in a thread) only by code that reads it."""


class CsrfViewMiddleware(InlineHooks, csrf.CsrfViewMiddleware):
    """The token check of an unsafe request may parse the form body: that part runs in the
    thread. Exempt views (the API, which checks CSRF itself for cookie sessions) and safe
    methods are decided inline."""

    async def process_view(self, request, callback, callback_args, callback_kwargs):
        if getattr(callback, "csrf_exempt", False) or request.method in ("GET", "HEAD", "OPTIONS", "TRACE"):
            return super().process_view(request, callback, callback_args, callback_kwargs)
        return await sync_to_async(super().process_view, thread_sensitive=True)(
            request, callback, callback_args, callback_kwargs)


class MessageMiddleware(InlineHooks, messages.MessageMiddleware):
    """Messages that were read or added are stored (a cookie, or the session: the database)."""

    def _response_needs_thread(self, request) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is not None and (storage.used or storage.added_new)


class XFrameOptionsMiddleware(InlineHooks, clickjacking.XFrameOptionsMiddleware):
    pass
