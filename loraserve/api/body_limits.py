"""Bounds on request bodies, enforced before anything parses them.

A body larger than `--max-request-bytes` gets 413 as soon as its Content-Length (or, when it is chunked, its
bytes so far) says so. A body that is not UTF-8, or whose JSON nests deeper than MAX_JSON_DEPTH (Python's parser
would hit its recursion limit: a 500), gets 400. Reading a body awaits the network, so the event loop serves others
meanwhile. Adapter uploads are not buffered: the multipart parser streams them to disk under their own limit.
"""
import re
from collections.abc import Awaitable, Callable

import numpy as np
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.api.errors import InvalidRequestError, RequestTooLargeError

MAX_JSON_DEPTH = 64  # objects and arrays inside each other; request schemas need fewer than ten
UPLOAD_OVERHEAD_BYTES = 64 << 10  # multipart boundaries, part headers and the name field around an upload's files
# A JSON string, escapes included: its brackets are text, not structure.
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
STEPS = bytes.maketrans(b"[{]}", bytes([1, 1, 255, 255]))  # +1 and, as int8, -1

ErrorResponder = Callable[[Request, Exception], Awaitable[object]]


def json_body_problem(body: bytes) -> str | None:
    """Why `body` cannot be a JSON body this server parses: not UTF-8 (JSON's encoding), or nested too deeply."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"the body is not UTF-8 text: byte {error.start} cannot be decoded"
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        return f"the body nests {depth} levels of arrays and objects; at most {MAX_JSON_DEPTH} are accepted"
    return None


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in `body`, without parsing it (any bytes give some answer)."""
    brackets = JSON_STRING.sub(b"", body).translate(None, NOT_BRACKETS)
    steps = np.frombuffer(brackets.translate(STEPS), dtype=np.int8)
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


class BodyLimits:
    """ASGI middleware around the app; `respond` renders a refusal the way the app's error handlers do."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], max_bytes: int, upload_path: str,
                 max_upload_bytes: int, respond: ErrorResponder) -> None:
        self.app = app
        self.routes = routes
        self.max_bytes = max_bytes
        self.upload_path = upload_path
        self.max_upload_bytes = max_upload_bytes + UPLOAD_OVERHEAD_BYTES
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "POST" and scope["path"] == self.upload_path
        limit = self.max_upload_bytes if upload else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self.refuse(scope, receive, send, too_large(limit))
        elif not any(route.matches(scope)[0] is Match.FULL for route in self.routes):
            await self.app(scope, counting(receive, limit), send)  # routing answers (404, 405), unread
        elif upload:
            await self.app(scope, counting(receive, limit), send)
        else:
            await self.buffered(scope, receive, send, limit)

    async def buffered(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Read the whole body (refusing it once it passes `limit`), check its nesting, then hand it on."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body arrived: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self.refuse(scope, receive, send, too_large(limit))
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = json_body_problem(body)
        if problem is not None:
            await self.refuse(scope, receive, send, InvalidRequestError(problem))
            return
        await self.app(scope, replaying(body, receive), send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send, error: Exception) -> None:
        response = await self.respond(Request(scope, receive), error)
        await response(scope, receive, send)


def too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"the request body exceeds this server's limit of {limit} bytes")


def replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the buffered body first, then whatever the client sends next (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()
    return replay


def counting(receive: Receive, limit: int) -> Receive:
    """A `receive` that raises RequestTooLargeError once the body passes `limit` bytes."""
    size = 0

    async def count() -> Message:
        nonlocal size
        message = await receive()
        size += len(message.get("body", b""))
        if size > limit:
            raise too_large(limit)
        return message
    return count
