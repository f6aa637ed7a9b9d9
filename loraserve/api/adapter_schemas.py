"""Request bodies of the adapter routes (vLLM's load and unload), and the JSON object an adapter is shown as."""
from pydantic import BaseModel, Field

from loraserve.adapters.records import AdapterRecord


class LoadLoraRequest(BaseModel):
    """POST /v1/load_lora_adapter, as vLLM takes it: copy the adapter at a path on this server into the store."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    """POST /v1/unload_lora_adapter, as vLLM takes it."""

    lora_name: str = Field(min_length=1)


def adapter_object(record: AdapterRecord) -> dict:
    """An adapter as the admin routes show it; `id` is the name requests select it by."""
    return {"id": record.name, "object": "adapter", "version": record.version, "rank": record.rank,
            "alpha": record.alpha, "targets": list(record.targets), "size_bytes": record.size_bytes,
            "tier": record.tier, "requests_served": record.requests_served, "created_at": int(record.created_at),
            "kind": record.kind, "num_virtual_tokens": record.num_virtual_tokens,
            "num_medusa_heads": record.num_medusa_heads}
