"""Running one tool call of the tool loop (shared by the real and the fake gateway)."""

from __future__ import annotations

import json
import logging
from typing import Any

from core.text import clean_text

from .base import ToolCall, ToolExecutor

logger = logging.getLogger("llm_gateway")


def clean_json_strings(value: Any) -> Any:
    """`value` (parsed JSON) with every string, keys included, passed through `clean_text`."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k) if isinstance(k, str) else k: clean_json_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_json_strings(item) for item in value]
    return value


async def run_tool_call(call: ToolCall, executor: ToolExecutor) -> str:
    """The text to send back as the tool's result. Bad arguments never reach the executor:
    the model gets an error text instead, and may try again."""
    try:
        arguments = json.loads(call.arguments or "{}")
        # The text itself is clean (the gateway saw to it), but a "\u0000" or "\ud800" escape
        # in it decodes to what a tool cannot put in a query or the database.
        if "\\u" in call.arguments:
            arguments = clean_json_strings(arguments)
    except (ValueError, RecursionError):  # nesting too deep is no usable JSON either
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
    text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
    # The result is stored as a tool message and sent upstream: it may echo the model's
    # arguments or a file's text, so make sure it is storable.
    return clean_text(text)
