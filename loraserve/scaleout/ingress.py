"""The ingress of the Ray Serve application: the single server's HTTP API at one address. Each request is read
(bounded as the single server bounds it), its adapter's name taken from the body (OpenAI's `model`, LoRAX's
`parameters.adapter_id`), and it is forwarded to an engine replica chosen by that name through Ray Serve's model
multiplexing: a replica that has served the adapter, else the least busy one, which then loads it. Requests
without an adapter go by load alone. The response streams back as the replica sends it."""
import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from loraserve.api.adapter_routes import UPLOAD_PATH
from loraserve.api.errors import ErrorResponse, RequestTooLargeError, error_body, is_openai, kind_of
from loraserve.api.streaming import event
from loraserve.config import ServerConfig
from loraserve.engine.errors import EngineDeadError
from loraserve.scaleout.asgi_call import ForwardedRequest, ResponseStart
from loraserve.scaleout.metrics_board import merged_exposition

OPENAI_GENERATION = {"/v1/completions", "/v1/chat/completions"}
LORAX_GENERATION = {"/", "/generate", "/generate_stream"}  # "/": TGI's route, either by its `stream` field
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
RETRIES, RETRY_WAIT_S = 2, 0.5  # a request its replica's death ended unanswered, sent again after a pause
logger = logging.getLogger("loraserve")

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # the replicas' own are forwarded
# The helpers come before the deployment class: Ray serializes the class where it is decorated.


def adapter_name(path: str, body: bytes, served_model_name: str) -> str:
    """The adapter a generation request names ("" for the base model, and for anything the replica will refuse
    anyway: a body that is not JSON goes to any replica, which answers the 400)."""
    if path not in OPENAI_GENERATION | LORAX_GENERATION:
        return ""
    try:
        fields = json.loads(body)
        name = fields.get("model") if path in OPENAI_GENERATION else (fields.get("parameters") or {}).get(
            "adapter_id")
    except (ValueError, AttributeError):
        return ""
    return name if isinstance(name, str) and name != served_model_name else ""


async def relay(parts: DeploymentResponseGenerator, openai: bool, streaming: bool) -> AsyncIterator[bytes]:
    """The body as the replica sends it; if the replica fails mid-stream, an event stream ends with an error event
    (a whole JSON body cannot be mended, so it is cut)."""
    try:
        async for part in parts:
            yield part
    except Exception:
        if not streaming:
            raise
        error = EngineDeadError("the engine replica serving this request failed; the request was stopped")
        yield event(json.dumps(error_body(error, openai)))
    finally:
        parts.cancel()  # a client gone: the replica's app sees the disconnect and aborts the request


def failure(error: Exception, openai: bool) -> Response:
    kind = kind_of(error)
    return ErrorResponse(error_body(error, openai), status_code=kind.openai_status if openai else kind.lorax_status)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    async def __init__(self, replicas: DeploymentHandle, board: DeploymentHandle, config: ServerConfig) -> None:
        self.replicas, self.board, self.config = replicas, board, config
        self.served_model_name = await replicas.served_model_name.remote()

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Every replica's metrics, labelled by replica (see metrics_board.py)."""
        return Response(merged_exposition(await self.board.collect.remote()), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    async def start(self, forwarded: ForwardedRequest) -> tuple[DeploymentResponseGenerator, ResponseStart] | None:
        """The response's start from a replica. A request whose replica died before answering is sent again when
        that is harmless (reads and generations: nothing was answered), once Ray's router has had a moment to
        learn of the death; None if it keeps failing."""
        name = adapter_name(forwarded.path, forwarded.body, self.served_model_name) \
            if self.config.replica_routing == "adapter" else ""
        repeatable = forwarded.method == "GET" or forwarded.path in OPENAI_GENERATION | LORAX_GENERATION
        for attempt in range(RETRIES + 1 if repeatable else 1):
            if attempt:
                await asyncio.sleep(RETRY_WAIT_S)
            parts = self.replicas.options(stream=True, multiplexed_model_id=name).handle.remote(forwarded)
            try:
                return parts, await parts.__anext__()
            except Exception:
                logger.warning("an engine replica failed before answering %s %s (attempt %d)", forwarded.method,
                               forwarded.path, attempt + 1, exc_info=True)
        return None

    @app.api_route("/{path:path}", methods=METHODS)
    async def forward(self, request: Request, path: str) -> Response:
        openai = is_openai(request)
        limit = self.config.max_adapter_bytes if request.url.path == UPLOAD_PATH else self.config.max_request_bytes
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return failure(RequestTooLargeError(f"the request body exceeds {limit} bytes"), openai)
        forwarded = ForwardedRequest(request.method, request.url.path, request.url.query.encode(),
                                     list(request.headers.raw), bytes(body))
        started = await self.start(forwarded)
        if started is None:
            return failure(EngineDeadError("the engine replica serving this request failed; retry it"), openai)
        parts, start = started
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in start.headers}
        streaming = headers.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(relay(parts, openai, streaming), status_code=start.status, headers=headers)
