"""What the OpenAI and LoRAX request schemas share: bounds, stop lists, and a base that is strict about types,
treats `null` as "the default", and refuses any field it does not know, or a known one it does not serve, rather
than silently ignoring something that would change the output."""
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 1024  # characters of one stop string: each is checked against the text after every token
MAX_LOGPROBS = 20  # alternatives reported per token, as vLLM's default --max-logprobs
MAX_CHOICES = 16
MAX_INT32 = 2**31 - 1  # token counts, top-k and token ids: anything larger can never be meaningful
MIN_INT64, MAX_INT64 = -(2**63), 2**63 - 1
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


class StrictSchema(BaseModel):
    """A string is never a number or a boolean, NaN and infinity are no numbers, and an unknown field is an
    error that names it."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class RequestSchema(StrictSchema):
    """Base of request bodies: nulls fall back to defaults; `unsupported` maps a field this server knows but does
    not serve to the values that ask for nothing, and any other value is refused."""

    unsupported: ClassVar[dict[str, tuple]] = {}

    @model_validator(mode="before")
    @classmethod
    def drop_nulls_refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, neutral in cls.unsupported.items():
            if data.get(name) not in neutral:
                raise ValueError(f"{name} is not supported by this server")
        return {key: value for key, value in data.items() if value is not None and key not in cls.unsupported}


def stop_list(stop: str | list[str]) -> list[str]:
    """One stop string or a list of them, as a list."""
    return [stop] if isinstance(stop, str) else stop


StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)]
