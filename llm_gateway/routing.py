"""Routing a call over candidate models, with fallbacks and cooldowns (SPEC section 15).

A caller gives the candidates in order: each a model name of its own (the catalogue's),
the provider that serves it (an `Upstream`, or None for the configured one) and the id to
send. `generate()` and `stream()` try them in turn; each candidate gets its gateway's usual
bounded retries first. A candidate is abandoned for the next only when it failed before any
output could reach the client (`falls_back`): no connection, a timeout before the first
token, or HTTP 401, 403, 404, 408, 429, 5xx. A 400 (or any other failure) is the request's
fault and ends the call. A stream is handed back only once its first delta arrived
(`StreamingContext.prefetch`; with a lone candidate, as soon as it is accepted), so a
provider that accepts a stream and then stalls or sends an error chunk is still abandoned;
after the first delta there is no fallback.

Every attempt's `CallRecord`s carry the candidate's `model` and `upstream`, in the order
they were made: the result's (or the error's) `records` holds all of them. The error of a
call whose every candidate failed is the last candidate's, with `model` set to it.

Cooldowns are per process (`COOLDOWNS`): a candidate that failed that way in
`failures` calls in a row is skipped for `seconds` while another candidate is not cooling
down; when all are, they are all tried, in order (a call is never refused for a cooldown).
A success ends a candidate's run of failures. Nothing here knows of sessions or wallets.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import Upstream, get_gateway
from .base import (
    CallRecord,
    Completion,
    GatewayError,
    StreamingContext,
    UpstreamError,
    UpstreamTimeout,
)

__all__ = ["COOLDOWNS", "Attempts", "Candidate", "Cooldowns", "falls_back", "generate", "stream"]

# The provider statuses after which another model may answer (SPEC section 15).
FALLBACK_STATUSES = frozenset({401, 403, 404, 408, 429})


@dataclasses.dataclass(frozen=True)
class Candidate:
    model: str  # the caller's name of the model (the catalogue's): what cooldowns count
    upstream: Upstream | None  # None: the provider the settings configure
    upstream_model: str  # the id sent to the provider


def falls_back(exc: GatewayError) -> bool:
    """Whether another candidate may be tried after `exc` (nothing was sent downstream)."""
    if isinstance(exc, UpstreamTimeout):
        return True
    if isinstance(exc, UpstreamError):
        if exc.status is None:
            return exc.unreachable
        return exc.status in FALLBACK_STATUSES or exc.status >= 500
    return False


class Cooldowns:
    """Per-process runs of failures by model name; thread-safe (one lock, held briefly)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}  # monotonic time the cooldown ends
        # Called with (model, seconds) when a cooldown starts (metrics); must not raise.
        self.listeners: list[Callable[[str, float], None]] = []

    def cooling(self, model: str, now: float | None = None) -> bool:
        until = self._until.get(model)
        return until is not None and (now if now is not None else time.monotonic()) < until

    def failed(self, model: str, *, failures: int, seconds: float) -> bool:
        """Count a failure; True when it starts a cooldown."""
        with self._lock:
            count = self._failures.get(model, 0) + 1
            started = count >= max(failures, 1)
            self._failures[model] = 0 if started else count
            if started:
                self._until[model] = time.monotonic() + seconds
        if started:
            for listener in self.listeners:
                listener(model, seconds)
        return started

    def succeeded(self, model: str) -> None:
        if self._failures.get(model) or model in self._until:
            with self._lock:
                self._failures.pop(model, None)
                self._until.pop(model, None)

    def cooling_now(self) -> dict[str, float]:
        """The models cooling down and the seconds left (for metrics and the admin)."""
        now = time.monotonic()
        with self._lock:
            return {model: until - now for model, until in self._until.items() if until > now}

    def clear(self) -> None:
        with self._lock:
            self._failures.clear()
            self._until.clear()


COOLDOWNS = Cooldowns()


def _settings() -> tuple[int, float]:
    from django.conf import settings  # lazily, as get_gateway does

    return (int(getattr(settings, "PANTHEON_COOLDOWN_FAILURES", 3)),
            float(getattr(settings, "PANTHEON_COOLDOWN_SECONDS", 30.0)))


def _order(candidates: Sequence[Candidate], cooldowns: Cooldowns) -> list[Candidate]:
    if not candidates:
        raise ValueError("no candidates")
    now = time.monotonic()
    ready = [candidate for candidate in candidates if not cooldowns.cooling(candidate.model, now)]
    return ready or list(candidates)


def _label(records: list[CallRecord], candidate: Candidate, upstream_name: str) -> list[CallRecord]:
    for record in records:
        record.model, record.upstream = candidate.model, upstream_name
    return records


class Attempts:
    """What a routed call tried so far, for its caller to read while the call runs (a caller
    cancelled meanwhile still stores them): the failed candidates' records, in order, and
    the candidate being tried now."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.current: Candidate | None = None


class _Run:
    """One routed call: its attempts, and what a failure means."""

    def __init__(self, cooldowns: Cooldowns, attempts: Attempts | None) -> None:
        self.cooldowns = cooldowns
        self.attempts = attempts if attempts is not None else Attempts()
        self.records = self.attempts.records
        self.failures, self.seconds = _settings()

    def trying(self, candidate: Candidate) -> None:
        self.attempts.current = candidate

    def failed(self, exc: GatewayError, candidate: Candidate, upstream_name: str, *, last: bool,
               produced: bool = False) -> bool:
        """Record a failed candidate; True to try the next one, else `exc` is to be raised
        (its records are then every attempt's, its `model` this candidate)."""
        self.records += _label(exc.records, candidate, upstream_name)
        exc.model = candidate.model
        fallback = falls_back(exc) and not produced
        if fallback:
            self.cooldowns.failed(candidate.model, failures=self.failures, seconds=self.seconds)
        if fallback and not last:
            return True
        exc.records = list(self.records)
        return False

    def succeeded(self, records: list[CallRecord], candidate: Candidate, upstream_name: str) -> list[CallRecord]:
        self.cooldowns.succeeded(candidate.model)
        return [*self.records, *_label(records, candidate, upstream_name)]


async def generate(candidates: Sequence[Candidate], *, cooldowns: Cooldowns = COOLDOWNS,
                   attempts: Attempts | None = None, **kwargs: Any) -> tuple[Completion, Candidate]:
    """`LlmGateway.generate()` over the candidates; the completion and the one that gave it.
    Its `records` are every attempt's (`attempts`, if given, follows them as they happen).
    A tool loop that already had a round answered is not started again elsewhere: its
    failure ends the call."""
    order = _order(candidates, cooldowns)
    run = _Run(cooldowns, attempts)
    for position, candidate in enumerate(order):
        run.trying(candidate)
        gateway = get_gateway(candidate.upstream)
        try:
            completion = await gateway.generate(model=candidate.upstream_model, **kwargs)
        except GatewayError as exc:
            answered = any(record.status == "ok" for record in exc.records)
            if run.failed(exc, candidate, gateway.upstream_name, last=position == len(order) - 1,
                          produced=answered):
                continue
            raise
        completion.records = run.succeeded(completion.records, candidate, gateway.upstream_name)
        return completion, candidate
    raise AssertionError("unreachable")


async def stream(candidates: Sequence[Candidate], *, cooldowns: Cooldowns = COOLDOWNS,
                 attempts: Attempts | None = None, **kwargs: Any) -> tuple[StreamingContext, Candidate]:
    """`LlmGateway.stream()` over the candidates; the open stream and its candidate.

    With more than one candidate, a stream is handed back once its first delta arrived (in
    `prefetched`), so a failure before any output still falls back, and when every
    candidate failed before any output the caller gets the last one's error (nothing was
    streamed, nothing is owed). A lone candidate's stream is handed back as soon as the
    provider accepted it, as without routing (its client gets heartbeats while the model
    thinks). Its `prior_records` are then every earlier attempt's."""
    order = _order(candidates, cooldowns)
    run = _Run(cooldowns, attempts)
    for position, candidate in enumerate(order):
        last = position == len(order) - 1
        run.trying(candidate)
        gateway = get_gateway(candidate.upstream)
        ctx: StreamingContext | None = None
        try:
            ctx = await gateway.stream(model=candidate.upstream_model, **kwargs)
            if len(order) > 1:
                await ctx.prefetch()
        except GatewayError as exc:
            if run.failed(exc, candidate, gateway.upstream_name, last=last):
                continue
            raise
        except BaseException:
            if ctx is not None:  # cancelled while waiting for the first delta
                await ctx.aclose()
            raise
        # The stream's own record is labelled now; it is filled in as the stream goes.
        _label([*ctx.prior_records, ctx.record], candidate, gateway.upstream_name)
        run.cooldowns.succeeded(candidate.model)
        ctx.add_prior_records(list(run.records))
        return ctx, candidate
    raise AssertionError("unreachable")
