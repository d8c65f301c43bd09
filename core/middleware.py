"""Django's middleware, without a thread hop per hook.

In async mode Django's `MiddlewareMixin` runs every `process_request` and
`process_response` through `sync_to_async`: for the seven middleware of a request, a dozen
hops to the request's worker thread, on every request, streamed turns included. Most of
those hooks only read headers and set attributes. These subclasses run such hooks inline
on the event loop, and keep the thread for the ones that can touch the database: saving a
session that was used, storing messages, or checking a form's CSRF token.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from asgiref.sync import sync_to_async
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.middleware import clickjacking, common, csrf, security
from django.utils.deprecation import MiddlewareMixin
from django.utils.functional import SimpleLazyObject, empty

from core.logging import begin_log_context, end_log_context


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


access_logger = logging.getLogger("pantheon.access")
# An incoming X-Request-ID is kept when it looks like an id (nginx's $request_id, a UUID, a
# trace id); anything else is replaced, so a log line cannot be forged through it.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:=+/-]{1,128}", re.ASCII)


class RequestLogMiddleware(MiddlewareMixin):
    """The request id and the access log line, first in MIDDLEWARE.

    Every request gets a `LogContext` (core/logging.py) with its request id: the client's
    `X-Request-ID` if sane, else a new one, echoed in the response's `X-Request-ID`. One
    access line per request (logger `pantheon.access`: method, path, status, duration_ms,
    and user_id/turn_id when known) is written when the response is complete: for a
    streamed response (SSE) when its body ends, from Django's `close()` of it (also when the
    client left mid-stream), with `headers_ms` for the time to the first byte; a client
    gone before any response is status 499. No work per streamed chunk, no thread hop."""

    def __call__(self, request):
        if self.async_mode:
            return self.__acall__(request)
        started = time.perf_counter()
        context, token = self._begin(request)
        try:
            response = self.get_response(request)
            self._finish(request, response, context, started)
            return response
        finally:
            end_log_context(token)  # a sync server's thread serves the next request

    async def __acall__(self, request):
        # The context is not reset here: the request's task goes on after the middleware
        # (Django sends a streamed body from it) and ends with the request.
        started = time.perf_counter()
        context, _ = self._begin(request)
        try:
            response = await self.get_response(request)
        except asyncio.CancelledError:
            self._log(request, context, 499, started)
            raise
        self._finish(request, response, context, started)
        return response

    @staticmethod
    def _begin(request):
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if _SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        return begin_log_context(request_id)

    def _finish(self, request, response, context, started: float) -> None:
        response["X-Request-ID"] = context.request_id
        if not response.streaming:
            self._log(request, context, response.status_code, started)
            return
        headers_ms = round((time.perf_counter() - started) * 1000, 1)
        response._resource_closers.append(
            lambda: self._log(request, context, response.status_code, started, headers_ms=headers_ms))

    @staticmethod
    def _log(request, context, status: int, started: float, **fields) -> None:
        if context.user_id is None:
            context.user_id = _loaded_user_id(request)
        duration_ms = round((time.perf_counter() - started) * 1000, 1)
        access_logger.info("%s %s %s %.1fms", request.method, request.path, status, duration_ms,
                           extra={"method": request.method, "path": request.path, "status": status,
                                  "duration_ms": duration_ms, **fields})


def _loaded_user_id(request) -> int | None:
    """The request's user id if something already loaded the user (DRF's authentication,
    the session): the access log never queries the database for it."""
    user = request.__dict__.get("user")
    if isinstance(user, SimpleLazyObject):
        user = user._wrapped
        if user is empty:
            return None
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    return user.pk
