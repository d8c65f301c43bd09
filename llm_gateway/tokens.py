"""Conservative token estimates, used when no provider count exists (credit holds, fallback
usage). They err high: about 3 UTF-8 bytes per token, where real tokenizers average ~4 for
English, and non-Latin scripts take more bytes per character, which they also cost.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MESSAGE_OVERHEAD_TOKENS", "REPLY_PRIMING_TOKENS", "estimate_prompt_tokens", "estimate_tokens"]

BYTES_PER_TOKEN = 3
# OpenAI's chat format costs ~3-4 tokens per message for role and separators; take more.
MESSAGE_OVERHEAD_TOKENS = 5
# Every reply is primed with an assistant header.
REPLY_PRIMING_TOKENS = 3


def estimate_tokens(text: str) -> int:
    """ceil(utf-8 bytes / 3); 0 for the empty string, at least 1 otherwise."""
    if not text:
        return 0
    return max(1, math.ceil(len(text.encode("utf-8", errors="replace")) / BYTES_PER_TOKEN))


def _content_text(content: Any) -> str:
    """What a message's content weighs. Unlike `base.content_text` (the text a model wrote),
    non-text parts (images, odd values) count too, as JSON: an estimate must err high."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = content if isinstance(content, list) else [content]
    return "\n".join(part["text"] if isinstance(part, dict) and isinstance(part.get("text"), str)
                     else json.dumps(part, ensure_ascii=False, default=str) for part in parts)


def estimate_prompt_tokens(messages: list[dict[str, Any]],
                           tools: list[dict[str, Any]] | None = None) -> int:
    """Estimated prompt size of a chat request: content, tool calls and ids of each message
    plus a per-message overhead, plus the tool definitions if any."""
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS
        total += estimate_tokens(_content_text(message.get("content")))
        if message.get("tool_calls"):
            total += estimate_tokens(json.dumps(message["tool_calls"], ensure_ascii=False, default=str))
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                total += estimate_tokens(message[key])
    if tools:
        total += estimate_tokens(json.dumps(tools, ensure_ascii=False, default=str))
    return total
