"""The SSE relay: upstream deltas out to the client as they come, persistence once at close.

Per chunk this is plain async code: no database, no thread pool. `record` (the one
close-time persistence function) runs exactly once, when the stream ends, however it ends:

- completed: after the last delta and before the `done` event, which carries the balance;
- failed: the provider sent an error mid-stream; recorded before the `error` event;
- cancelled: the client went away. Django cancels the response task, which raises
  CancelledError at our pending `await`; or, if the task was parked in `send()`, the
  generator is closed later and only `finally` runs (Django ticket #37066). Both land in
  `finally`, which closes the upstream and records the turn, shielded from the
  cancellation. `record_turn` is idempotent by turn id in case anything runs it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

from django.conf import settings

from core.money import format_money
from llm_gateway import GatewayError, StreamingContext
from llm_gateway.sse import encode_comment, encode_event
from sessions_app.models import Turn
from sessions_app.serializers import turn_usage
from sessions_app.turns import PreparedTurn, TurnOutcome, TurnResult

RecordTurn = Callable[[PreparedTurn, TurnOutcome], Awaitable[TurnResult]]
_END = object()


async def with_heartbeat(chunks: AsyncIterator[str], seconds: float) -> AsyncIterator[str | None]:
    """The deltas of `chunks`, and None each time `seconds` pass without one."""
    iterator = chunks.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator, _END))
            done, _ = await asyncio.wait((pending,), timeout=seconds)
            if not done:
                yield None
                continue
            item, pending = pending.result(), None
            if item is _END:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()


def _provider_model(ctx: StreamingContext) -> str:
    done = ctx.provider_model_future.done() and not ctx.provider_model_future.cancelled()
    return (ctx.provider_model_future.result() if done else None) or ctx.record.provider_model or ""


def _reported_usage(ctx: StreamingContext):
    done = ctx.usage_future.done() and not ctx.usage_future.cancelled()
    return ctx.usage_future.result() if done else None


async def relay(prepared: PreparedTurn, ctx: StreamingContext, record: RecordTurn) -> AsyncIterator[bytes]:
    ids = itertools.count(1)
    parts: list[str] = []
    ended = False  # the upstream ended, with its last delta or with an error
    failure: GatewayError | None = None
    try:
        yield encode_event("start", {"turn_id": str(prepared.turn_id), "session_id": str(prepared.session_id),
                                     "model": prepared.model}, next(ids))
        async for delta in with_heartbeat(ctx.chunks, settings.PANTHEON_HEARTBEAT_SECONDS):
            if delta is None:
                yield encode_comment("ping")
                continue
            parts.append(delta)
            yield encode_event("chunk", {"delta": delta}, next(ids))
        ended = True
    except GatewayError as exc:
        ended, failure = True, exc
    finally:
        if not ended:
            # The client went away (CancelledError here, or a late close: GeneratorExit).
            with contextlib.suppress(Exception):
                await ctx.aclose()
            await asyncio.shield(record(prepared, TurnOutcome(
                status=Turn.Status.CANCELLED, content="".join(parts), usage=_reported_usage(ctx),
                provider_model=_provider_model(ctx), records=ctx.records,
            )))

    content = "".join(parts)
    if failure is not None:
        await asyncio.shield(record(prepared, TurnOutcome.from_error(failure, content=content)))
        yield encode_event("error", {"code": failure.code, "message": failure.message,
                                     "turn_id": str(prepared.turn_id)}, next(ids))
        return
    result = await asyncio.shield(record(prepared, TurnOutcome(
        status=Turn.Status.COMPLETED, content=content, usage=await ctx.usage_future,
        provider_model=_provider_model(ctx), records=ctx.records,
    )))
    yield encode_event("done", {
        "turn_id": str(prepared.turn_id), "message_id": str(result.message.id), "status": result.turn.status,
        "usage": turn_usage(result.turn), "cost": format_money(result.turn.cost),
        "balance": format_money(result.balance), "provider_model": result.turn.provider_model,
    }, next(ids))
