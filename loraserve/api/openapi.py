"""What the OpenAPI document says each route answers besides success: the error statuses it really returns, in
its API's error shape, so clients, generators and fuzzers can rely on the document.

Routes list their errors with `responses=`; `describe_errors_only` then drops FastAPI's own 422 entry from routes
that never answer it (OpenAI routes answer 400 for a bad body), since its body shape is not ours either.
"""
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

DESCRIPTIONS = {
    400: "The body or a parameter is invalid; `param` names the field when one is at fault.",
    401: "The admin key is missing or wrong (send `Authorization: Bearer <key>`).",
    404: "No model, adapter or version by that name.",
    413: "The body exceeds --max-request-bytes (an upload, --max-adapter-bytes).",
    422: "The body or a parameter is invalid (LoRAX's status for it).",
    424: "Generation failed for this request (LoRAX's status for it); the server goes on serving.",
    429: "The queue is full; try again later.",
    500: "Generation failed inside the engine for this request alone; the server goes on serving.",
    503: "The server is shutting down or restarting; send the request elsewhere.",
}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """OpenAI's error body, used by every route under /v1/."""

    error: OpenAIErrorDetail


class LoraxError(BaseModel):
    """LoRAX's error body, which `lorax-client` turns back into its exceptions."""

    error: str
    error_type: str


class HealthStatus(BaseModel):
    status: str


# What `loraserve.adapters.store.validate_name` accepts, as an ECMA-262 pattern.
ADAPTER_NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"


def errors(model: type[BaseModel], *statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": model, "description": DESCRIPTIONS[status]} for status in statuses}


OPENAI_GENERATION_ERRORS = errors(OpenAIError, 400, 404, 413, 429, 500, 503)
LORAX_GENERATION_ERRORS = errors(LoraxError, 404, 413, 422, 424, 429, 500, 503)
ADMIN_ERRORS = errors(OpenAIError, 400, 401, 404, 413)
# Each event of a stream (OpenAPI 3.2's `itemSchema`, as FastAPI writes for its own event streams).
STREAM = {"text/event-stream": {"itemSchema": {
    "type": "object", "required": ["data"], "description": "One server-sent event.",
    "properties": {"data": {"type": "string", "description": "a JSON chunk (an OpenAI stream ends with [DONE])"},
                   "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}}
JSON_OR_STREAM = {200: {"description": "The whole answer as JSON, or with `\"stream\": true`, server-sent events.",
                        "content": STREAM}}
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["name", "adapter_config.json", "adapter_model.safetensors"],
    "properties": {"name": {"type": "string", "pattern": ADAPTER_NAME_PATTERN,
                            "description": "the adapter's name (a new version if taken)"},
                   "adapter_config.json": {"type": "string", "format": "binary"},
                   "adapter_model.safetensors": {"type": "string", "format": "binary"},
                   "config.json": {"type": "string", "format": "binary",
                                   "description": "the adapter's own Medusa heads' config (optional)"},
                   "medusa_lm_head.safetensors": {"type": "string", "format": "binary",
                                                  "description": "the adapter's own Medusa heads (optional)"}}}}}}}


def document_errors(responses: dict[str, dict[str, Any]]) -> None:
    """Drop FastAPI's default 422 (its body is not ours), and give every error its one media type, JSON: FastAPI
    files errors under the route's own (text/plain, text/event-stream)."""
    if "HTTPValidationError" in str(responses.get("422", {})):
        del responses["422"]
    for status, response in responses.items():
        if int(status) >= 400 and "content" in response:
            response["content"] = {"application/json": next(iter(response["content"].values()))}


def describe_errors_only(app: FastAPI) -> None:
    """Install an `openapi()` whose routes document the errors they answer and no others."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    document_errors(operation["responses"])
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
