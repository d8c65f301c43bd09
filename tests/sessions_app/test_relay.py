"""The relay's ways of ending, driven directly (no server, no database: the close-time
write and the lease keeper are replaced by stand-ins): a LiveTurn producing, followers
following it."""

import asyncio
import json
import time
import uuid
from decimal import Decimal
from types import SimpleNamespace

import pytest

from llm_gateway import CallRecord, StreamingContext, UpstreamError, Usage
from sessions_app import streaming
from sessions_app.streaming import LiveTurn, follow_live


def prepared():
    return SimpleNamespace(turn_id=uuid.uuid4(), session_id=uuid.uuid4(), model="m", resumable=False,
                           client_tools=None)


class Scripted(StreamingContext):
    """A stream with the gateways' lifecycle and a scripted source: `pieces`, then a wait for
    `gate` if given, then an error if `fail`. Usage and provider model are known up front."""

    def __init__(self, pieces, *, fail: bool = False, gate: asyncio.Event | None = None):
        self.pieces, self.fail, self.gate = pieces, fail, gate
        self.closed = []  # one entry per aclose()
        super().__init__(record=CallRecord(requested_model="m"), started=time.monotonic())
        self._usage, self._provider_model = Usage(3, 4), "p/m"

    async def _chunks(self):
        async with self._running():
            for piece in self.pieces:
                yield self._sent(piece)
            if self.gate is not None:
                await self.gate.wait()
            if self.fail:
                raise UpstreamError("boom", usage=Usage(1, 1))

    async def _disconnect(self):
        pass

    async def aclose(self):
        self.closed.append(True)
        await super().aclose()


def context(pieces, *, fail: bool = False, gate: asyncio.Event | None = None):
    return Scripted(pieces, fail=fail, gate=gate)


class Recorder:
    def __init__(self):
        self.calls = []

    async def __call__(self, prepared, outcome):
        self.calls.append(outcome)
        message = SimpleNamespace(id=uuid.uuid4())
        turn = SimpleNamespace(id=prepared.turn_id, status=outcome.status, cost=Decimal("0.1"),
                               provider_model=outcome.provider_model, served_model=outcome.served_model,
                               prompt_tokens=3, completion_tokens=4, total_tokens=7, usage_estimated=False,
                               reconciled=False,
                               error_code=outcome.error_code, error_message=outcome.error_message,
                               finish_reason=outcome.finish_reason)
        return SimpleNamespace(turn=turn, message=message, balance=Decimal("1"))


class NoKeeper:
    def __init__(self, *args, **kwargs):
        pass

    def start(self):
        return self

    async def stop(self):
        pass


@pytest.fixture
def record(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(streaming, "finish_turn", recorder)
    monkeypatch.setattr(streaming, "LeaseKeeper", NoKeeper)
    monkeypatch.setattr(streaming, "serve_locally", lambda turn_id, stop: None)
    monkeypatch.setattr(streaming, "done_serving", lambda turn_id: None)
    return recorder


def live(ctx, *, resumable=False):
    loop = asyncio.get_running_loop()
    return LiveTurn(prepared(), ctx, deadline=loop.time() + 1e6, resumable=resumable).begin()


def relay(ctx):
    return follow_live(live(ctx), 0, requester=True)


def ids(writes):
    """The event ids in `writes` (what a follower yielded: each one frame or several)."""
    return [int(frame.split(b"\n")[0].removeprefix(b"id: ")) for write in writes for frame in write.split(b"\n\n")
            if frame.startswith(b"id: ")]


async def test_completed_records_once_before_done(record):
    ctx = context(["a", "b"])
    frames = [f async for f in relay(ctx)]
    assert [o.status for o in record.calls] == ["completed"]
    assert record.calls[0].content == "ab" and record.calls[0].usage == Usage(3, 4)
    assert record.calls[0].chunk_ends == [1, 2]
    assert record.calls[0].provider_model == "p/m" and record.calls[0].records == [ctx.record]
    assert ctx.record.status == "ok"
    assert b"event: done" in frames[-1]
    assert ids(frames) == [1, 2, 3, 4]


async def test_error_records_failed_with_partial_text_then_sends_error(record):
    frames = [f async for f in relay(context(["a"], fail=True))]
    assert [(o.status, o.content) for o in record.calls] == [("failed", "a")]
    assert b"event: error" in frames[-1]


async def test_late_close_of_a_parked_generator_still_records_cancelled(record):
    """Django may close the generator later from another task (ticket #37066): then only
    `finally` runs. aclose() on a generator paused at `yield` is exactly that. What the
    provider sent is stored, also what the client had no time to read."""
    gate = asyncio.Event()
    ctx = context(["a", "b", "c"], gate=gate)
    turn = live(ctx)
    stream = follow_live(turn, 0, requester=True)
    assert b"event: start" in await anext(stream)
    assert b'"a"' in await anext(stream)
    await stream.aclose()
    await turn.task
    assert [(o.status, o.content) for o in record.calls] == [("cancelled", "abc")]
    assert ctx.closed == [True] and ctx.record.status == "cancelled"
    assert b'"status": "cancelled"' in turn.ending


async def test_cancellation_while_waiting_for_the_upstream_records_cancelled(record):
    gate = asyncio.Event()
    ctx = context(["a"], gate=gate)
    turn = live(ctx)

    async def consume():
        async for _ in follow_live(turn, 0, requester=True):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await turn.task
    assert [(o.status, o.content) for o in record.calls] == [("cancelled", "a")]
    assert ctx.closed == [True]


async def test_a_resumable_turn_runs_on_without_its_client_and_a_follower_gets_the_rest(record):
    gate = asyncio.Event()
    ctx = context(["a", "b"], gate=gate)
    turn = live(ctx, resumable=True)
    first = follow_live(turn, 0, requester=True)
    seen = [await anext(first), await anext(first)]  # start; "a" and "b", which came together
    assert ids(seen) == [1, 2, 3]
    await first.aclose()
    assert not turn.task.done()
    gate.set()
    await turn.task
    assert [(o.status, o.content) for o in record.calls] == [("completed", "ab")]
    rest = [f async for f in follow_live(turn, 2)]  # a client that had only "a"
    assert ids(rest) == [3, 4]
    assert b'"b"' in rest[0] and b"event: done" in rest[-1]


async def test_the_deltas_that_arrived_together_go_out_in_one_write(record):
    """As a relay writes what it read: here the three deltas of one read, then the ending."""
    writes = [f async for f in relay(context(["a", "b", "c"]))]
    assert len(writes) == 3 and ids(writes) == [1, 2, 3, 4, 5]
    assert [frame.split(b"\n")[1] for frame in writes[1].split(b"\n\n") if frame] == [b"event: chunk"] * 3


async def test_a_resumable_turn_nobody_follows_is_cancelled_after_the_grace(record, settings):
    settings.PANTHEON_RESUME_GRACE_SECONDS = 0.1
    ctx = context(["a"], gate=asyncio.Event())
    turn = live(ctx, resumable=True)
    stream = follow_live(turn, 0, requester=True)
    await anext(stream)
    await stream.aclose()
    await asyncio.wait_for(turn.task, 2)
    assert [(o.status, o.content) for o in record.calls] == [("cancelled", "a")]


async def test_stop_cancels_and_every_follower_gets_done_cancelled(record):
    ctx = context(["a"], gate=asyncio.Event())
    turn = live(ctx)
    followers = [asyncio.ensure_future(_all(follow_live(turn, 0))) for _ in range(2)]
    await asyncio.sleep(0.05)
    turn.stop()
    for frames in await asyncio.gather(*followers):
        assert b'"status": "cancelled"' in frames[-1] and ids(frames) == [1, 2, 3]


async def _all(stream):
    return [f async for f in stream]


async def test_a_follower_pings_while_the_provider_is_silent(record, settings):
    settings.PANTHEON_HEARTBEAT_SECONDS = 0.1
    gate = asyncio.Event()
    turn = live(context(["x"], gate=gate))
    asyncio.get_running_loop().call_later(0.35, gate.set)
    frames = await _all(follow_live(turn, 0))
    assert frames.count(b": ping\n\n") >= 2 and b"event: done" in frames[-1]


async def test_the_openai_door_writes_the_deltas_that_arrived_together_at_once(record):
    from sessions_app.openai_views import _live_chunks

    writes = [w async for w in _live_chunks(live(context(["a", "b", "c"])), include_usage=False)]
    contents = [json.loads(line.removeprefix(b"data: "))["choices"][0]["delta"].get("content")
                for line in writes[1].split(b"\n\n") if line]
    assert contents == ["a", "b", "c"]
    assert writes[0].count(b"data: ") == 1 and writes[-1] == b"data: [DONE]\n\n"


@pytest.mark.parametrize("delta", ["Hello", " wörld ✓", 'a "quoted" \\ back', "line\nbreak\r\ttab", "\u2028\u2029\x85",
                                   "\x1f\x7f", "🎉 emoji", "</script>"])
def test_a_chunk_frame_is_the_encoded_chunk_event_byte_for_byte(delta):
    # chunk_frame encodes only the text; what it writes must stay what encode_event would.
    from llm_gateway.sse import encode_event

    assert streaming.chunk_frame(4, delta) == encode_event("chunk", {"delta": delta}, 6)
    assert streaming.chunk_frames(["x", delta], 1) == encode_event("chunk", {"delta": delta}, 3)
