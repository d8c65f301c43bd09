"""The catalogue's routes (SPEC section 15): which models a turn may be served by, where each
is served, and the price a turn holds for.

    candidates()    the model asked for, then the request's `models` (each priced, else
                    UnknownModel) or else its configured fallbacks (an unpriced one skipped)
    dearest()       a price no candidate exceeds: the hold and the `max_tokens` cap stand on it
    upstream_of()   a provider row as the gateway's `Upstream` (None: the configured provider)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Collection, Sequence
from decimal import Decimal

from billing_app.models import MAX_FALLBACKS, ModelPrice, Provider
from billing_app.services import UnknownModel
from llm_gateway import Upstream
from llm_gateway.routing import Candidate

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Route:
    """One candidate of a turn: its catalogue row (the price it is billed at) and where it goes."""

    price: ModelPrice
    upstream: Upstream | None

    @property
    def model(self) -> str:
        return self.price.model

    def candidate(self) -> Candidate:
        return Candidate(model=self.price.model, upstream=self.upstream, upstream_model=self.price.sent_model)


def upstream_of(provider: Provider | None) -> Upstream | None:
    """The gateway's view of a provider row: the key read from its environment variable (at
    each turn: the process's environment, so a new key takes a restart), or the one stored."""
    if provider is None:
        return None
    key = os.environ.get(provider.api_key_env, "") if provider.api_key_env else provider.api_key
    return Upstream(name=provider.name, base_url=provider.base_url.rstrip("/"), api_key=key,
                    timeout_seconds=provider.timeout_seconds)


def route_of(price: ModelPrice) -> Route:
    return Route(price=price, upstream=upstream_of(price.provider))


def candidate_names(primary: ModelPrice, requested: Sequence[str] | None) -> list[str]:
    """The primary model, then `requested` (a request's own list; [] means no fallbacks) or
    else its configured fallbacks; each once."""
    rest = list(requested) if requested is not None else list(primary.fallbacks or [])[:MAX_FALLBACKS]
    return list(dict.fromkeys([primary.model, *rest]))


def candidates(primary: ModelPrice, requested: Sequence[str] | None = None, *,
               allowed: Collection[str] | None = None) -> list[Route]:
    """Every candidate's route, in order (one more read only when there is more than one).
    Raises UnknownModel for a model of the request's list that is not priced; a configured
    fallback that is not (its price was deleted since) is skipped, and logged: the
    operator's slip must not refuse the user's turn. `allowed` (an API key's allow-list,
    SPEC section 16): configured fallbacks outside it are skipped (the caller has checked
    the models the request named)."""
    names = candidate_names(primary, requested)
    if allowed is not None and requested is None:
        names = [names[0], *(name for name in names[1:] if name in allowed)]
    others = {price.model: price for price in
              ModelPrice.objects.select_related("provider").filter(model__in=names[1:])} if names[1:] else {}
    routes = [route_of(primary)]
    for name in names[1:]:
        price = others.get(name)
        if price is not None:
            routes.append(route_of(price))
        elif requested is not None:
            raise UnknownModel(f"Model {name!r} is not in the price list.")
        else:
            logger.warning("model %s: its fallback %s is not in the price list; skipped", primary.model, name)
    return routes


def dearest(routes: Sequence[Route]) -> ModelPrice:
    """The price a turn holds for: the first route's if it is the dearest in both rates, else
    the highest prompt and the highest completion rate (no candidate can cost more)."""
    first = routes[0].price
    prompt = max((route.price.prompt_price_per_mtok for route in routes), default=Decimal(0))
    completion = max((route.price.completion_price_per_mtok for route in routes), default=Decimal(0))
    if prompt == first.prompt_price_per_mtok and completion == first.completion_price_per_mtok:
        return first
    return ModelPrice(model=first.model, prompt_price_per_mtok=prompt, completion_price_per_mtok=completion)
