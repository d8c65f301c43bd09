"""The `file_read` executor a tool turn hands to the gateway."""

import pytest

from core.db import db_call
from files_app.tools import TOOL_OUTPUT_BUDGET_CHARS, make_file_read_executor

pytestmark = pytest.mark.django_db(transaction=True)

TEXT = "".join(f"line {i:05d}\n" for i in range(5000))  # 55,000 characters: more than the budget


async def test_reads_only_the_users_ready_files_within_the_turn_budget(alice, bob, make_file):
    mine = await db_call(make_file)(alice, "long.txt", TEXT.encode())
    bobs = await db_call(make_file)(bob, "bob.txt", b"BOB'S SECRET")
    execute = make_file_read_executor(alice.pk)

    assert (await execute("shell", {"cmd": "ls"})).startswith("error: unknown tool")
    results = [await execute("file_read", {"file_id": str(mine.id), "offset": offset, "limit": 15000})
               for offset in (0, 15000, 30000)]
    assert "line 00000" in results[0]
    assert "line 02500" in results[1] and len(results[1]) > 15000
    assert 0 < len(results[2]) < 15000  # cut short: all results of the turn fill the budget exactly
    assert sum(len(r) for r in results) == TOOL_OUTPUT_BUDGET_CHARS
    assert await execute("file_read", {"file_id": str(mine.id)}) == \
        "error: the file output budget of this turn is used up"
    # A new turn has a fresh budget, and reads only its own user's files.
    assert await make_file_read_executor(alice.pk)("file_read", {"file_id": str(bobs.id)}) == "error: file not found"
    assert "BOB'S SECRET" in await make_file_read_executor(bob.pk)("file_read", {"file_id": str(bobs.id)})
