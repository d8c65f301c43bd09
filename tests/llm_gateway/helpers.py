from llm_gateway import StreamingContext


async def collect(ctx: StreamingContext) -> list[str]:
    """Every delta of a stream."""
    return [delta async for delta in ctx.chunks]
