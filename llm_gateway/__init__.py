"""Pantheon's LLM gateway: one interface (`LlmGateway`) to the model provider.

Use `get_gateway()` to get the implementation the settings ask for. This package knows
nothing of sessions, wallets or billing; callers persist the `CallRecord`s it returns.
"""

from __future__ import annotations

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
    "Usage",
    "get_gateway",
]

# Keyed by every setting the gateway is built from, so overridden settings get a fresh one.
_gateways: dict[tuple[Any, ...], LlmGateway] = {}
_gateways_lock = threading.Lock()
_MAX_CACHED = 8


def get_gateway() -> LlmGateway:
    """The gateway configured by the Django settings (one instance per configuration)."""
    from django.conf import settings  # lazily: importing llm_gateway must not need Django set up

    provider = getattr(settings, "PANTHEON_LLM_PROVIDER", "fake")
    key = (
        provider,
        getattr(settings, "OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1"),
        getattr(settings, "OPENROUTER_API_KEY", ""),
        float(getattr(settings, "PANTHEON_UPSTREAM_TIMEOUT_SECONDS", 60.0)),
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
    provider, base_url, api_key, timeout, retries, chunk_delay, app_url, app_title = key
    if provider == "fake":
        return FakeGateway(chunk_delay_seconds=chunk_delay)
    if provider == "openrouter":
        return OpenRouterGateway(base_url=base_url, api_key=api_key or "", timeout_seconds=timeout,
                                 max_retries=retries, app_url=app_url or "", app_title=app_title or "")
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"PANTHEON_LLM_PROVIDER must be 'openrouter' or 'fake', not {provider!r}")
