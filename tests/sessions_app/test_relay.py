"""The relay's ways of ending, driven directly (no server, no database: the close-time
write and the lease keeper are replaced by stand-ins)."""

import asyncio
import time
import uuid
from decimal import Decimal
from types import SimpleNamespace

import pytest

from llm_gateway import CallRecord, StreamingContext, UpstreamError, Usage
from sessions_app import streaming
from sessions_app.streaming import Relay, with_heartbeat


def prepared():
    return SimpleNamespace(turn_id=uuid.uuid4(), session_id=uuid.uuid4(), model="m")


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
        turn = SimpleNamespace(status=outcome.status, cost=Decimal("0.1"), provider_model=outcome.provider_model,
                               prompt_tokens=3, completion_tokens=4, total_tokens=7, usage_estimated=False,
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
    return recorder


def relay(prepared, ctx, record):
    return Relay(prepared, ctx, deadline=float("inf")).frames()


async def test_completed_records_once_before_done(record):
    ctx = context(["a", "b"])
    frames = [f async for f in relay(prepared(), ctx, record)]
    assert [o.status for o in record.calls] == ["completed"]
    assert record.calls[0].content == "ab" and record.calls[0].usage == Usage(3, 4)
    assert record.calls[0].provider_model == "p/m" and record.calls[0].records == [ctx.record]
    assert ctx.record.status == "ok"
    assert b"event: done" in frames[-1]


async def test_error_records_failed_with_partial_text_then_sends_error(record):
    frames = [f async for f in relay(prepared(), context(["a"], fail=True), record)]
    assert [(o.status, o.content) for o in record.calls] == [("failed", "a")]
    assert b"event: error" in frames[-1]


async def test_late_close_of_a_parked_generator_still_records_cancelled(record):
    """Django may close the generator later from another task (ticket #37066): then only
    `finally` runs. aclose() on a generator paused at `yield` is exactly that."""
    gate = asyncio.Event()
    ctx = context(["a", "b", "c"], gate=gate)
    stream = relay(prepared(), ctx, record)
    assert b"event: start" in await anext(stream)
    assert b'"a"' in await anext(stream)
    await stream.aclose()
    assert [(o.status, o.content) for o in record.calls] == [("cancelled", "a")]
    assert ctx.closed == [True] and ctx.record.status == "cancelled"


async def test_cancellation_while_waiting_for_the_upstream_records_cancelled(record):
    gate = asyncio.Event()
    ctx = context(["a"], gate=gate)

    async def consume():
        async for _ in relay(prepared(), ctx, record):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [(o.status, o.content) for o in record.calls] == [("cancelled", "a")]
    assert ctx.closed == [True]


async def test_heartbeat_yields_none_while_silent():
    async def slow():
        await asyncio.sleep(0.25)
        yield "x"

    items = [item async for item in with_heartbeat(slow(), 0.1)]
    assert items[-1] == "x" and items.count(None) >= 2
