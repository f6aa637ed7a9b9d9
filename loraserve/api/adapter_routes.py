"""Adapter management: upload, list, show and delete adapters, plus vLLM's load and unload routes.

Routes that change which adapters exist need the admin key (see auth.py); reading the list does not. Registry
calls that touch the disk run in a worker thread, so requests keep streaming while an adapter is validated.
"""
import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from loraserve.adapters.registry import AdapterRegistry
from loraserve.api.adapter_schemas import LoadLoraRequest, UnloadLoraRequest, adapter_object
from loraserve.api.auth import require_admin
from loraserve.api.openapi import ADMIN_ERRORS, UPLOAD_BODY, OpenAIError, errors
from loraserve.api.uploads import receive_adapter

UPLOAD_PATH = "/v1/adapters"
router = APIRouter()
admin_router = APIRouter(dependencies=[Depends(require_admin)])


def registry_of(request: Request) -> AdapterRegistry:
    """FastAPI dependency: the adapter registry of the engine this app serves."""
    return request.app.state.engine.adapters


@admin_router.post(UPLOAD_PATH, status_code=201, responses=ADMIN_ERRORS, openapi_extra=UPLOAD_BODY)
async def upload_adapter(request: Request, registry: AdapterRegistry = Depends(registry_of)) -> dict:
    """Multipart form: `name`, and the files as fields `adapter_config.json` and `adapter_model.safetensors`.

    A name already taken gets a new version; requests already running keep the version they started with.
    """
    max_bytes = request.app.state.config.max_adapter_bytes
    with registry.scratch() as source:  # inside the adapter directory: the next start-up removes what a crash left
        name = await receive_adapter(request, source, max_bytes)
        record = await asyncio.to_thread(registry.add, name, source)
    return adapter_object(record)


@router.get("/v1/adapters")
async def list_adapters(registry: AdapterRegistry = Depends(registry_of)) -> dict:
    return {"object": "list", "data": [adapter_object(record) for record in registry.records()]}


@router.get("/v1/adapters/{name}", responses=errors(OpenAIError, 404))
async def show_adapter(name: str, registry: AdapterRegistry = Depends(registry_of)) -> dict:
    return adapter_object(registry.record(name))


@admin_router.delete("/v1/adapters/{name}", responses=errors(OpenAIError, 401, 404))
async def delete_adapter(name: str, registry: AdapterRegistry = Depends(registry_of)) -> dict:
    """New requests for it get 404 at once; requests already running finish with it."""
    await asyncio.to_thread(registry.remove, name)
    return {"id": name, "object": "adapter", "deleted": True}


@admin_router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ADMIN_ERRORS)
async def load_lora_adapter(body: LoadLoraRequest, registry: AdapterRegistry = Depends(registry_of)) -> str:
    """vLLM's route: the adapter directory at `lora_path`, on this server, is validated and copied in."""
    record = await asyncio.to_thread(registry.add_from_path, body.lora_name, Path(body.lora_path))
    return f"Loaded {record.kind} adapter {record.name!r} (version {record.version})."


@admin_router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ADMIN_ERRORS)
async def unload_lora_adapter(body: UnloadLoraRequest, registry: AdapterRegistry = Depends(registry_of)) -> str:
    await asyncio.to_thread(registry.remove, body.lora_name)
    return f"Unloaded adapter {body.lora_name!r}."
