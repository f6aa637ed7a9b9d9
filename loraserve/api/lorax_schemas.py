"""Request bodies of the LoRAX-compatible endpoints, as `lorax-client` sends them.

The client sends every parameter, most as null. Features this server lacks (typical-p, best-of, watermarks,
merged adapters) are refused when asked for, not ignored.
"""
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from loraserve.api.common_schema import MAX_INT32, MAX_LOGPROBS, RequestSchema, StopStrings
from loraserve.api.structured_schema import LoraxResponseFormat
from loraserve.engine.grammar import GrammarSpec
from loraserve.engine.sampling_params import SamplingParams

MAX_LORAX_SEED = 2**64 - 1  # LoRAX's seed is an unsigned 64-bit integer


class GenerateParameters(RequestSchema):
    """`parameters` of a LoRAX request; greedy unless `do_sample` or a sampling setting asks otherwise."""

    unsupported: ClassVar[dict[str, tuple]] = {
        "typical_p": (None,), "best_of": (None, 1), "watermark": (None, False), "merged_adapters": (None,)}

    # An uploaded adapter's name (empty or the base model's name means none), or, inside the server's
    # --adapter-roots, a path (adapter_source "local") or an s3:// URL (adapter_source "s3").
    adapter_id: str | None = None
    adapter_source: str | None = Field(None, json_schema_extra={"enum": ["local", "s3", None]})
    api_token: str | None = None  # for private hub adapters; nothing is fetched, so it is ignored
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    ignore_eos_token: bool = False
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    return_full_text: bool = False
    stop: StopStrings = []
    seed: int | None = Field(None, ge=0, le=MAX_LORAX_SEED)
    temperature: float | None = Field(None, gt=0.0, le=100.0)
    top_k: int | None = Field(None, gt=0, le=MAX_INT32)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    truncate: int | None = Field(None, gt=0, le=MAX_INT32)  # keep only the last `truncate` prompt tokens
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(None, ge=1, le=MAX_LOGPROBS)
    speculative: bool = True  # false: no speculative decoding for this request
    response_format: LoraxResponseFormat | None = None

    @field_validator("adapter_source")
    @classmethod
    def check_adapter_source(cls, source: str) -> str:
        if source not in ("local", "s3"):
            raise ValueError(f"this server has no adapter source {source!r}: it serves adapters uploaded to it "
                             "(POST /v1/adapters) and, inside its --adapter-roots, adapters named by their path "
                             "(adapter_source 'local') or s3:// URL ('s3')")
        return source

    @model_validator(mode="after")
    def check_s3_location(self) -> "GenerateParameters":
        if self.adapter_source == "s3" and not (self.adapter_id or "").startswith("s3://"):
            raise ValueError("adapter_source 's3' takes an s3:// URL as adapter_id")
        return self

    @property
    def sampling(self) -> bool:
        """Like TGI: any setting that reshapes the distribution turns sampling on."""
        return (self.do_sample or self.temperature not in (None, 1.0) or self.top_k is not None
                or self.top_p not in (None, 1.0))

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """Always with logprobs: every LoRAX token carries its own; prompt tokens' too with decoder_input_details."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=(self.temperature or 1.0) if self.sampling else 0.0,
            top_k=self.top_k or 0, top_p=self.top_p or 1.0, repetition_penalty=self.repetition_penalty,
            seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos_token,
            logprobs=self.return_k_alternatives or 0, speculative=self.speculative,
            prompt_logprobs=0 if self.decoder_input_details else None,
            grammar=self.grammar_spec)

    @property
    def grammar_spec(self) -> GrammarSpec | None:
        return self.response_format.spec() if self.response_format is not None else None


class GenerateRequest(RequestSchema):
    """POST /, /generate and /generate_stream."""

    inputs: str
    parameters: GenerateParameters = GenerateParameters()
    stream: bool = False
