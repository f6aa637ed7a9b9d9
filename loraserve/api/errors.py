"""The one place where a failure becomes an HTTP status and a JSON body.

OpenAI routes (under /v1/) answer `{"error": {"message", "type", "param", "code"}}`; LoRAX routes answer
`{"error": message, "error_type": type}`, the shape `lorax-client` turns back into its own exceptions.
"""
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as SchemaValidationError
from fastapi.responses import JSONResponse
from python_multipart.exceptions import FormParserError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path

from loraserve.adapters.errors import (AdapterFormatError, AdapterLocationError, AdapterNameError, AdapterNotFoundError,
                                      AdapterTooLargeError)
from loraserve.engine.errors import (EngineDeadError, QueueFullError, RequestFailedError, RequestValidationError,
                                  ShuttingDownError)
from loraserve.metrics import Metrics
from loraserve.model.errors import ChatTemplateError, InvalidTextError, TextTooLongError


class InvalidRequestError(Exception):
    """The request is well-formed JSON but asks for something this server refuses."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(Exception):
    """The request names a model or adapter this server does not serve."""

    def __init__(self, name: str, param: str) -> None:
        super().__init__(f"no model or adapter named {name!r} is served here")
        self.param = param


class GenerationAbortedError(Exception):
    """The engine ended a request on its own before it finished."""


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready; nobody reads the response."""


class RequestTooLargeError(Exception):
    """The request body is larger than --max-request-bytes (or, for an upload, --max-adapter-bytes)."""


class UnauthorizedError(Exception):
    """An admin route was called without the admin key, or with a wrong one."""

    headers = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class ErrorKind:
    """How one family of failures looks to each API, and the reason label when it refuses a request."""

    openai_status: int
    openai_type: str
    lorax_status: int
    lorax_type: str
    reason: str | None  # label of `requests_rejected`; None when the failure is no refusal


INVALID = ErrorKind(400, "invalid_request_error", 422, "validation", "invalid_request")
NOT_FOUND = ErrorKind(404, "invalid_request_error", 404, "not_found", "model_not_found")
DISCONNECTED = ErrorKind(499, "client_disconnected", 499, "client_disconnected", None)
UNEXPECTED = ErrorKind(500, "internal_error", 500, "generation", None)
GENERATION_FAILED = ErrorKind(500, "internal_error", 424, "generation", None)  # LoRAX: 424, as TGI answers
KINDS: dict[type[Exception], ErrorKind] = {
    SchemaValidationError: INVALID,
    InvalidRequestError: INVALID,
    RequestValidationError: INVALID,
    ChatTemplateError: INVALID,
    InvalidTextError: INVALID,
    TextTooLongError: INVALID,
    FormParserError: INVALID,
    AdapterFormatError: INVALID,
    AdapterNameError: INVALID,
    AdapterLocationError: INVALID,
    ModelNotFoundError: NOT_FOUND,
    AdapterNotFoundError: NOT_FOUND,
    AdapterTooLargeError: ErrorKind(413, "invalid_request_error", 413, "validation", "adapter_too_large"),
    RequestTooLargeError: ErrorKind(413, "invalid_request_error", 413, "validation", "request_too_large"),
    UnauthorizedError: ErrorKind(401, "authentication_error", 401, "unauthorized", "unauthorized"),
    QueueFullError: ErrorKind(429, "rate_limit_error", 429, "overloaded", "queue_full"),
    EngineDeadError: ErrorKind(503, "service_unavailable", 424, "generation", "engine_dead"),
    ShuttingDownError: ErrorKind(503, "service_unavailable", 503, "overloaded", "shutting_down"),
    GenerationAbortedError: GENERATION_FAILED,
    RequestFailedError: GENERATION_FAILED,
    ClientDisconnectedError: DISCONNECTED,
    ClientDisconnect: DISCONNECTED,  # Starlette's, raised while an upload's body is read
}


def kind_of(error: Exception) -> ErrorKind:
    if isinstance(error, HTTPException):  # unknown paths and methods
        return ErrorKind(error.status_code, "invalid_request_error", error.status_code, "validation", None)
    for cls in type(error).__mro__:
        if cls in KINDS:
            return KINDS[cls]
    return UNEXPECTED


def is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def field_path(location: tuple) -> str:
    return ".".join(str(part) for part in location if part != "body")


def describe_schema_error(error: SchemaValidationError) -> tuple[str, str | None]:
    """A short message and the offending parameter, from pydantic's (or the JSON parser's) error list."""
    details = error.errors()
    if details[0]["type"] == "json_invalid":
        return f"the body is not valid JSON: {details[0].get('ctx', {}).get('error', '')}", None
    message = "; ".join(f"{field_path(detail['loc']) or 'body'}: {detail['msg']}" for detail in details[:3])
    return message, field_path(details[0]["loc"][:2]) or None  # the top-level field


def message_and_param(error: Exception) -> tuple[str, str | None]:
    if isinstance(error, SchemaValidationError):
        return describe_schema_error(error)
    if isinstance(error, HTTPException):
        return str(error.detail), None
    if kind_of(error) is UNEXPECTED:
        return "internal server error", None
    return str(error), getattr(error, "param", None)


def error_body(error: Exception, openai: bool) -> dict:
    """The JSON body of a failure, in the shape of the API that was called (also used inside streams)."""
    kind = kind_of(error)
    message, param = message_and_param(error)
    if openai:
        return {"error": {"message": message, "type": kind.openai_type, "param": param, "code": kind.reason}}
    return {"error": message, "error_type": kind.lorax_type}


class ErrorResponse(JSONResponse):
    """JSON escaped to ASCII: an error may quote client text holding a lone surrogate, which UTF-8 cannot encode."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_responder(metrics: Metrics) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """The handler that turns any failure into its API's JSON error; counts refusals by reason.

    Headers an error carries (`Allow` of a 405, `WWW-Authenticate` of a 401) go out with it.
    """

    async def handle(request: Request, error: Exception) -> JSONResponse:
        kind = kind_of(error)
        if kind.reason is not None:
            metrics.requests_rejected.labels(reason=kind.reason).inc()
        openai = is_openai(request)
        status = kind.openai_status if openai else kind.lorax_status
        headers = getattr(error, "headers", None)
        if status == 405 and (allowed := documented_methods(request)):
            headers = {**(headers or {}), "Allow": allowed}
        return ErrorResponse(error_body(error, openai), status_code=status, headers=headers)

    return handle


def documented_methods(request: Request) -> str:
    """Every method the OpenAPI document lists for this path. Starlette's own Allow names only the first matching
    route's, and one path has routes on both the public and the admin router."""
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(request.url.path):
            methods |= {method.upper() for method in operations}
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Route every failure, expected or not, through `error_body`. Starlette re-raises unexpected exceptions
    after answering, so the server log still shows their traceback."""
    handle = error_responder(metrics)
    for cls in (*KINDS, HTTPException, Exception):
        app.add_exception_handler(cls, handle)
