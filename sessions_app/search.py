"""Search over a user's own conversations (SPEC section 17): their user and assistant
messages and their sessions' titles, newest first, each hit with a plain-text snippet.

On PostgreSQL it is full-text search (`django.contrib.postgres.search`): the text is
`to_tsvector('english', ...)` of the message's content (or the session's title) and the
query `websearch_to_tsquery('english', q)` (`SearchQuery(search_type="websearch")`: words
are ANDed, `"a phrase"`, `-word`, `or`; English stemming, so `plans` finds `plan`;
English stop words alone find nothing). It is backed by two GIN *expression* indexes made
by migration 0009_message_search on exactly the expressions `SearchVector(..., config=
SEARCH_CONFIG)` compiles to. An expression index rather than a generated `SearchVectorField`:

- the database maintains it on every insert and update like any index, with no column to
  keep in step (no trigger, no field to save, no backfill), and a message row stays as it
  was: every query that loads messages (a turn's context, the branch listing) does not
  carry a tsvector nearly as large as the text;
- it needs no PostgreSQL-only field on the model, so the same model serves SQLite;
- the one thing to keep true is that the index's expression is the query's:
  tests/sessions_app/test_search.py asserts the planner uses it.

On SQLite (the local, serverless run) it is a plain case-insensitive substring match
(`icontains`: SQLite's LIKE folds ASCII letters only) on the same rows.

Both kinds of hit are one `UNION ALL` ordered by `created_at` (a message's, or a title
hit's session's), so a page is two queries (its count and its rows) whatever it holds.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

from django.db import connection
from django.db.models import F, QuerySet, UUIDField, Value

from sessions_app.models import ChatSession, Message

SEARCH_CONFIG = "english"  # the text search configuration; migration 0009's indexes name it too
MAX_QUERY_CHARS = 200
SNIPPET_CHARS = 300
ELLIPSIS = "…"
SEARCHED_ROLES = (Message.Role.USER, Message.Role.ASSISTANT)


@dataclass(frozen=True)
class Hit:
    session_id: uuid.UUID
    message_id: uuid.UUID | None  # None: the session's title matched
    title: str
    snippet: str
    created_at: datetime


def full_text() -> bool:
    return connection.vendor == "postgresql"


def matching(rows: QuerySet, column: str, q: str) -> QuerySet:
    """`rows` whose `column` matches `q`: full-text on PostgreSQL (the expression migration
    0009's GIN index is built on), a case-insensitive substring elsewhere."""
    if not full_text():
        return rows.filter(**{f"{column}__icontains": q})
    from django.contrib.postgres.search import SearchQuery, SearchVector

    document = SearchVector(column, config=SEARCH_CONFIG)
    return rows.alias(document=document).filter(document=SearchQuery(q, config=SEARCH_CONFIG, search_type="websearch"))


def search_rows(user, q: str) -> QuerySet:
    """The hits of `q` among `user`'s own messages and session titles, newest first: a
    queryset of dicts (`hit_session`, `hit_message`, `hit_title`, `hit_text`, `hit_created`),
    to be sliced (a page) and turned into `Hit`s by `hit()`. Deleted sessions have no rows left
    (a session's DELETE cascades to its messages)."""
    # Both sides filtered on the owner of the session *and* of the row: nobody else's text.
    messages = matching(Message.objects.filter(user=user, session__user=user, role__in=SEARCHED_ROLES), "content", q)
    titles = matching(ChatSession.objects.filter(user=user).exclude(title=""), "title", q)
    # Same columns, same order on both sides (all of them expressions, so Django keeps the
    # order given); no Meta ordering inside the UNION's parts (`order_by()`): the union is ordered.
    message_rows = messages.order_by().values(
        hit_session=F("session_id"), hit_message=F("id"), hit_title=F("session__title"), hit_text=F("content"),
        hit_created=F("created_at"))
    title_rows = titles.order_by().values(
        hit_session=F("id"), hit_message=Value(None, output_field=UUIDField()), hit_title=F("title"),
        hit_text=F("title"), hit_created=F("created_at"))
    return message_rows.union(title_rows, all=True).order_by("-hit_created", "-hit_session", "-hit_message")


def hit(row: dict, q: str) -> Hit:
    message_id = row["hit_message"]
    return Hit(
        session_id=_uuid(row["hit_session"]),
        message_id=_uuid(message_id) if message_id is not None else None,
        title=row["hit_title"],
        snippet=snippet(row["hit_text"], q, words=full_text()),
        created_at=row["hit_created"],
    )


def _uuid(raw) -> uuid.UUID:
    return raw if isinstance(raw, uuid.UUID) else uuid.UUID(str(raw))


# --- Snippets ----------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")
_TERMS = re.compile(r'"([^"]*)"|(\S+)')
_WORD = re.compile(r"\w+")


def query_terms(q: str, *, words: bool) -> list[str]:
    """What to look for in a hit's text to place its snippet, best first. A substring
    search (`words=False`) matched `q` itself. A full-text search matched words: the
    phrases and words of `q` (not the negated ones, not `or`), then shorter prefixes of
    each word, which is where a stemmed match (`plans` for `planning`) usually is."""
    q = _SPACES.sub(" ", q).strip()
    if not words:
        return [q] if q else []
    terms: list[str] = []
    for phrase, word in _TERMS.findall(q):
        if word.startswith("-") or word.lower() == "or":
            continue
        terms.extend(_WORD.findall(phrase or word) if not phrase else [phrase.strip()])
    terms = [term for term in terms if term]
    prefixes = [term[:length] for term in terms if " " not in term
                for length in range(len(term) - 1, min(len(term), 3) - 1, -1)]
    return list(dict.fromkeys([q, *terms, *prefixes]))


def find_match(text: str, terms: list[str]) -> tuple[int, int] | None:
    """Where the first term (in `terms`' order) occurs in `text`, case-insensitively, at
    the start of a word if it can: (start, end), or None."""
    for term in terms:
        pattern = r"\s+".join(re.escape(part) for part in term.split(" "))
        for bounded in (r"(?<!\w)" + pattern, pattern):
            found = re.search(bounded, text, re.IGNORECASE)
            if found:
                return found.span()
    return None


def snippet(text: str, q: str, *, words: bool, limit: int = SNIPPET_CHARS) -> str:
    """At most `limit` characters of `text` (whitespace collapsed to single spaces) around
    the first match of `q`, an ellipsis where text was cut; plain text, as stored (no markup
    added). Cut on character (code point) boundaries, preferably at a space. Where no match
    is found (a stemmed match no term locates), the start of the text."""
    text = _SPACES.sub(" ", text).strip()
    if len(text) <= limit:
        return text
    span = find_match(text, query_terms(q, words=words)) or (0, 0)
    budget = limit - 2 * len(ELLIPSIS)
    start, end = span[0], min(span[1], span[0] + budget)
    room = budget - (end - start)
    # Some context before the match (a third of what is left), the rest after it.
    start = max(0, start - room // 3)
    end = min(len(text), start + budget)
    start = max(0, end - budget)
    if start > 0:
        # Begin at a word if one starts soon enough, and not on a space.
        space = text.find(" ", start, min(span[0], start + 20))
        start = space + 1 if space != -1 else start
    body = text[start:end].strip()
    return (ELLIPSIS if start > 0 else "") + body + (ELLIPSIS if end < len(text) else "")
