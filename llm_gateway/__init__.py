"""Pantheon's LLM gateway: one interface (`LlmGateway`) to the model provider.

Use `get_gateway()` to get the implementation the settings ask for. This package knows
nothing of sessions, wallets or billing; callers persist the `CallRecord`s it returns.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from .base import (
    CallRecord,
    ChatMessage,
    Completion,
    GatewayError,
    Generation,
    GenerationNotFound,
    LlmGateway,
    StreamEnding,
    StreamingContext,
    ToolCall,
    ToolCallDelta,
    ToolExecutor,
    UpstreamError,
    UpstreamTimeout,
    Usage,
)
from .fake import FakeGateway
from .openrouter import OpenRouterGateway

__all__ = [
    "CallRecord",
    "ChatMessage",
    "Completion",
    "FakeGateway",
    "GatewayError",
    "Generation",
    "GenerationNotFound",
    "LlmGateway",
    "OpenRouterGateway",
    "StreamEnding",
    "StreamingContext",
    "ToolCall",
    "ToolCallDelta",
    "ToolExecutor",
    "UpstreamError",
    "UpstreamTimeout",
    "Upstream",
    "Usage",
    "get_gateway",
]

@dataclasses.dataclass(frozen=True)
class Upstream:
    """Where a call goes (SPEC section 15): an OpenAI-compatible provider the caller named,
    with its own base URL, key and timeout (None: the settings' timeout). `get_gateway(None)`
    is the provider the settings configure instead."""

    name: str
    base_url: str
    api_key: str = ""
    timeout_seconds: float | None = None


# Keyed by every setting the gateway is built from, so overridden settings get a fresh one.
_gateways: dict[tuple[Any, ...], LlmGateway] = {}
_gateways_lock = threading.Lock()
_MAX_CACHED = 32


def get_gateway(upstream: Upstream | None = None) -> LlmGateway:
    """The gateway of `upstream`, or of the provider the Django settings configure (the
    offline `fake`, or `openrouter` from OPENROUTER_*); one instance per configuration."""
    from django.conf import settings  # lazily: importing llm_gateway must not need Django set up

    timeout = float(getattr(settings, "PANTHEON_UPSTREAM_TIMEOUT_SECONDS", 60.0))
    if upstream is None:
        provider = getattr(settings, "PANTHEON_LLM_PROVIDER", "fake")
        name, base_url, api_key = provider, getattr(settings, "OPENROUTER_BASE_URL",
                                                    "https://openrouter.ai/api/v1"), \
            getattr(settings, "OPENROUTER_API_KEY", "")
    else:
        provider, name, base_url, api_key = "openrouter", upstream.name, upstream.base_url, upstream.api_key
        if upstream.timeout_seconds is not None:
            timeout = float(upstream.timeout_seconds)
    key = (
        provider, name, base_url, api_key or "", timeout,
        int(getattr(settings, "PANTHEON_UPSTREAM_MAX_RETRIES", 2)),
        float(getattr(settings, "PANTHEON_FAKE_CHUNK_DELAY_SECONDS", 0.05)),
        getattr(settings, "PANTHEON_APP_URL", ""),
        getattr(settings, "PANTHEON_APP_TITLE", ""),
    )
    with _gateways_lock:
        gateway = _gateways.get(key)
        if gateway is None:
            gateway = _build(key)
            if len(_gateways) >= _MAX_CACHED:
                _gateways.clear()
            _gateways[key] = gateway
        return gateway


def _build(key: tuple[Any, ...]) -> LlmGateway:
    provider, name, base_url, api_key, timeout, retries, chunk_delay, app_url, app_title = key
    if provider == "fake":
        return FakeGateway(chunk_delay_seconds=chunk_delay)
    if provider == "openrouter":
        return OpenRouterGateway(base_url=base_url, api_key=api_key, timeout_seconds=timeout,
                                 max_retries=retries, app_url=app_url or "", app_title=app_title or "",
                                 upstream_name=name)
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"PANTHEON_LLM_PROVIDER must be 'openrouter' or 'fake', not {provider!r}")
