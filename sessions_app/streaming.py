"""The SSE relay: upstream deltas out to the client as they come, the turn closed once.

Per chunk this is plain async code: no database, no thread pool. A `LeaseKeeper` beside
the loop renews the turn's lease and checkpoints the partial answer once per period. The
close-time transaction (`finish_turn`) runs exactly once, however the stream ends:

- completed: after the last delta and before the `done` event, which carries the balance;
- failed: the provider sent an error mid-stream; stored before the `error` event;
- cancelled: the client went away. Django cancels the response task, which raises
  CancelledError at our pending `await`; or, if the task was parked in `send()`, the
  generator is closed later and only `finally` runs (Django ticket #37066). Both land in
  `finally`, which closes the upstream and stores the turn, shielded from the cancellation.
  If the client left before this generator ever started, `TurnStreamResponse.close()`
  does the same.
- the close-time write keeps failing: `event: error` with `persistence_failed` and the
  turn id; the sweep closes the turn after its lease, billed from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

from django.conf import settings
from django.http import StreamingHttpResponse

from core.money import format_money
from llm_gateway import GatewayError, StreamingContext
from llm_gateway.sse import encode_comment, encode_event
from sessions_app.live_turn import LeaseKeeper, PersistenceFailed, finish_turn, in_background
from sessions_app.models import Turn
from sessions_app.serializers import turn_usage
from sessions_app.turns import PreparedTurn, TurnOutcome

_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


async def with_heartbeat(chunks: AsyncIterator[str], seconds: float) -> AsyncIterator[str | None]:
    """The deltas of `chunks`, and None each time `seconds` pass without one.

    One reader task and one timer per stream, not a task per chunk: the reader puts the
    deltas in a queue, and the timer puts a None there when the stream was silent for
    `seconds`, so a delta costs one put and one get.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    last = loop.time()

    async def read() -> None:
        try:
            async for item in chunks:
                queue.put_nowait(item)
            queue.put_nowait(_END)
        except Exception as exc:  # a GatewayError: raised to the consumer, in order
            queue.put_nowait(_Failed(exc))

    def tick() -> None:
        nonlocal last, timer
        if loop.time() - last >= seconds * 0.999:
            last = loop.time()
            queue.put_nowait(None)
        timer = loop.call_at(last + seconds, tick)

    reader = asyncio.ensure_future(read())
    timer = loop.call_at(last + seconds, tick)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            if item is not None:
                last = loop.time()
            yield item
    finally:
        timer.cancel()
        reader.cancel()


def ended_outcome(ctx: StreamingContext, status: str, content: str, **extra) -> TurnOutcome:
    """The turn's outcome from what the ended stream says (usage, provider model, finish
    reason, records); the provider had the prompt."""
    ending = ctx.ending
    return TurnOutcome(status=status, content=content, usage=ending.usage, provider_model=ending.provider_model,
                       records=ending.records, finish_reason=ending.finish_reason, prompt_processed=True, **extra)


class Relay:
    """One streamed turn's response body (`frames()`), and what to do if it never starts."""

    def __init__(self, prepared: PreparedTurn, ctx: StreamingContext, *, deadline: float) -> None:
        self.prepared = prepared
        self.ctx = ctx
        self.deadline = deadline  # time.monotonic() after which the answer is cut off
        self.started = False

    async def abandon(self) -> None:
        """The client left before the body was ever iterated: close the upstream and store
        the turn as cancelled."""
        with contextlib.suppress(Exception):
            await self.ctx.aclose()
        with contextlib.suppress(PersistenceFailed):
            await finish_turn(self.prepared, ended_outcome(self.ctx, Turn.Status.CANCELLED, ""))

    async def frames(self) -> AsyncIterator[bytes]:
        self.started = True
        prepared, ctx = self.prepared, self.ctx
        ids = itertools.count(1)
        parts: list[str] = []
        outcome: TurnOutcome | None = None
        keeper = LeaseKeeper(prepared.turn_id, partial=lambda: "".join(parts), on_lost=ctx.aclose).start()
        try:
            yield encode_event("start", {"turn_id": str(prepared.turn_id), "session_id": str(prepared.session_id),
                                         "model": prepared.model}, next(ids))
            async for delta in with_heartbeat(ctx.chunks, settings.PANTHEON_HEARTBEAT_SECONDS):
                if time.monotonic() > self.deadline:
                    # Checked at each delta or heartbeat: a provider that only keeps the
                    # connection alive must not hold the turn (and its credits) forever.
                    with contextlib.suppress(Exception):
                        await ctx.aclose()
                    outcome = ended_outcome(
                        ctx, Turn.Status.FAILED, "".join(parts), error_code="upstream_timeout",
                        error_message=f"The answer took longer than {settings.PANTHEON_MAX_TURN_SECONDS:g} seconds.")
                    break
                if delta is None:
                    yield encode_comment("ping")
                    continue
                parts.append(delta)
                yield encode_event("chunk", {"delta": delta}, next(ids))
            else:  # the chunks are exhausted, so the stream has ended
                outcome = ended_outcome(ctx, Turn.Status.COMPLETED, "".join(parts))
        except GatewayError as exc:
            # Raised by the chunks, so the stream has ended (and `exc` has its records).
            outcome = TurnOutcome.from_error(exc, content="".join(parts))
            outcome.finish_reason = ctx.ending.finish_reason
        finally:
            await keeper.stop()
            if outcome is None:
                # The client went away (CancelledError here, or a late close: GeneratorExit).
                with contextlib.suppress(Exception):
                    await ctx.aclose()
                with contextlib.suppress(PersistenceFailed):
                    await asyncio.shield(in_background(finish_turn(
                        prepared, ended_outcome(ctx, Turn.Status.CANCELLED, "".join(parts)))))

        try:
            result = await asyncio.shield(in_background(finish_turn(prepared, outcome)))
        except PersistenceFailed:
            yield encode_event("error", {"code": "persistence_failed", "turn_id": str(prepared.turn_id),
                                         "message": "The answer could not be stored yet; the turn will be "
                                                    "closed and billed from what was saved."}, next(ids))
            return
        turn = result.turn
        if turn.status == Turn.Status.FAILED:
            yield encode_event("error", {"code": turn.error_code or "upstream_error", "message": turn.error_message,
                                         "turn_id": str(prepared.turn_id)}, next(ids))
            return
        yield encode_event("done", {
            "turn_id": str(prepared.turn_id), "message_id": str(result.message.id) if result.message else None,
            "status": turn.status, "usage": turn_usage(turn), "cost": format_money(turn.cost),
            "balance": format_money(result.balance), "provider_model": turn.provider_model,
            "finish_reason": turn.finish_reason or None,
        }, next(ids))


class TurnStreamResponse(StreamingHttpResponse):
    """The SSE response of a turn. Django always calls `close()` (in a worker thread) when
    the request ends; if the client left before the body was ever iterated, nothing in the
    relay ran, so the upstream is closed and the turn stored as cancelled from here."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay.frames(), content_type="text/event-stream; charset=utf-8")
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"
        self._relay = relay
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if not self._relay.started:
                self._loop.call_soon_threadsafe(lambda: in_background(self._relay.abandon()))
