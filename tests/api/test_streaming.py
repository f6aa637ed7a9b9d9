"""SSE framing: an error mid-stream becomes a final event in the API's own error shape; an idle stream sends
keep-alive comments; a client that stops reading and then leaves ends its stream quietly, its source closed."""
import asyncio
import gc
import json
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI

from loraserve.api import streaming
from loraserve.api.streaming import EventStream, sse_events
from loraserve.engine.errors import EngineDeadError


async def chunks_then_failure() -> AsyncIterator[dict]:
    yield {"n": 1}
    raise EngineDeadError("the engine failed")


def frames(chunks: AsyncIterator[dict], openai: bool) -> list[bytes]:
    async def gather() -> list[bytes]:
        return [frame async for frame in sse_events(chunks, openai)]
    return asyncio.run(gather())


def data_of(frame: bytes) -> dict | str:
    text = frame.decode().removeprefix("data: ").removesuffix("\n\n")
    return text if text == "[DONE]" else json.loads(text)


def test_openai_stream_ends_with_an_error_object_then_done():
    first, error, done = map(data_of, frames(chunks_then_failure(), openai=True))
    assert first == {"n": 1}
    assert error["error"]["message"] == "the engine failed"
    assert error["error"]["type"] == "service_unavailable"
    assert done == "[DONE]"


def test_lorax_stream_ends_with_an_error_event_and_no_done_marker():
    first, error = map(data_of, frames(chunks_then_failure(), openai=False))
    assert first == {"n": 1}
    assert error == {"error": "the engine failed", "error_type": "generation"}


def test_an_idle_stream_sends_keepalive_comments_between_events(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(streaming, "KEEPALIVE_SECONDS", 0.05)

    async def slow_chunks() -> AsyncIterator[dict]:
        yield {"n": 1}
        await asyncio.sleep(0.22)
        yield {"n": 2}

    sent = frames(slow_chunks(), openai=False)
    assert data_of(sent[0]) == {"n": 1} and data_of(sent[-1]) == {"n": 2}
    assert 3 <= sent.count(b": ping\n\n") == len(sent) - 2


def test_a_client_that_stops_reading_then_leaves_ends_the_stream_quietly():
    """The shape of the fault seen in CI: the server is blocked writing to a client that stopped reading when
    the client leaves. The app must return without raising, and the abandoned stream's source must then be closed
    (Starlette drops the stream without closing it; the event loop closes it once it is unreachable)."""
    closed = asyncio.Event()

    async def endless_chunks() -> AsyncIterator[dict]:
        try:
            for number in range(10**6):
                yield {"n": number}
                await asyncio.sleep(0)
        finally:
            closed.set()

    app = FastAPI()

    @app.post("/stream", response_class=EventStream)
    async def stream() -> AsyncIterator[bytes]:
        async for frame in sse_events(endless_chunks(), openai=True):
            yield frame

    asyncio.run(asyncio.wait_for(client_that_leaves(app, closed), timeout=10))


async def client_that_leaves(app: FastAPI, closed: asyncio.Event) -> None:
    left, body_messages, requested = asyncio.Event(), [], False
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/stream", "raw_path": b"/stream", "root_path": "",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "client": ("test", 1),
             "server": ("test", 80)}

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            body_messages.append(message)
            if len(body_messages) == 3:  # the socket's buffers are full: this write never ends
                asyncio.get_running_loop().call_later(0.2, left.set)
                await asyncio.Event().wait()

    await app(scope, receive, send)
    gc.collect()
    await asyncio.wait_for(closed.wait(), timeout=5)
    assert [data_of(message["body"])["n"] for message in body_messages] == [0, 1, 2]
