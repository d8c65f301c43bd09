"""A turn while its model call runs, in async code: the pieces both turn endpoints share.

- `start_turn()`: the preflight, safe against the client leaving while it runs (the
  preflight's thread may commit after the request was cancelled: what it made is closed).
- `LeaseKeeper`: renews the running turn's lease (and with it its hold) and saves the
  partial answer: once per period, never per chunk; the renewals of all the process's
  streams that fall due together go out as one UPDATE (`renew()`).
- `finish_turn()`: the close-time transaction, retried with backoff while the database
  is failing; then `PersistenceFailed`, and the sweep closes the turn after its lease.
- `in_background()`: keep a coroutine running when its caller is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from django.conf import settings
from django.db import DatabaseError

from core.db import db_call
from core.logging import bind_log_context
from sessions_app import metrics, turn_signals
from sessions_app.models import Turn
from sessions_app.turns import (
    RENEW_BATCH,
    PreparedTurn,
    Renewal,
    RenewRequest,
    TurnOutcome,
    TurnResult,
    close_turn,
    renew_turns,
)

logger = logging.getLogger(__name__)

# Pauses between attempts of the close-time write: about six seconds in all.
CLOSE_RETRY_DELAYS = (0.1, 0.3, 0.6, 1.0, 1.5, 2.5)

_renew_all = db_call(renew_turns, on_loop=True)
_close = db_call(close_turn, on_loop=True)
_background: set[asyncio.Task] = set()


# How long a renewal waits for others to share its UPDATE. Streams renew on their own
# clocks, so without a wait few would meet; a lease (30 s) and a checkpoint do not mind it.
RENEW_GATHER_SECONDS = 0.05


class _Renewals:
    """The lease renewals of one event loop's streams, coalesced: those asked for within
    RENEW_GATHER_SECONDS, or while a batch is being written, go out together as one UPDATE.
    Under load a worker writes a few statements per period instead of one per stream (and
    one unit of database work instead of a thread hop and a connection each)."""

    def __init__(self) -> None:
        self.pending: list[tuple[RenewRequest, asyncio.Future]] = []
        self.writer: asyncio.Task | None = None

    async def renew(self, request: RenewRequest) -> Renewal:
        answer = asyncio.get_running_loop().create_future()
        self.pending.append((request, answer))
        if self.writer is None:
            self.writer = in_background(self._write())
        return await answer  # a caller cancelled meanwhile leaves its row in the batch: harmless

    async def _write(self) -> None:
        try:
            await asyncio.sleep(RENEW_GATHER_SECONDS)
            while self.pending:
                batch, self.pending = self.pending[:RENEW_BATCH], self.pending[RENEW_BATCH:]
                try:
                    renewals = await _renew_all([request for request, _ in batch])
                except Exception as exc:  # each caller handles it as it would its own failure
                    for _, answer in batch:
                        if not answer.done():
                            answer.set_exception(exc)
                    continue
                except BaseException:  # the loop is shutting down: nobody waits in vain
                    for _, answer in batch + self.pending:
                        answer.cancel()
                    self.pending = []
                    raise
                for request, answer in batch:
                    if not answer.done():
                        answer.set_result(renewals[request.turn_id])
        finally:
            self.writer = None


_renewals: dict[asyncio.AbstractEventLoop, _Renewals] = {}


async def renew(request: RenewRequest) -> Renewal:
    """renew_turns() for one turn, in the same UPDATE as the running loop's other streams
    that renew at the same moment."""
    loop = asyncio.get_running_loop()
    renewals = _renewals.get(loop)
    if renewals is None:
        for stale in [other for other in _renewals if other.is_closed()]:  # tests' loops
            del _renewals[stale]
        renewals = _renewals[loop] = _Renewals()
    return await renewals.renew(request)


# The turns this process serves: what stops each (POST .../cancel, or a signal from the
# process that received it).
_stoppers: dict[uuid.UUID, Callable[[], None]] = {}


def serve_locally(turn_id: uuid.UUID, stop: Callable[[], None]) -> None:
    """Register a turn this process serves, with how to stop it."""
    _stoppers[turn_id] = stop
    turn_signals.ensure_listening()


def served_here(turn_id: uuid.UUID) -> bool:
    return turn_id in _stoppers


def done_serving(turn_id: uuid.UUID) -> None:
    _stoppers.pop(turn_id, None)


def stop_local(turn_id: uuid.UUID) -> bool:
    """Stop a turn this process serves; False if it serves no such turn."""
    stop = _stoppers.get(turn_id)
    if stop is None:
        return False
    stop()
    return True


turn_signals.subscribe("cancel", stop_local)


def chunk_ends(parts: list[str]) -> list[int]:
    """Where each delta ends in their concatenation (stored with the text: the stream's
    event ids stand on them)."""
    return list(itertools.accumulate(map(len, parts)))


class PersistenceFailed(Exception):
    """The close-time write kept failing; the turn stays `running` until the sweep closes it."""

    def __init__(self, turn_id: uuid.UUID) -> None:
        super().__init__(f"turn {turn_id} could not be stored")
        self.turn_id = turn_id


def in_background(coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
    """Run `coro` as its own task, held until it ends: awaiting the result under
    `asyncio.shield` lets it finish even if the awaiting request is cancelled."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


async def start_turn(begin: Callable[[], Awaitable[PreparedTurn]]) -> PreparedTurn:
    """Await the preflight `begin()` (a `db_call`). If the client goes away meanwhile, the
    preflight's thread runs on and may still commit a `running` turn: it is then closed as
    `cancelled` (nothing reached the provider, so it costs nothing) before re-raising."""
    task = in_background(begin())
    try:
        prepared = await asyncio.shield(task)
    except asyncio.CancelledError:
        in_background(_close_if_begun(task))
        raise
    bind_log_context(user_id=prepared.user_id, turn_id=prepared.turn_id)  # the request's log lines
    return prepared


async def _close_if_begun(task: asyncio.Task) -> None:
    try:
        prepared = await task
    except Exception:  # refused (TurnRejected, an auth failure): nothing to close
        return
    with contextlib.suppress(PersistenceFailed):
        await finish_turn(prepared, TurnOutcome(status=Turn.Status.CANCELLED))


async def finish_turn(prepared: PreparedTurn, outcome: TurnOutcome) -> TurnResult:
    """close_turn(), retried while the database fails; PersistenceFailed when it never
    worked. Run it under `asyncio.shield` where the caller may be cancelled."""
    for delay in (*CLOSE_RETRY_DELAYS, None):
        try:
            result = await _close(prepared.turn_id, outcome, as_begun=prepared.as_begun,
                                  price=prepared.price_of(outcome.served_model or prepared.model))
        except DatabaseError as exc:
            if delay is None:
                logger.error("turn %s: the close-time write failed for good (%s); the sweep will close it",
                             prepared.turn_id, exc)
                raise PersistenceFailed(prepared.turn_id) from exc
            logger.warning("turn %s: the close-time write failed (%s); retrying in %.1fs",
                           prepared.turn_id, exc, delay)
            await asyncio.sleep(delay)
            continue
        except Exception as exc:
            logger.exception("turn %s: the close-time write raised", prepared.turn_id)
            raise PersistenceFailed(prepared.turn_id) from exc
        if result.closed:  # committed by this call (not closed before by someone else)
            metrics.observe_closed_turn(result.turn, outcome.records)
        return result
    raise AssertionError("unreachable")


class LeaseKeeper:
    """Keeps a running turn alive while its model call runs.

    Every `period` seconds (the checkpoint period, at most a third of the lease) it writes
    the partial answer if it grew, and renews the lease whenever the next write would
    otherwise come too late: one UPDATE each time, from its own task, so the relay never
    waits on the database. If the turn turns out to be closed already (the sweep closed it
    after renewals kept failing), `on_lost` is called, so the caller stops generating what
    nobody will pay for.
    """

    # While a client follows the turn from another process: how often its partial answer
    # is saved (that follower reads it from the turn row).
    WATCHED_PERIOD = 0.25

    def __init__(self, turn_id: uuid.UUID, *, parts: list[str] | None = None,
                 on_lost: Callable[[], Awaitable[None]] | None = None,
                 on_cancel: Callable[[], None] | None = None,
                 watched: Callable[[], bool] | None = None,
                 generation_id: Callable[[], str] | None = None,
                 served_model: str = "") -> None:
        self.turn_id = turn_id
        self.parts = parts  # the deltas so far (the relay appends to this list)
        self.generation_id = generation_id  # the provider's id of the call, saved with checkpoints
        self.served_model = served_model  # the candidate answering, saved with checkpoints
        self.on_lost = on_lost
        self.on_cancel = on_cancel
        self.watched = watched
        lease = settings.PANTHEON_TURN_LEASE_SECONDS
        self.renew_every = lease / 3
        self.period = min(settings.PANTHEON_CHECKPOINT_SECONDS, self.renew_every)
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._started = 0.0
        self._poked = asyncio.Event()

    def poke(self) -> None:
        """Look again now (`watched` may have changed) instead of at the end of the period."""
        self._poked.set()
        if self._timer is not None:
            self._timer.cancel()
            self._first_period_over()

    def start(self) -> LeaseKeeper:
        # Nothing is due before a period has passed: its task starts then (most turns have
        # ended by then, and never make one).
        self._started = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self.period, self._first_period_over)
        return self

    def _first_period_over(self) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        last_write = self._started
        saved = 0  # deltas in the partial answer last saved
        waited = True  # the first period, before this task started
        while True:
            if waited:
                waited = False
            elif self.watched is not None and self.watched():
                await asyncio.sleep(self.WATCHED_PERIOD)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.period):
                        await self._poked.wait()
            self._poked.clear()
            count = len(self.parts) if self.parts is not None else 0
            grew = count != saved
            if not grew and time.monotonic() + self.period - last_write < self.renew_every:
                continue
            checkpoint = ends = None
            if grew:
                parts = self.parts[:count]
                checkpoint, ends = "".join(parts), chunk_ends(parts)
            try:
                state = await renew(RenewRequest(
                    self.turn_id, checkpoint=checkpoint, chunk_ends=ends,
                    generation_id=self.generation_id() if self.generation_id is not None else "",
                    served_model=self.served_model))
            except DatabaseError as exc:
                # Keep streaming: the next period tries again; the lease has slack for that.
                logger.warning("turn %s: lease renewal failed (%s)", self.turn_id, exc)
                continue
            if state is Renewal.GONE:
                logger.warning("turn %s was closed by someone else while running", self.turn_id)
                if self.on_lost is not None:
                    await self.on_lost()
                return
            last_write, saved = time.monotonic(), count
            if state is Renewal.CANCEL_REQUESTED and self.on_cancel is not None:
                self.on_cancel()  # stops the turn, and with it this keeper
