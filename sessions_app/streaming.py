"""The SSE stream of a turn: one producer per turn, any number of followers.

`LiveTurn` runs the model call in a task of its own (the producer): it keeps the deltas in
memory, and a `LeaseKeeper` beside it renews the turn's lease and checkpoints the partial
answer once per period (never per chunk). Every client of the turn follows it with
`follow()`: the one that asked for it (`POST .../turns/stream`), and any that attach with
`GET /turns/{id}/events` (SPEC section 12), from any event id. Event ids are fixed by the
deltas: `start` is 1, the n-th delta n + 1, the ending (`done` or `error`) the next, so
a replay from what is stored (`chunk_ends` says where each delta ended) has the same ids.

The close-time transaction (`finish_turn`) runs exactly once, however the stream ends:

- completed: after the last delta; `done` carries the balance;
- failed: the provider sent an error mid-stream; stored before the `error` event;
- cancelled: the requesting client went away (unless the turn is resumable: then it runs
  on for PANTHEON_RESUME_GRACE_SECONDS with nobody attached), or POST .../cancel; the
  producer is cancelled, closes the upstream and stores the turn, shielded;
- the close-time write keeps failing: `event: error` with `persistence_failed` and the
  turn id; the sweep closes the turn after its lease, billed from its last checkpoint.

A client of a turn that another process serves follows the turn row instead (polling it,
and asking the serving process to checkpoint often meanwhile: `turn_signals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import uuid
from collections.abc import AsyncGenerator, Callable

from django.conf import settings
from django.http import StreamingHttpResponse

from core.db import db_call
from core.money import format_money
from llm_gateway import GatewayError, StreamingContext
from llm_gateway.sse import encode_comment, encode_event
from sessions_app import metrics, turn_signals
from sessions_app.live_turn import (
    LeaseKeeper,
    PersistenceFailed,
    chunk_ends,
    done_serving,
    finish_turn,
    in_background,
    serve_locally,
)
from sessions_app.models import Turn
from sessions_app.serializers import turn_usage
from sessions_app.turns import PreparedTurn, TurnOutcome, TurnResult, replay_result, turn_progress

logger = logging.getLogger(__name__)

# How often a follower of a turn served by another process reads the turn row.
REMOTE_POLL_SECONDS = 0.25
# How often such a follower reminds the serving process that it watches.
WATCH_SIGNAL_SECONDS = 3.0

_live: dict[uuid.UUID, LiveTurn] = {}
_progress = db_call(turn_progress)
_replay = db_call(replay_result)
_notify = db_call(turn_signals.notify)

def start_frame(turn_id: uuid.UUID, session_id: uuid.UUID, model: str) -> bytes:
    return encode_event("start", {"turn_id": str(turn_id), "session_id": str(session_id), "model": model}, 1)


# A str alone takes the C encoder's fast path: a tenth of json.dumps() of a dict holding it.
_encode_string = json.JSONEncoder(ensure_ascii=False).encode


def chunk_frame(index: int, delta: str) -> bytes:
    """The frame of the turn's `index`-th delta (from 0): `encode_event("chunk", {"delta":
    delta}, index + 2)` byte for byte, with only the text encoded (a frame per token)."""
    return b'id: %d\nevent: chunk\ndata: {"delta": %s}\n\n' % (index + 2, _encode_string(delta).encode())


def chunk_frames(deltas: list[str], start: int) -> bytes:
    """The frames of `deltas[start:]`, the `start`-th delta's first (from 0), as one write."""
    return b"".join([chunk_frame(index, deltas[index]) for index in range(start, len(deltas))])


def ending_frame(result: TurnResult, event_id: int) -> bytes:
    """`done` (completed, cancelled, interrupted) or `error` (failed), from the stored turn."""
    turn = result.turn
    if turn.status == Turn.Status.FAILED:
        return encode_event("error", {"code": turn.error_code or "upstream_error", "message": turn.error_message,
                                      "turn_id": str(turn.id)}, event_id)
    return encode_event("done", {
        "turn_id": str(turn.id), "message_id": str(result.message.id) if result.message else None,
        "status": turn.status, "usage": turn_usage(turn), "cost": format_money(turn.cost),
        "balance": format_money(result.balance), "served_model": turn.served_model,
        "provider_model": turn.provider_model,
        "finish_reason": turn.finish_reason or None,
    }, event_id)


def split_text(text: str, ends: list[int] | None) -> list[str]:
    """A stored answer cut into its deltas again (one piece if it was not streamed)."""
    if not ends:
        return [text] if text else []
    starts = [0, *ends[:-1]]
    return [text[a:b] for a, b in zip(starts, ends, strict=True)]


def ended_outcome(ctx: StreamingContext, status: str, content: str, served_model: str, **extra) -> TurnOutcome:
    """The turn's outcome from what the ended stream says (usage, provider model, finish
    reason, records); the provider had the prompt."""
    ending = ctx.ending
    return TurnOutcome(status=status, content=content, usage=ending.usage, provider_model=ending.provider_model,
                       records=ending.records, finish_reason=ending.finish_reason, prompt_processed=True,
                       tool_calls=list(ending.tool_calls), served_model=served_model, **extra)


class LiveTurn:
    """A streamed turn this process serves: the producer task and what it produced so far."""

    def __init__(self, prepared: PreparedTurn, ctx: StreamingContext, *, deadline: float, resumable: bool,
                 served_model: str = "") -> None:
        self.prepared = prepared
        self.ctx = ctx
        # The candidate whose stream this is (SPEC section 15).
        self.served_model = served_model or prepared.model
        self.deadline = deadline  # loop time after which the answer is cut off
        self.resumable = resumable
        self.parts: list[str] = []  # the text deltas (checkpointed; the event ids stand on them)
        # Everything the stream handed out, in order: the text deltas and, with the client's
        # tools (the OpenAI front door), its ToolCallDelta pieces; the same list without.
        self.items: list = [] if prepared.client_tools else self.parts
        self.start = start_frame(prepared.turn_id, prepared.session_id, prepared.model)
        self.ending: bytes | None = None
        self.result: TurnResult | None = None  # the stored turn, once closed
        self.ending_id = 0
        self.followers = 0
        self.watched_until = 0.0  # loop time until which a client in another process follows
        self._waiters: list[asyncio.Future] = []
        self._grace: asyncio.TimerHandle | None = None
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self.task: asyncio.Task | None = None
        self.keeper: LeaseKeeper | None = None
        self.requester_followed = False  # the requester's body began

    def begin(self) -> LiveTurn:
        _live[self.prepared.turn_id] = self
        serve_locally(self.prepared.turn_id, self.stop)
        self.task = in_background(self._produce())
        metrics.stream_started()
        self.task.add_done_callback(metrics.stream_ended_callback)
        return self

    def stop(self) -> None:
        """Cancel the model call (the turn is stored as cancelled), unless it already ended."""
        if not self._closing and self.task is not None and not self.task.done():
            self.task.cancel()

    def watched(self) -> None:
        """A client in another process follows this turn (it reads the checkpoints)."""
        self.watched_until = self._loop.time() + 2 * WATCH_SIGNAL_SECONDS
        if self.keeper is not None:
            self.keeper.poke()

    def wait(self) -> asyncio.Future:
        """A future resolved (with False) at the next delta or at the end."""
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        return waiter

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(False)

    def attach(self) -> None:
        self.followers += 1
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def detach(self, *, requester: bool) -> None:
        self.followers -= 1
        if self.ending is not None or self._closing:
            return
        if requester and not self.resumable:
            self.stop()  # SPEC section 5: the client going away cancels
        elif self.followers <= 0 and self.resumable and self._grace is None:
            self._grace = self._loop.call_later(settings.PANTHEON_RESUME_GRACE_SECONDS, self._grace_over)

    def requester_closed(self) -> None:
        """The requester's response was closed: if its body never began (the client left
        while the headers went out), that is the requester leaving."""
        if not self.requester_followed:
            self.requester_followed = True
            self.followers += 1
            self.detach(requester=True)

    def _grace_over(self) -> None:
        self._grace = None
        if self.followers <= 0:
            self.stop()

    def _add(self, delta) -> None:
        """One delta handed out: kept, and the followers woken."""
        if delta.__class__ is str:
            self.parts.append(delta)
        if self.items is not self.parts:
            self.items.append(delta)
        if self._waiters:
            self._wake()

    async def _produce(self) -> None:
        prepared, ctx = self.prepared, self.ctx
        outcome: TurnOutcome | None = None
        keeper = self.keeper = LeaseKeeper(prepared.turn_id, parts=self.parts, on_lost=ctx.aclose,
                                           on_cancel=self.stop,
                                           watched=lambda: self.watched_until > self._loop.time(),
                                           generation_id=lambda: ctx.generation_id,
                                           served_model=self.served_model).start()
        served = self.served_model
        try:
            async with asyncio.timeout_at(self.deadline):
                for delta in ctx.prefetched:  # read by the routing before the stream was handed out
                    self._add(delta)
                async for delta in ctx.chunks:
                    self._add(delta)
            outcome = ended_outcome(ctx, Turn.Status.COMPLETED, "".join(self.parts), served)
        except TimeoutError:
            # A provider that only keeps the connection alive must not hold the turn (and
            # its credits) forever.
            self._closing = True
            with contextlib.suppress(Exception):
                await ctx.aclose()
            outcome = ended_outcome(
                ctx, Turn.Status.FAILED, "".join(self.parts), served, error_code="upstream_timeout",
                error_message=f"The answer took longer than {settings.PANTHEON_MAX_TURN_SECONDS:g} seconds.")
        except GatewayError as exc:
            # Raised by the chunks, so the stream has ended (and `exc` has its records).
            outcome = TurnOutcome.from_error(exc, content="".join(self.parts), served_model=served)
            outcome.finish_reason = ctx.ending.finish_reason
        except asyncio.CancelledError:
            # Stopped: the requesting client left, the grace ran out, or POST .../cancel.
            self._closing = True
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            with contextlib.suppress(Exception):
                await ctx.aclose()
            outcome = ended_outcome(ctx, Turn.Status.CANCELLED, "".join(self.parts), served)
        finally:
            self._closing = True
            await keeper.stop()
        outcome.chunk_ends = chunk_ends(self.parts) or None
        self.ending_id = len(self.parts) + 2
        try:
            result = self.result = await asyncio.shield(in_background(finish_turn(prepared, outcome)))
            self.ending = ending_frame(result, self.ending_id)
        except Exception:
            if not isinstance(sys.exception(), PersistenceFailed):
                logger.exception("turn %s: the stream's ending failed", prepared.turn_id)
        finally:
            if self.ending is None:  # the followers end too, and the sweep closes the turn
                self.ending = encode_event("error", {
                    "code": "persistence_failed", "turn_id": str(prepared.turn_id),
                    "message": "The answer could not be stored yet; the turn will be closed and billed from what "
                               "was saved."}, self.ending_id)
            _live.pop(prepared.turn_id, None)
            done_serving(prepared.turn_id)
            self._wake()


turn_signals.subscribe("watch", lambda turn_id: _live[turn_id].watched() if turn_id in _live else None)


def live_turn(turn_id: uuid.UUID) -> LiveTurn | None:
    return _live.get(turn_id)


class Heartbeat:
    """Wakes a follower's current wait with True when it sent nothing for `seconds`: one
    timer per follower, not one per wait."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.waiter: asyncio.Future | None = None
        self.timer = self.loop.call_at(self.last + seconds, self._tick)

    def sent(self) -> None:
        self.last = self.loop.time()

    def _tick(self) -> None:
        now = self.loop.time()
        if now - self.last >= self.seconds * 0.999:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(True)
            self.timer = self.loop.call_at(now + self.seconds, self._tick)
        else:
            self.timer = self.loop.call_at(self.last + self.seconds, self._tick)

    def close(self) -> None:
        self.timer.cancel()


async def follow_live(live: LiveTurn, after: int, *, requester: bool = False) -> AsyncGenerator[bytes, None]:
    """The frames of a turn this process serves with an id above `after`, live to its end."""
    live.attach()
    if requester:
        live.requester_followed = True
    beat = Heartbeat(settings.PANTHEON_HEARTBEAT_SECONDS)
    try:
        if after < 1:
            yield live.start
        sent = max(after - 1, 0)  # deltas the client has
        while True:
            parts = live.parts
            if sent < len(parts):
                # The deltas that arrived since the last wake, in one write (one upstream read
                # often carries many): as a relay forwards what it read.
                yield chunk_frames(parts, sent)
                sent = len(parts)
                beat.sent()
            if live.ending is not None:
                if live.ending_id > after:
                    yield live.ending
                return
            beat.waiter = live.wait()
            if await beat.waiter:
                yield encode_comment("ping")
                beat.sent()
    finally:
        beat.close()
        live.detach(requester=requester)


async def follow_stored(turn_id: uuid.UUID, after: int, *,
                        known: Turn | None = None) -> AsyncGenerator[bytes, None]:
    """The frames with an id above `after` of a turn this process does not serve: while
    another process serves it, from its checkpoints (read every REMOTE_POLL_SECONDS, with
    that process asked to checkpoint that often); then, or at once, from what is stored.
    `known`: the turn as the caller just read it (an ended one is not read again)."""
    loop = asyncio.get_running_loop()
    sent = max(after - 1, 0)
    started = after >= 1
    last_signal = last_frame = -1e9
    while known is None or known.status == Turn.Status.RUNNING:
        known = None
        progress = await _progress(turn_id)
        if progress is None or progress.status != Turn.Status.RUNNING:
            break
        live = _live.get(turn_id)
        if live is not None:  # served here after all (it started here after the first read)
            async with contextlib.aclosing(follow_live(live, sent + 1 if started else 0)) as frames:
                async for frame in frames:
                    yield frame
            return
        if not started:
            yield start_frame(turn_id, progress.session_id, progress.model)
            started, last_frame = True, loop.time()
        pieces = split_text(progress.text, progress.chunk_ends)
        if sent < len(pieces):
            yield chunk_frames(pieces, sent)
            sent = len(pieces)
            last_frame = loop.time()
        if loop.time() - last_signal >= WATCH_SIGNAL_SECONDS:
            last_signal = loop.time()
            with contextlib.suppress(Exception):
                await _notify("watch", turn_id)
        if loop.time() - last_frame >= settings.PANTHEON_HEARTBEAT_SECONDS:
            yield encode_comment("ping")
            last_frame = loop.time()
        await asyncio.sleep(REMOTE_POLL_SECONDS)
    result = await _replay(turn_id, turn=known)
    if result is None:
        return
    turn = result.turn
    if not started:
        yield start_frame(turn.id, turn.session_id, turn.model)
    pieces = split_text(result.message.content if result.message else "", turn.chunk_ends)
    if sent < len(pieces):
        yield chunk_frames(pieces, sent)
        sent = len(pieces)
    ending_id = len(pieces) + 2
    if ending_id > after:
        yield ending_frame(result, ending_id)


def follow(turn_id: uuid.UUID, after: int, *, known: Turn | None = None) -> AsyncGenerator[bytes, None]:
    """The frames of any turn with an id above `after`, to its end."""
    live = _live.get(turn_id)
    return follow_live(live, after) if live is not None else follow_stored(turn_id, after, known=known)


class TurnStreamResponse(StreamingHttpResponse):
    """The SSE response of a turn. Django always calls `close()` (in a worker thread) when
    the request ends. Django does not close the body's generator itself (ticket #37066:
    only its own wrapper), so the follower is closed from here, at once: it detaches (which
    may stop the turn or start its grace). `on_close` then runs on the event loop, also when
    the client left before the body was ever iterated (and nothing of the follower ran)."""

    def __init__(self, frames: AsyncGenerator[bytes, None], *, on_close: Callable[[], None] | None = None) -> None:
        super().__init__(frames, content_type="text/event-stream; charset=utf-8")
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"
        self._frames = frames
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._loop.call_soon_threadsafe(lambda: in_background(self._closed()))

    async def _closed(self) -> None:
        with contextlib.suppress(Exception):  # already finished, or finishing: nothing to do
            await self._frames.aclose()
        if self._on_close is not None:
            self._on_close()


def stream_response(live: LiveTurn) -> TurnStreamResponse:
    """The requester's response, from the start; its client going away is the requester's."""
    return TurnStreamResponse(follow_live(live, 0, requester=True), on_close=live.requester_closed)
