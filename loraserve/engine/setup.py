"""What an engine is built from, decided once at start-up: the KV cache's size, the proposer, and what adapters
must fit and where they live."""
import logging
import threading
from pathlib import Path

import torch
from torch import nn

from loraserve.adapters.adapter_info import BaseModelShape
from loraserve.adapters.errors import AdapterError
from loraserve.adapters.medusa_format import MedusaWeights, load_medusa_heads
from loraserve.adapters.scratch import ScratchAdapterDirectory, remove_abandoned
from loraserve.adapters.slot_pool import page_bytes
from loraserve.config import ServerConfig
from loraserve.engine.draft_proposer import DraftModelProposer
from loraserve.engine.medusa_proposer import MedusaProposer
from loraserve.engine.model_runner import kv_block_bytes
from loraserve.engine.proposers import NgramProposer, Proposer
from loraserve.model.config import ModelConfig
from loraserve.model.layers.quantized_linear import QuantizedLinear
from loraserve.model.llama import LlamaModel
from loraserve.model.loader import LoadedModel

logger = logging.getLogger(__name__)


def kv_cache_blocks(config: ServerConfig, models: list[LoadedModel]) -> tuple[int, int]:
    """How many KV blocks each model's cache gets (a draft model's cache has as many as the target's, out of
    the same --kv-cache-memory), and the bytes one block takes in all of them together."""
    block_bytes = sum(kv_block_bytes(loaded.config, config.block_size, next(loaded.model.parameters()).dtype)
                      for loaded in models)
    num_blocks = config.num_kv_blocks or config.kv_cache_memory // block_bytes
    if num_blocks < 1:
        raise ValueError(f"the KV cache holds no block: one block takes {block_bytes} bytes")
    return num_blocks, block_bytes


def make_proposer(config: ServerConfig, target: LoadedModel, draft: LoadedModel | None, num_blocks: int,
                  adapter_heads: list[MedusaWeights | None]) -> Proposer | None:
    """Medusa heads (the base's when given, and those adapters bring, by slot in `adapter_heads`), with the draft
    model or prompt lookup for requests that have none; None when speculation is off (no --spec-tokens)."""
    if config.spec_tokens == 0:
        for flag, given in (("a draft model", draft is not None), ("Medusa heads", config.medusa_heads)):
            if given:
                raise ValueError(f"{flag} needs --spec-tokens: how many tokens it proposes per step")
        return None
    base_heads = None if config.medusa_heads is None else medusa_heads(config, target)
    if base_heads is not None and draft is not None:
        raise ValueError("--medusa-heads and --draft-model would both propose for every request: choose one")
    return MedusaProposer(target.model, base_heads, adapter_heads,
                          others=None if base_heads is not None else other_proposer(config, target, draft, num_blocks))


def other_proposer(config: ServerConfig, target: LoadedModel, draft: LoadedModel | None, num_blocks: int
                   ) -> Proposer:
    """The draft model when one is given, else prompt lookup."""
    if draft is None:
        return NgramProposer(config.spec_ngram_min, config.spec_ngram_max)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                         f"target's ({target.config.vocab_size}): it must share the target's tokenizer")
    return DraftModelProposer(draft, num_blocks, config.block_size, config.max_num_batched_tokens)


def medusa_heads(config: ServerConfig, target: LoadedModel) -> MedusaWeights:
    """The base model's Medusa heads (--medusa-heads), checked against it and against --spec-tokens."""
    try:
        weights = load_medusa_heads(Path(config.medusa_heads), target.config.hidden_size, target.config.vocab_size)
    except AdapterError as error:
        raise ValueError(f"--medusa-heads {config.medusa_heads}: {error}") from error
    if config.spec_tokens > weights.num_heads:
        raise ValueError(f"--spec-tokens {config.spec_tokens} asks for more drafts than the {weights.num_heads} "
                         f"Medusa heads guess (one each)")
    parameter = next(target.model.parameters())
    logger.info("Medusa heads: %d of %d layers%s", weights.num_heads, weights.block_weights.shape[1],
                " with their own projections" if weights.projections is not None else " on the model's head")
    return weights.to(parameter.device, parameter.dtype)


def adapter_base_shape(config: ModelConfig) -> BaseModelShape:
    """What every adapter must fit: the projections' shapes and the layer count."""
    return BaseModelShape.for_llama(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                                    config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                    config.vocab_size)


def adapter_dtype(model: nn.Module) -> torch.dtype:
    """The resident adapters' dtype: the model's, but bfloat16 on a CPU whose layers are weight-only quantized. A step
    over many adapters is bound by reading their pages (64 adapters on every projection of the embedded model: 2.3 GB
    in float32, 118 ms; 1.2 GB in bfloat16, 74 ms), and a 4- or 8-bit base rounds far more than bfloat16 does."""
    parameter = next(model.parameters())
    quantized = any(isinstance(module, QuantizedLinear) for module in model.modules())
    if quantized and parameter.device.type == "cpu" and parameter.dtype == torch.float32:
        return torch.bfloat16
    return parameter.dtype


def adapter_pages(config: ServerConfig, base: BaseModelShape, dtype: torch.dtype) -> int:
    """Pages of the resident adapters' pool: what --adapter-memory holds, and no more than --max-loras adapters of
    the largest rank could use."""
    size = page_bytes(base, dtype)
    num_pages = min(config.adapter_memory // size, config.max_loras * config.max_lora_rank)
    if num_pages < config.max_lora_rank:
        raise ValueError(f"--adapter-memory holds {num_pages} pages of {size} bytes; one adapter of rank "
                         f"{config.max_lora_rank} (--max-lora-rank) needs {config.max_lora_rank}")
    logger.info("adapter pool: %d pages of %.1f KiB (%.1f MiB): %d adapters of rank 16 resident at once", num_pages,
                size / 1024, num_pages * size / 2**20, min(config.max_loras, num_pages // 16))
    return num_pages


def adapter_directory(config: ServerConfig) -> tuple[Path, ScratchAdapterDirectory | None]:
    """`--adapter-dir`, or a temporary directory (returned too: it is removed once nothing holds it). Temporary
    directories that killed servers left behind are removed first."""
    if config.adapter_dir is not None:
        return Path(config.adapter_dir), None
    remove_abandoned()
    scratch = ScratchAdapterDirectory()
    logger.warning("no --adapter-dir: uploaded adapters go to %s and do not survive a restart", scratch.path)
    return scratch.path, scratch


class ProjectionWeights:
    """The base model's projections as DoRA adapters are resolved against (`adapters/dora.py`): each projection's
    squared row norms, kept once an adapter asked (about a megabyte for the embedded model), and the projection
    applied to rows. The norms come from the projection applied to the identity, which gives back its weight as
    its kernel sees it (exactly what a quantized layer's codes stand for: one non-zero input per row) on any
    device and for any layer kind."""

    def __init__(self, model: LlamaModel) -> None:
        self._model = model
        self._device = next(model.parameters()).device
        self._norms: dict[tuple[int, str], torch.Tensor] = {}
        self._lock = threading.Lock()  # the loader's thread and upload workers resolve adapters

    def row_norms(self, layer: int, projection: str) -> torch.Tensor:
        with self._lock:
            if (layer, projection) not in self._norms:
                in_features = self._model.projection(layer, projection).in_features
                weight = self.project(layer, projection, torch.eye(in_features)).double()  # [in, out]: W^T
                self._norms[(layer, projection)] = weight.square().sum(dim=0)
            return self._norms[(layer, projection)]

    @torch.no_grad()
    def project(self, layer: int, projection: str, inputs: torch.Tensor) -> torch.Tensor:
        linear = self._model.projection(layer, projection)
        dtype = linear.weight.dtype if isinstance(linear, nn.Linear) else torch.float32
        return linear(inputs.to(self._device, dtype)).float().cpu()
