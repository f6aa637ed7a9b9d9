"""SSE framing: an error mid-stream becomes a final event in the API's own error shape."""
import asyncio

from loraserve.api.streaming import sse_events
from loraserve.engine.errors import EngineDeadError


async def chunks_then_failure():
    yield {"n": 1}
    raise EngineDeadError("the engine failed")


def events(openai: bool) -> list:
    async def gather() -> list:
        return [event async for event in sse_events(chunks_then_failure(), openai)]
    return asyncio.run(gather())


def test_openai_stream_ends_with_an_error_object_then_done():
    first, error, done = events(openai=True)
    assert first.data == {"n": 1}
    assert error.data["error"]["message"] == "the engine failed"
    assert error.data["error"]["type"] == "service_unavailable"
    assert done.raw_data == "[DONE]"


def test_lorax_stream_ends_with_an_error_event_and_no_done_marker():
    first, error = events(openai=False)
    assert first.data == {"n": 1}
    assert error.data == {"error": "the engine failed", "error_type": "generation"}
