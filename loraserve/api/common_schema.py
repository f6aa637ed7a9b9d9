"""What the OpenAI and LoRAX request schemas share: bounds, stop lists, and a base that is strict about types,
treats `null` as "the default", and refuses any field it does not know, or a known one it does not serve, rather
than silently ignoring something that would change the output."""
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraserve.api.errors import InvalidRequestError

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


def document_nulls_and_unsupported(schema: dict[str, Any], model: type["RequestSchema"]) -> None:
    """The JSON schema says what validation accepts: an optional field may be null (its default), and a field this
    server does not serve takes only the values that ask for nothing."""
    properties, required = schema.get("properties", {}), set(schema.get("required", []))
    for name, field in properties.items():
        if name not in required and {"type": "null"} not in field.get("anyOf", []):
            outer = {key: field.pop(key) for key in ("default", "title", "description") if key in field}
            properties[name] = {**outer, "anyOf": [field, {"type": "null"}]}
    for name, neutral in model.unsupported.items():
        properties[name] = {"enum": list(neutral), "description": "not supported: only values that ask for nothing"}


class RequestSchema(StrictSchema):
    """Base of request bodies: nulls fall back to defaults; `unsupported` maps a field this server knows but does
    not serve to the values that ask for nothing, and any other value is refused."""

    model_config = ConfigDict(json_schema_extra=document_nulls_and_unsupported)
    unsupported: ClassVar[dict[str, tuple]] = {}

    @model_validator(mode="before")
    @classmethod
    def drop_nulls_refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, neutral in cls.unsupported.items():
            value = data.get(name)  # compared with its type: 0 is no `false`, and 1.0 no `1`
            if not any(value == allowed and type(value) is type(allowed) for allowed in neutral):
                raise InvalidRequestError(f"{name} is not supported by this server", name)
        known = {field.alias or name for name, field in cls.model_fields.items()}  # an unknown key is refused,
        return {key: value for key, value in data.items()  # null or not
                if not (value is None and key in known) and key not in cls.unsupported}


def stop_list(stop: str | list[str]) -> list[str]:
    """One stop string or a list of them, as a list."""
    return [stop] if isinstance(stop, str) else stop


StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)]
