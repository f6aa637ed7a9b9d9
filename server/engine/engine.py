"""The synchronous engine: accepts requests, and each `step` schedules, runs the model, samples and reports."""
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from adapters.format import BaseModelShape
from adapters.registry import AdapterRef, AdapterRegistry
from adapters.slot_pool import SlotPool
from server.config import ServerConfig
from server.engine.block_manager import BlockManager
from server.engine.draft_proposer import DraftModelProposer
from server.engine.errors import RequestValidationError
from server.engine.model_runner import ModelRunner, kv_block_bytes
from server.engine.outputs import RequestOutput
from server.engine.proposers import NgramProposer, Proposer
from server.engine.sampler import Sampled, sample
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.stop_checker import StopChecker
from server.metrics import Metrics
from server.model.config import ModelConfig
from server.model.loader import LoadedModel

logger = logging.getLogger(__name__)


class LLMEngine:
    """One model, one KV cache, one scheduler. Not thread-safe: one caller drives it."""

    def __init__(self, loaded: LoadedModel, config: ServerConfig, metrics: Metrics | None = None,
                 draft: LoadedModel | None = None) -> None:
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.metrics = metrics or Metrics()
        parameter = next(loaded.model.parameters())
        num_blocks, block_bytes = kv_cache_blocks(config, [model for model in (loaded, draft) if model is not None])
        self.max_model_len = min(config.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings, num_blocks * config.block_size)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB%s); max model length %d", num_blocks,
                    config.block_size, num_blocks * block_bytes / 2**20, " with the draft's" if draft else "",
                    self.max_model_len)
        base = adapter_base_shape(loaded.config)
        slots = SlotPool(base, config.max_loras, config.max_lora_rank, parameter.device, parameter.dtype)
        directory, self.adapter_scratch = adapter_directory(config)
        self.adapters = AdapterRegistry(directory, base, slots, config.max_cpu_loras,
                                        config.max_lora_rank, listener=self.metrics)
        self.runner = ModelRunner(loaded.model, loaded.config, num_blocks, config.block_size, slots.layer_weights)
        if config.cuda_graphs and self.runner.device.type == "cuda":
            self._capture_graphs(config.max_num_seqs)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.prefix_caching, self.metrics)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs,
                                   self.adapters)
        self.stop_checker = StopChecker(loaded.tokenizer, self.max_model_len)
        self.sequences: dict[str, Sequence] = {}
        self.seed_source = random.Random(config.seed)
        self.num_speculative_tokens = config.spec_tokens
        self.proposer = make_proposer(config, loaded.config, draft, num_blocks)

    def _capture_graphs(self, max_num_seqs: int) -> None:
        """CUDA graphs of decode steps; if capture fails the server still serves, every step run eagerly."""
        started = time.monotonic()
        try:
            self.runner.capture_graphs(max_num_seqs, self.max_model_len)
        except Exception:  # a failed capture (an unsupported op, out of memory) costs speed, not service
            logger.exception("capturing CUDA graphs failed: decode steps run eagerly (--no-cuda-graphs skips this)")
            return
        logger.info("captured CUDA graphs of decode steps for batch sizes %s in %.1f s", self.runner.graphs.sizes,
                    time.monotonic() - started)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse what can never run; raises RequestValidationError with a message for the client."""
        if not prompt_token_ids:
            raise RequestValidationError("the prompt is empty")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.model_config.vocab_size:
            raise RequestValidationError(f"prompt token ids must lie in [0, {self.model_config.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestValidationError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context holds {self.max_model_len}")
        if params.max_tokens < 1:
            raise RequestValidationError("max_tokens must be at least 1")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise RequestValidationError(
                f"the prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"this model's context of {self.max_model_len} tokens")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter: AdapterRef | None = None) -> None:
        """Queue a request. An adapter comes pinned by the caller (`resolve` or `pin`), so no upload or delete
        can free its version first; the request owns that pin from here, and drops it when it ends."""
        self.validate(prompt_token_ids, params)
        if request_id in self.sequences:
            raise RequestValidationError(f"request id {request_id!r} is already in use")
        generator = torch.Generator(device=self.runner.device)
        generator.manual_seed(params.seed if params.seed is not None else self.seed_source.getrandbits(63))
        sequence = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, generator, adapter)
        if adapter is not None:
            self.adapters.count_request(adapter)
            self.metrics.count_adapter_request(adapter.name)
        self.sequences[request_id] = sequence
        self.scheduler.add(sequence)
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))

    def abort_request(self, request_id: str) -> None:
        """Drop a request wherever it is; its blocks return to the free list at once."""
        sequence = self.sequences.pop(request_id, None)
        if sequence is not None and not sequence.finished:
            self._finish(sequence, "abort")
            self.metrics.requests_finished.labels(finished_reason="abort").inc()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an output for every request that got new tokens."""
        if self.proposer is not None:
            self._propose()
        batch = self.scheduler.schedule()
        self.metrics.preemptions.inc(batch.num_preempted)
        if batch.empty:
            return []
        self.metrics.step_tokens.observe(sum(batch.num_new_tokens))
        logits, sampling = self.runner.execute(batch)
        for sequence, num_new in zip(batch.sequences, batch.num_new_tokens):
            sequence.num_computed_tokens += num_new
        sampled = [batch.sequences[index] for index in sampling]
        return [self._accept(sequence, result) for sequence, result in zip(sampled, sample(logits, sampled))]

    def _propose(self) -> None:
        """Draft tokens for every running request that is decoding and allows it, within its max_tokens."""
        candidates, limits = [], []
        for sequence in self.scheduler.running:
            sequence.truncate_drafts()
            limit = min(self.num_speculative_tokens, sequence.params.max_tokens - sequence.num_output_tokens - 1)
            if sequence.params.speculative and limit > 0 and sequence.num_uncomputed_tokens == 1:
                candidates.append(sequence)
                limits.append(limit)
        if candidates:
            self.proposer.propose(candidates, limits)

    def _accept(self, sequence: Sequence, result: Sampled) -> RequestOutput:
        """Append a sequence's new tokens; roll its KV back past the last accepted draft."""
        sequence.truncate_drafts()
        if result.num_drafts:
            self.metrics.speculated(result.num_drafts, result.num_accepted)
        output = self._append_tokens(sequence, result)
        if result.num_drafts and not sequence.finished:
            sequence.num_computed_tokens = sequence.num_tokens - 1  # the KV of the drafts it accepted
            self.block_manager.rollback(sequence)
        return output

    def _append_tokens(self, sequence: Sequence, result: Sampled) -> RequestOutput:
        """Append tokens one at a time until one stops the request: a stop inside an accepted run drops the
        tokens after it."""
        appended = 0
        for token in result.token_ids:
            sequence.token_ids.append(token)
            appended += 1
            stop = self.stop_checker.check(sequence)
            if stop is not None:
                self._finish(sequence, *stop)
                del self.sequences[sequence.request_id]
                break
        self._record_token_timing(sequence, appended)
        if sequence.finished:
            self._record_finish(sequence)
        return RequestOutput(
            request_id=sequence.request_id,
            token_ids=result.token_ids[:appended],
            text=self.stop_checker.take_new_text(sequence),
            logprobs=[logprob for logprob in result.logprobs[:appended] if logprob is not None],
            finished=sequence.finished,
            finish_reason=sequence.finish_reason,
            stop_reason=sequence.stop_reason,
            num_prompt_tokens=sequence.num_prompt_tokens,
            num_output_tokens=sequence.num_output_tokens,
            num_cached_tokens=sequence.num_cached_tokens,
        )

    def _finish(self, sequence: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        self.scheduler.finish(sequence, reason, stop_reason)
        if self.proposer is not None:
            self.proposer.release(sequence.request_id)

    def _record_token_timing(self, sequence: Sequence, num_tokens: int) -> None:
        """Tokens verified together arrive together: one inter-token gap per step, as vLLM counts it."""
        now = time.monotonic()
        self.metrics.generation_tokens.inc(num_tokens)
        if sequence.first_token_time is None:
            sequence.first_token_time = now
            self.metrics.first_token(sequence.arrival_time, sequence.first_scheduled_time, now)
        else:
            self.metrics.inter_token_latency.observe(now - sequence.last_token_time)
        sequence.last_token_time = now

    def _record_finish(self, sequence: Sequence) -> None:
        self.metrics.requests_finished.labels(finished_reason=sequence.finish_reason).inc()
        self.metrics.request_done(sequence.arrival_time, sequence.first_token_time, sequence.last_token_time,
                                  sequence.num_output_tokens)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 adapters: list[AdapterRef | None] | None = None) -> list[list[int]]:
        """Offline use: run `prompts` (each with its adapter, if any) to completion together; return each one's
        output token ids."""
        request_ids = [f"offline-{index}" for index in range(len(prompts))]
        for request_id, prompt, adapter in zip(request_ids, prompts, adapters or [None] * len(prompts)):
            self.add_request(request_id, prompt, params, adapter)
        outputs: dict[str, list[int]] = {request_id: [] for request_id in request_ids}
        while self.has_unfinished_requests():
            for output in self.step():
                outputs[output.request_id].extend(output.token_ids)
        return [outputs[request_id] for request_id in request_ids]


def kv_cache_blocks(config: ServerConfig, models: list[LoadedModel]) -> tuple[int, int]:
    """How many KV blocks each model's cache gets (a draft model's cache has as many as the target's, out of
    the same --kv-cache-memory), and the bytes one block takes in all of them together."""
    block_bytes = sum(kv_block_bytes(loaded.config, config.block_size, next(loaded.model.parameters()).dtype)
                      for loaded in models)
    num_blocks = config.num_kv_blocks or config.kv_cache_memory // block_bytes
    if num_blocks < 1:
        raise ValueError(f"the KV cache holds no block: one block takes {block_bytes} bytes")
    return num_blocks, block_bytes


def make_proposer(config: ServerConfig, target: ModelConfig, draft: LoadedModel | None, num_blocks: int
                  ) -> Proposer | None:
    """The draft model when one is given, else prompt lookup; None when speculation is off (no --spec-tokens)."""
    if config.spec_tokens == 0:
        if draft is not None:
            raise ValueError("a draft model needs --spec-tokens: how many tokens it proposes per step")
        return None
    if draft is None:
        return NgramProposer(config.spec_ngram_min, config.spec_ngram_max)
    if draft.config.vocab_size != target.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                         f"target's ({target.vocab_size}): it must share the target's tokenizer")
    return DraftModelProposer(draft, num_blocks, config.block_size, config.max_num_batched_tokens)


def adapter_base_shape(config: ModelConfig) -> BaseModelShape:
    """What every adapter must fit: the projections' shapes and the layer count."""
    return BaseModelShape.for_llama(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                                    config.num_attention_heads, config.num_key_value_heads, config.head_dim)


def adapter_directory(config: ServerConfig) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """`--adapter-dir`, or a temporary directory (returned too: it is deleted once nothing holds it)."""
    if config.adapter_dir is not None:
        return Path(config.adapter_dir), None
    scratch = tempfile.TemporaryDirectory(prefix="loraserve-adapters-")
    logger.warning("no --adapter-dir: uploaded adapters go to %s and do not survive a restart", scratch.name)
    return Path(scratch.name), scratch
