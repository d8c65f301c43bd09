"""Provider cost reconciliation (SPEC section 13): a turn billed on an estimate (cancelled,
failed, interrupted, or a stream that ended without usage) is checked later against the
provider's own record of each of its calls, and its bill corrected once.

    reconcile_turn()   look up the turn's generations; with counts for every one, replace the
                       turn's usage and cost and write ONE `adjustment` ledger entry for the
                       difference, in one transaction; idempotent
    give_up()          after RECONCILE_WINDOW the estimate stands, marked `unreconciled`

The task that calls them, and retries with backoff while the provider's record lags, is
sessions_app.tasks.reconcile_turn_task.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
from datetime import timedelta
from decimal import Decimal

from asgiref.sync import async_to_sync
from django.db import transaction

from billing_app import catalogue
from billing_app import services as billing
from billing_app.models import ModelPrice, Provider, UsageRecord
from core.money import format_money
from llm_gateway import GatewayError, Generation, LlmGateway, Usage, get_gateway
from sessions_app.models import LlmEvent, Turn
from sessions_app.turns import turn_rounds

logger = logging.getLogger(__name__)

# How long after a turn ended its generations are looked for (SPEC: "up to an hour").
RECONCILE_WINDOW = timedelta(hours=1)


class Reconciled(enum.Enum):
    DONE = "done"  # reconciled now
    NOT_YET = "not_yet"  # some record is not there yet (or the provider could not be asked)
    NOTHING_TO_DO = "nothing_to_do"  # no such turn, or it is not pending any more


def _accepted(event: LlmEvent) -> bool:
    return event.http_status is not None and 200 <= event.http_status < 300


async def _look_up(gateways: dict[str, LlmGateway], ids: list[str]) -> dict[str, Generation] | None:
    """Every generation's record (each asked of the provider that made it), or None if any
    is missing or has no counts yet."""
    try:
        found = await asyncio.gather(*(gateways[generation_id].generation(generation_id) for generation_id in ids))
    except GatewayError as exc:
        logger.info("reconcile: a generation record is not available yet (%s)", exc.message)
        return None
    if not all(record.has_counts for record in found):
        return None
    return dict(zip(ids, found, strict=True))


def reconcile_turn(turn_id: uuid.UUID, *, gateway: LlmGateway | None = None) -> Reconciled:
    """Bill a pending turn at the provider's numbers (see the module docstring).

    A call with a generation id counts as its record says; an accepted call without one
    counts as the provider reported it at the time (the close only marks a turn pending
    when that is so); a call the provider refused counts nothing. The new usage goes
    through the same billing policy as any turn (`usage_to_bill`: output never past what
    the hold covered) and the same cost function, at the model's price now.
    """
    turn = Turn.objects.filter(pk=turn_id).first()
    if turn is None or turn.reconciliation != Turn.Reconciliation.PENDING:
        return Reconciled.NOTHING_TO_DO
    served = turn.served_model or turn.model
    # Only the served model's calls are billed: a candidate abandoned for a fallback failed
    # before any output and costs nothing (SPEC section 15).
    events = [event for event in LlmEvent.objects.filter(turn_id=turn_id) if not event.model or event.model == served]
    ids = sorted({event.generation_id for event in events if event.generation_id})
    gateways = {event.generation_id: gateway or _gateway_of(event.upstream, served) for event in events
                if event.generation_id}
    records = async_to_sync(_look_up)(gateways, ids) if ids else None
    if records is None:
        return Reconciled.NOT_YET

    prompt = completion = 0
    provider_cost: Decimal | None = None
    for event in events:
        if event.generation_id:
            record = records[event.generation_id]
            event.prompt_tokens, event.completion_tokens = record.prompt_tokens, record.completion_tokens
            if record.total_cost is not None:
                event.provider_cost = record.total_cost
        elif not _accepted(event):
            continue
        prompt += event.prompt_tokens or 0
        completion += event.completion_tokens or 0
        if event.provider_cost is not None:
            provider_cost = (provider_cost or Decimal(0)) + event.provider_cost
    usage = billing.usage_to_bill(reported=Usage(prompt_tokens=prompt, completion_tokens=completion),
                                  text="", prompt_estimate=0, prompt_processed=False,
                                  output_cap=turn.max_tokens * turn_rounds(turn.tools_enabled))

    with transaction.atomic():
        # Lock order as at close: the turn row, then (in adjust_turn) the wallet row.
        turn = Turn.objects.select_for_update().get(pk=turn_id)
        if turn.reconciliation != Turn.Reconciliation.PENDING:
            return Reconciled.NOTHING_TO_DO  # another run got here first
        cost = billing.compute_cost(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                                    price=billing.get_price(served))
        difference = turn.cost - cost
        before = (turn.prompt_tokens, turn.completion_tokens)
        turn.prompt_tokens, turn.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        turn.usage_estimated, turn.cost = False, cost
        turn.reconciliation = Turn.Reconciliation.RECONCILED
        turn.save(update_fields=["prompt_tokens", "completion_tokens", "usage_estimated", "cost", "reconciliation"])
        LlmEvent.objects.bulk_update([e for e in events if e.generation_id],
                                     ["prompt_tokens", "completion_tokens", "provider_cost"])
        UsageRecord.objects.update_or_create(turn_id=turn.id, defaults={
            "user_id": turn.user_id, "session_id": turn.session_id, "api_key_id": turn.api_key_id,
            "model": turn.model, "served_model": served,
            "provider_model": turn.provider_model, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens,
            "estimated": False, "reconciled": True, "cost": cost, "provider_cost": provider_cost,
        })
        if difference:
            billing.adjust_turn(user_id=turn.user_id, turn_id=turn.id, amount=difference,
                                note=_note(turn, before, usage, difference))
    return Reconciled.DONE


def _gateway_of(upstream: str, served: str) -> LlmGateway:
    """The gateway of the provider a call went to: the row of that name, else the one the
    served model is routed to now (the sweep's record of a dead process names none), else
    the configured provider."""
    provider = Provider.objects.filter(name=upstream).first() if upstream else None
    if provider is None and not upstream:
        price = ModelPrice.objects.select_related("provider").filter(model=served).first()
        provider = price.provider if price is not None else None
    return get_gateway(catalogue.upstream_of(provider))


def _note(turn: Turn, before: tuple[int, int], usage: Usage, difference: Decimal) -> str:
    """The ledger note, for the user: what changed and why."""
    what = "credited back" if difference > 0 else "charged"
    return (f"Provider's count for your {turn.status} turn: {usage.prompt_tokens} prompt + "
            f"{usage.completion_tokens} output tokens instead of the estimated {before[0]} + {before[1]}; "
            f"{format_money(abs(difference))} credits {what}")


def give_up(turn_id: uuid.UUID) -> bool:
    """The estimate stands: mark a still pending turn `unreconciled`. False if not pending."""
    changed = Turn.objects.filter(pk=turn_id, reconciliation=Turn.Reconciliation.PENDING).update(
        reconciliation=Turn.Reconciliation.UNRECONCILED)
    if changed:
        logger.warning("reconcile: no provider record for turn %s within %s; its estimate stands",
                       turn_id, RECONCILE_WINDOW)
    return bool(changed)
