"""The message tree (SPEC section 17): each message has a parent (null for a root), each
session a current leaf. Regenerated answers and edited messages are siblings: children of
the same parent, ordered oldest first.

    chain_sql()      the ancestors of a message, itself first (a recursive CTE): a turn's
                     context, in the preflight's one read
    branch()         the current branch, root to leaf, with each message's sibling position:
                     two queries, whatever the tree's size
    leaf_below()     the most recently created leaf under a message (a branch switch)
"""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict

from core import sql
from sessions_app.models import ChatSession, Message

# The longest chain a turn's context walks (the budget trims further).
CHAIN_LIMIT = 400


@functools.cache
def chain_sql(vendor: str) -> str:
    """The chain from a start message up to its root, within one session, start first
    (`depth` 0): `(id, role, content)` rows. Parameters: `session`, `parent` (the start; None
    for the session's current leaf) and `root` (true: no chain at all: a new root)."""
    message, session = sql.table(Message), sql.table(ChatSession)
    return (
        f"WITH RECURSIVE chain(id, parent_id, role, content, depth) AS ("
        f"SELECT m.id, m.parent_id, m.role, m.content, 0 FROM {message} m "
        f"WHERE m.session_id = %(session)s AND NOT %(root)s AND m.id = COALESCE(%(parent)s, "
        f"(SELECT s.current_leaf_id FROM {session} s WHERE s.id = %(session)s)) "
        f"UNION ALL SELECT m.id, m.parent_id, m.role, m.content, c.depth + 1 FROM {message} m "
        f"JOIN chain c ON m.id = c.parent_id WHERE c.depth < {CHAIN_LIMIT}) "
        f"SELECT id, role, content FROM chain ORDER BY depth")


@functools.cache
def _branch_sql(vendor: str) -> str:
    message = sql.table(Message)
    return (f"WITH RECURSIVE chain(id, parent_id, depth) AS ("
            f"SELECT m.id, m.parent_id, 0 FROM {message} m WHERE m.id = %(leaf)s AND m.session_id = %(session)s "
            f"UNION ALL SELECT m.id, m.parent_id, c.depth + 1 FROM {message} m JOIN chain c ON m.id = c.parent_id) "
            f"SELECT id FROM chain ORDER BY depth DESC")


def _sibling_positions(session_id: uuid.UUID, messages: list[Message]) -> None:
    """Set `sibling_index` (1-based, oldest first) and `sibling_count` on each message, from
    one read of the session's messages that share a parent with one of them."""
    parents = {m.parent_id for m in messages if m.parent_id is not None}
    rows = Message.objects.filter(session_id=session_id).order_by("created_at", "position", "id")
    with_root = any(m.parent_id is None for m in messages)
    if parents and with_root:
        from django.db.models import Q

        rows = rows.filter(Q(parent_id__in=parents) | Q(parent__isnull=True))
    elif parents:
        rows = rows.filter(parent_id__in=parents)
    else:
        rows = rows.filter(parent__isnull=True)
    children: dict[uuid.UUID | None, list[uuid.UUID]] = defaultdict(list)
    for message_id, parent_id in rows.values_list("id", "parent_id"):
        children[parent_id].append(message_id)
    for message in messages:
        siblings = children.get(message.parent_id, [message.id])
        message.sibling_count = len(siblings)
        message.sibling_index = siblings.index(message.id) + 1 if message.id in siblings else 1


def branch(session: ChatSession) -> list[Message]:
    """The session's current branch, root to leaf, each message with `sibling_index` and
    `sibling_count`. Three queries whatever the tree's size: the chain's ids, its rows, and
    the siblings. A session whose leaf is unset ends at its newest message (one query more);
    one without messages has an empty branch."""
    leaf = session.current_leaf_id
    if leaf is None:
        leaf = (Message.objects.filter(session_id=session.id).order_by("-created_at", "-position", "-id")
                .values_list("id", flat=True).first())
        if leaf is None:
            return []
    ids = [sql.as_uuid(row[0]) for row in sql.fetch_all(_branch_sql(sql.vendor()), {
        "leaf": sql.value(Message, "id", leaf),
        "session": sql.value(Message, "session", session.id)})]
    found = Message.objects.in_bulk(ids)
    messages = [found[message_id] for message_id in ids if message_id in found]
    _sibling_positions(session.id, messages)
    return messages


def everything(session: ChatSession) -> list[Message]:
    """Every message of the session, oldest first, with sibling positions (two queries)."""
    messages = list(Message.objects.filter(session=session).order_by("created_at", "position", "id"))
    children: dict[uuid.UUID | None, list[uuid.UUID]] = defaultdict(list)
    for message in messages:
        children[message.parent_id].append(message.id)
    for message in messages:
        siblings = children[message.parent_id]
        message.sibling_count, message.sibling_index = len(siblings), siblings.index(message.id) + 1
    return messages


@functools.cache
def _leaf_sql(vendor: str) -> str:
    message = sql.table(Message)
    return (f"WITH RECURSIVE below(id, created_at) AS ("
            f"SELECT m.id, m.created_at FROM {message} m WHERE m.id = %(start)s AND m.session_id = %(session)s "
            f"UNION ALL SELECT m.id, m.created_at FROM {message} m JOIN below b ON m.parent_id = b.id) "
            f"SELECT b.id FROM below b WHERE NOT EXISTS (SELECT 1 FROM {message} c WHERE c.parent_id = b.id) "
            f"ORDER BY b.created_at DESC LIMIT 1")


def leaf_below(session: ChatSession, message_id: uuid.UUID) -> uuid.UUID | None:
    """The most recently created leaf under `message_id` (itself if it is a leaf); None when
    it is not a message of the session."""
    row = sql.fetch_one(_leaf_sql(sql.vendor()), {"start": sql.value(Message, "id", message_id),
                                                       "session": sql.value(Message, "session", session.id)})
    return sql.as_uuid(row[0]) if row is not None else None
