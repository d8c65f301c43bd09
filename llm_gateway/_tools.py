"""Running one tool call of the tool loop (shared by the real and the fake gateway)."""

from __future__ import annotations

import json
import logging

from .base import ToolCall, ToolExecutor

logger = logging.getLogger("llm_gateway")


async def run_tool_call(call: ToolCall, executor: ToolExecutor) -> str:
    """The text to send back as the tool's result. Bad arguments never reach the executor:
    the model gets an error text instead, and may try again."""
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError:
        return (f"Error: the arguments of this {call.name} call are not valid JSON, so the tool "
                f"was not run. Call it again with a JSON object.")
    if not isinstance(arguments, dict):
        return f"Error: the arguments of a {call.name} call must be a JSON object."
    try:
        result = await executor(call.name, arguments)
    except Exception:
        # The executor's contract is to return error texts; don't lose the turn if it breaks it.
        logger.exception("tool %s raised", call.name)
        return f"Error: the tool {call.name} failed."
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
