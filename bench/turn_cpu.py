"""The database side of one streamed turn, alone on one thread: its CPU, without the noise
of a load run (where the event loop, the provider and the client share the two cores).

    .venv/bin/python bench/turn_cpu.py [--turns 200] [--history] [--on-loop] [--cprofile FILE] [--statements]

On a scratch PostgreSQL database (`pantheon_turn_cpu`, created afresh; DATABASE_URL
overrides it) it runs what a streamed turn runs on the database threads, each step as one
unit of database work (`core.db`), as the server does: the preflight (read and begin), two
checkpoints, the close. It prints the CPU and wall time per turn and the statements sent.
Each turn starts a new root (`"parent_id": null`), as in bench/throughput.py; `--history`
continues the session's branch instead, so late turns read and trim a long history;
`--on-loop` runs each unit on an event loop's own connection (core.db_on_loop), as the
server does on PostgreSQL; `--statements` prints the statements of one turn (as the threads
send them: with the close's locking read, which the streaming process's close skips).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import scratch_database  # noqa: E402 (run as a script, from anywhere)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--history", action="store_true", help="continue the branch instead of new roots")
    parser.add_argument("--on-loop", action="store_true", help="run the units as the server does: on the loop")
    parser.add_argument("--cprofile", metavar="FILE", help="profile the measured turns (CPU time) into FILE")
    parser.add_argument("--statements", action="store_true", help="print the statements of one turn")
    args = parser.parse_args()
    os.environ["DATABASE_URL"] = scratch_database("pantheon_turn_cpu")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pantheon.settings")
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-" + "x" * 50)
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, check=True)

    import django

    django.setup()
    from decimal import Decimal

    from django.contrib.auth import get_user_model
    from django.db import connection, connections
    from django.test.utils import CaptureQueriesContext

    from accounts.models import ApiKey, hash_key
    from billing_app import services
    from core import db_on_loop
    from core.db import _closing_connections as on_a_thread  # one unit of database work, as db_call runs it
    from llm_gateway import Usage
    from sessions_app.models import ChatSession
    from sessions_app.turns import TurnInput, TurnOutcome, begin_turn, close_turn, load_preflight, renew_turn

    services.set_price(model="bench/1s", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("1"))
    user, _ = get_user_model().objects.get_or_create(username="turn-cpu")
    services.grant(user_id=user.pk, amount=Decimal("100000"))
    _, raw_key = ApiKey.issue(user=user)
    key_hash = hash_key(raw_key)
    # Untitled, as in bench/throughput.py (no db_worker runs: its first turn queues a title task).
    session_id = ChatSession.objects.create(user=user, model="bench/1s").pk
    root = not args.history

    def preflight():  # the turn view's one unit: read, then begin
        found = load_preflight(session_id=session_id, model=None, key_hash=key_hash, root=root)
        return begin_turn(found, TurnInput(content="bench", parent_id=None, parent_given=root), streamed=True)

    spent = {"preflight": 0.0, "checkpoint": 0.0, "close": 0.0}  # CPU of each kind of unit

    loop = asyncio.new_event_loop()

    def on_the_loop(fn, *args, **kwargs):
        return loop.run_until_complete(db_on_loop.run(fn, *args, **kwargs))

    unit = on_a_thread

    def timed(kind: str, fn, *args, **kwargs):
        start = time.thread_time()
        try:
            return unit(fn, *args, **kwargs)
        finally:
            spent[kind] += time.thread_time() - start

    def one_turn() -> None:
        prepared = timed("preflight", preflight)
        for i in (1, 2):
            timed("checkpoint", renew_turn, prepared.turn_id, checkpoint="p0 p1 " * i, chunk_ends=[3, 6][:i],
                  generation_id="gen-bench", served_model="bench/1s")
        timed("close", close_turn, prepared.turn_id, TurnOutcome(
            status="completed", content="p0 p1 " * 10, usage=Usage(20, 20), prompt_processed=True,
            served_model="bench/1s", provider_model="bench/upstream"), price=prepared.price)

    connections.close_all()
    for _ in range(20):  # warm: imports, caches, the pool
        one_turn()
    connection.force_debug_cursor = True
    with CaptureQueriesContext(connection) as queries:
        one_turn()
    statements = len(queries)
    if args.statements:
        for query in queries:
            print(" ", query["sql"][:160])
    connection.force_debug_cursor = False
    if args.on_loop:
        unit = on_the_loop
        for _ in range(20):  # warm the loop's connection: its statements are prepared there
            one_turn()
        assert not db_on_loop.fallbacks, db_on_loop.fallbacks
    spent.update(dict.fromkeys(spent, 0.0))
    profile = cProfile.Profile(time.process_time) if args.cprofile else None
    cpu, wall = time.process_time(), time.perf_counter()
    if profile:
        profile.enable()
    for _ in range(args.turns):
        one_turn()
    if profile:
        profile.disable()
        profile.dump_stats(args.cprofile)
    cpu, wall = (time.process_time() - cpu) / args.turns, (time.perf_counter() - wall) / args.turns
    print(f"{args.turns} turns ({'a growing branch' if args.history else 'new roots'}"
          f"{', on the loop' if args.on_loop else ''}): CPU {cpu * 1000:.2f} ms, "
          f"wall {wall * 1000:.2f} ms per turn; {statements} statements per turn")
    print("  CPU per turn: " + ", ".join(f"{kind} {total / args.turns * 1000:.2f} ms" for kind, total in spent.items()))


if __name__ == "__main__":
    main()
