"""Session titles written by a model (SPEC section 17).

After an untitled session's first completed turn, its close queues `write_title` (a
django-tasks-db task, `sessions_app.tasks.title_session_task`). The title is a turn of kind
`title`: the same preflight (hold), the same gateway routing and the same close-time
transaction (settlement, ledger note "completed title turn") as any turn; there is no second
money path. It stores no message: its answer, cleaned to one line of at most 8 words and 80
characters (`turns.clean_title`), becomes the title if the session is still untitled. When
the wallet cannot afford it, nothing happens (no title, no retry); when the model fails, the
turn is billed like any failed turn and the session stays untitled.
"""

from __future__ import annotations

import logging
import uuid

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import transaction

from billing_app import services as billing
from llm_gateway import GatewayError, routing
from sessions_app.models import ChatSession, Message, Turn
from sessions_app.turns import TurnInput, TurnOutcome, TurnRejected, begin_turn, close_turn, load_preflight

logger = logging.getLogger(__name__)

# What the title model is asked (the offline fake recognises it: llm_gateway.fake).
INSTRUCTION = ("Reply with a title for the conversation below: at most 8 words, on one line, with no "
               "quotes and no final full stop. Reply with the title only.")
TITLE_MAX_TOKENS = 24
EXCERPT_CHARS = 2000  # of the first question and answer: enough to name them


def _conversation(session: ChatSession) -> str | None:
    first = (Message.objects.filter(session=session, role=Message.Role.USER, parent__isnull=True)
             .order_by("created_at").first())
    if first is None:
        return None
    answer = (Message.objects.filter(session=session, role=Message.Role.ASSISTANT, turn__reply_to=first)
              .order_by("created_at").first())
    text = f"User: {first.content[:EXCERPT_CHARS]}"
    if answer is not None and answer.content:
        text += f"\n\nAssistant: {answer.content[:EXCERPT_CHARS]}"
    return text


def write_title(session_id: uuid.UUID) -> str:
    """Title an untitled session with a `title` turn; what happened, for the task's result."""
    owner = ChatSession.objects.filter(pk=session_id).values_list("user_id", flat=True).first()
    if owner is None:
        return "titled"
    with transaction.atomic():
        # The session row lock: a second task for the same session waits, then sees the first's
        # turn. The wallet row first: the lock order of every preflight and close (wallet, then
        # session), so this never deadlocks with a turn of the same user.
        billing.wallet_snapshot(owner, lock=True)
        session = ChatSession.objects.select_for_update().filter(pk=session_id).first()
        if session is None or session.title:
            return "titled"
        if Turn.objects.filter(session=session, kind=Turn.Kind.TITLE).exists():
            return "already_asked"
        conversation = _conversation(session)
        if conversation is None:
            return "empty"
        model = settings.PANTHEON_TITLE_MODEL or session.model
        preflight = load_preflight(session_id=session.pk, model=model, user_id=session.user_id, root=True)
        context = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": conversation}]
        try:
            prepared = begin_turn(preflight, TurnInput(content=conversation, model=model, context=context,
                                                       max_tokens=TITLE_MAX_TOKENS, kind=Turn.Kind.TITLE),
                                  streamed=False)
        except TurnRejected as exc:  # no credits for it (or its model is not priced): no title
            logger.info("session %s stays untitled: %s", session_id, exc.code)
            return exc.code
    try:
        completion, served = async_to_sync(routing.generate)(
            prepared.candidates(), messages=prepared.messages, max_tokens=prepared.max_tokens)
    except GatewayError as exc:
        outcome = TurnOutcome.from_error(exc)
    else:
        outcome = TurnOutcome(status=Turn.Status.COMPLETED, content=completion.content, usage=completion.usage,
                              provider_model=completion.provider_model, records=completion.records,
                              finish_reason=completion.finish_reason, prompt_processed=True,
                              served_model=served.model)
    result = close_turn(prepared.turn_id, outcome, price=prepared.price_of(outcome.served_model or model))
    return "titled" if result.turn.status == Turn.Status.COMPLETED else result.turn.status
