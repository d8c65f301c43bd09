"""The `file_read` tool as a turn hands it to the gateway's tool loop.

The executor runs in the request's event loop while the turn waits on the provider between
rounds, so each file read is one `db_call`: the database connection goes back to the pool
as soon as the read is done, instead of staying checked out until the request ends.
"""

from __future__ import annotations

from typing import Any

from core.db import db_call
from files_app.services import read_file_for_tool
from llm_gateway import ToolExecutor

# What all file_read results of one turn may add up to (bounds the prompt growth the hold covers).
TOOL_OUTPUT_BUDGET_CHARS = 40_000

_read_file_for_tool = db_call(read_file_for_tool)


def make_file_read_executor(user_id: int) -> ToolExecutor:
    """The `file_read` tool for one turn: only this user's ready files, and at most
    TOOL_OUTPUT_BUDGET_CHARS of results in all (what the hold was sized for)."""
    left = TOOL_OUTPUT_BUDGET_CHARS

    async def execute(name: str, arguments: dict[str, Any]) -> str:
        nonlocal left
        if name != "file_read":
            return f"error: unknown tool {name!r}"
        if left <= 0:
            return "error: the file output budget of this turn is used up"
        result = await _read_file_for_tool(user_id=user_id, arguments=arguments)
        result = result[:left]
        left -= len(result)
        return result

    return execute
