from typing import Any

from llm_gateway import StreamingContext, ToolExecutor


async def collect(ctx: StreamingContext) -> list[str]:
    """Every delta of a stream."""
    return [delta async for delta in ctx.chunks]


def recording_executor(result: str = "r") -> tuple[ToolExecutor, list[dict[str, Any]]]:
    """A tool executor answering `result`, and the list of the arguments it was called with."""
    seen: list[dict[str, Any]] = []

    async def executor(name: str, arguments: dict[str, Any]) -> str:
        seen.append(arguments)
        return result

    return executor, seen
