"""Exports of a session (SPEC section 17): Markdown of the current branch, or JSON of the
whole message tree with every turn's usage and cost.

The current branch is the chain from a root to the session's `current_leaf`, following
`parent`: `sessions_app.tree.branch`, the one `GET .../messages` lists (a session without a
leaf ends at its newest message; migration 0008 chained every history written before).

The Markdown: a heading with the title, then each message of the branch, `**User**` or
`**Assistant**` (or `**System**`) and its content as stored. Tool rounds are summarized:
an assistant message that only called tools shows no block of its own, and each tool
result is one line naming the tool and the size of its result (its text is left out: a
file's contents are not the conversation).
"""

from __future__ import annotations

import json
import re

from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone
from django.utils.text import slugify
from rest_framework import serializers

from sessions_app.models import ChatSession, Message, Turn
from sessions_app.serializers import turn_data
from sessions_app.tree import branch

FORMATS = ("md", "json")
CONTENT_TYPES = {"md": "text/markdown; charset=utf-8", "json": "application/json"}
_ORDER = ("created_at", "position", "id")


def current_branch(session: ChatSession) -> list[Message]:
    """The messages of the session's current branch, root first: the same branch as
    `GET .../messages` lists (`sessions_app.tree.branch`)."""
    return branch(session)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def filename(session: ChatSession, fmt: str) -> str:
    """`pantheon-<slug of the title>.<fmt>`, or the session id when the title has no ASCII
    letters or digits: only [a-z0-9-] in the name, at most 60 characters of slug."""
    slug = slugify(session.title)[:60].strip("-_") or str(session.id)
    return f"pantheon-{slug}.{fmt}"


def markdown(session: ChatSession, branch: list[Message]) -> str:
    title = _one_line(session.title) or "Untitled session"
    blocks = [f"# {title}"]
    tool_names: dict[str, str] = {}
    for message in branch:
        if message.role == Message.Role.TOOL:
            name = tool_names.get(message.tool_call_id, "tool")
            blocks.append(f"*Tool `{name}` answered ({len(message.content)} characters; left out).*")
            continue
        for call in message.tool_calls or []:
            if isinstance(call, dict):
                function = call.get("function") or {}
                tool_names[str(call.get("id", ""))] = _one_line(str(function.get("name") or "tool"))
        if message.tool_calls and not message.content.strip():
            continue  # a tool call and no text: the tool lines that follow say it
        label = {"user": "User", "assistant": "Assistant", "system": "System"}.get(message.role, message.role)
        blocks.append(f"**{label}**\n\n{message.content}")
    return "\n\n".join(blocks) + "\n"


def _time(value) -> str | None:
    return serializers.DateTimeField().to_representation(value)


def message_data(message: Message) -> dict:
    return {"id": str(message.id), "parent_id": str(message.parent_id) if message.parent_id else None,
            "turn_id": str(message.turn_id), "role": message.role, "content": message.content,
            "tool_calls": message.tool_calls, "tool_call_id": message.tool_call_id,
            "created_at": _time(message.created_at)}


def tree(session: ChatSession) -> dict:
    """The JSON export: the session, every message (oldest first, each with its
    `parent_id`), every turn (title turns too: they were paid for) with usage and cost."""
    messages = list(Message.objects.filter(session=session).order_by(*_ORDER))
    turns = Turn.objects.filter(session=session).order_by("created_at", "id")
    leaf = session.current_leaf_id or (messages[-1].id if messages else None)  # as `branch` ends
    return {
        "session": {"id": str(session.id), "title": session.title, "model": session.model,
                    "system_prompt": session.system_prompt, "current_leaf_id": str(leaf) if leaf else None,
                    "created_at": _time(session.created_at), "updated_at": _time(session.updated_at)},
        "messages": [message_data(message) for message in messages],
        "turns": [turn_data(turn) for turn in turns],
        "exported_at": _time(timezone.now()),
    }


def render(session: ChatSession, fmt: str) -> bytes:
    if fmt == "md":
        return markdown(session, current_branch(session)).encode()
    return json.dumps(tree(session), cls=DjangoJSONEncoder, ensure_ascii=False, indent=2).encode()
