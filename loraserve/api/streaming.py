"""Server-sent events for both APIs, and the route that answers one path with JSON or with a stream.

FastAPI streams SSE from endpoints declared as async generators with `response_class=EventSourceResponse`.
Such an endpoint has committed to a 200 stream before its body runs, so every refusal must happen earlier: in
the dependencies, which parse, validate and submit the request before either kind of endpoint is called.
"""
import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.responses import Response

from loraserve.api.errors import error_body
from loraserve.api.openapi import JSON_OR_STREAM
from loraserve.engine.errors import ShuttingDownError

logger = logging.getLogger(__name__)


class StreamSwitchRoute(APIRoute):
    """A route whose JSON body's `"stream": true` hands the request to an SSE twin of its endpoint."""

    def __init__(self, path: str, endpoint: Callable[..., Any], *, stream_endpoint: Callable[..., Any],
                 **kwargs: Any) -> None:
        self.stream_route = APIRoute(path, stream_endpoint, response_class=EventSourceResponse, **kwargs)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Any]:
        answer_json = super().get_route_handler()
        answer_stream = self.stream_route.get_route_handler()

        async def handler(request: Request) -> Response:
            return await (answer_stream if await asks_for_stream(request) else answer_json)(request)

        return handler


async def asks_for_stream(request: Request) -> bool:
    """Peek at the body, parsed in a worker thread (a large batch takes a while to parse, and the event loop must
    go on serving) and left in Starlette's cache for the real handler; a malformed one goes the JSON way."""
    try:
        request._json = await asyncio.to_thread(json.loads, await request.body())  # Request.json's own cache
    except ValueError:
        return False
    return isinstance(request._json, dict) and request._json.get("stream") is True


def add_stream_switch_route(router: APIRouter, path: str, endpoint: Callable[..., Any],
                            stream_endpoint: Callable[..., Any], errors: dict[int | str, dict[str, Any]]) -> None:
    """The route documents both answers to a success and the `errors` it answers."""
    router.routes.append(StreamSwitchRoute(path, endpoint, stream_endpoint=stream_endpoint, methods=["POST"],
                                           responses={**JSON_OR_STREAM, **errors}))


async def sse_events(chunks: AsyncIterator[dict], openai: bool) -> AsyncIterator[ServerSentEvent]:
    """Each chunk as one event; a failure mid-stream becomes a final error event.

    OpenAI streams end with `data: [DONE]`; LoRAX streams must not, since its client parses every event as JSON.
    """
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield ServerSentEvent(data=chunk)
    except Exception as error:
        if not isinstance(error, ShuttingDownError):  # an expected end, not a fault to investigate
            logger.exception("a stream failed after it started")
        yield ServerSentEvent(data=error_body(error, openai))
    if openai:
        yield ServerSentEvent(raw_data="[DONE]")
