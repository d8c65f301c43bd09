from collections.abc import AsyncIterator

import pytest

from llm_gateway import OpenRouterGateway
from llm_gateway.openrouter import aclose_shared_client
from tests.fake_openrouter import FakeOpenRouter


@pytest.fixture
async def gateway(fake_openrouter: FakeOpenRouter) -> AsyncIterator[OpenRouterGateway]:
    """An OpenRouterGateway talking to the loopback fake OpenRouter, retries without waits."""
    yield OpenRouterGateway(base_url=fake_openrouter.base_url, api_key="test-key", timeout_seconds=5,
                            backoff_seconds=0, app_url="https://pantheon.test", app_title="Pantheon Test")
    await aclose_shared_client()
