"""What the OpenAI and LoRAX request schemas share: bounds, stop lists, and a base that treats `null` as
"the default" and refuses features this server would otherwise silently ignore."""
from typing import Any, ClassVar

from pydantic import BaseModel, model_validator

MAX_STOP_SEQUENCES = 16
MAX_SEED = 2**63 - 1  # each of n choices gets seed + i; torch seeds take up to 2**64 - 1
MAX_LOGPROBS = 20  # alternatives reported per token
MAX_CHOICES = 16


def stop_list(stop: str | list[str]) -> list[str]:
    """One stop string or a list of them, as a list; refuses empty strings and too many of them."""
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP_SEQUENCES or not all(stops):
        raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings")
    return stops


class RequestSchema(BaseModel):
    """Base of request bodies: nulls fall back to defaults; `unsupported` maps a field to the values that
    ask for nothing, and any other value is refused."""

    unsupported: ClassVar[dict[str, tuple]] = {}

    @model_validator(mode="before")
    @classmethod
    def drop_nulls_refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, neutral in cls.unsupported.items():
            if data.get(name) not in neutral:
                raise ValueError(f"{name} is not supported by this server")
        return {key: value for key, value in data.items() if value is not None}
