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
from server.engine.errors import RequestValidationError
from server.engine.model_runner import ModelRunner, kv_block_bytes
from server.engine.outputs import RequestOutput, TokenLogprob
from server.engine.sampler import sample
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

    def __init__(self, loaded: LoadedModel, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.metrics = metrics or Metrics()
        parameter = next(loaded.model.parameters())
        block_bytes = kv_block_bytes(loaded.config, config.block_size, parameter.dtype)
        num_blocks = config.num_kv_blocks or config.kv_cache_memory // block_bytes
        if num_blocks < 1:
            raise ValueError(f"the KV cache holds no block: one block takes {block_bytes} bytes")
        self.max_model_len = min(config.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings, num_blocks * config.block_size)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB); max model length %d", num_blocks,
                    config.block_size, num_blocks * block_bytes / 2**20, self.max_model_len)
        base = adapter_base_shape(loaded.config)
        slots = SlotPool(base, config.max_loras, config.max_lora_rank, parameter.device, parameter.dtype)
        directory, self.adapter_scratch = adapter_directory(config)
        self.adapters = AdapterRegistry(directory, base, slots, config.max_cpu_loras,
                                        config.max_lora_rank, listener=self.metrics)
        self.runner = ModelRunner(loaded.model, loaded.config, num_blocks, config.block_size, slots.layer_weights)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.prefix_caching, self.metrics)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs,
                                   self.adapters)
        self.stop_checker = StopChecker(loaded.tokenizer, self.max_model_len)
        self.sequences: dict[str, Sequence] = {}
        self.seed_source = random.Random(config.seed)

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
            self.scheduler.finish(sequence, "abort")
            self.metrics.requests_finished.labels(finished_reason="abort").inc()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an output for every request that got a new token."""
        batch = self.scheduler.schedule()
        self.metrics.preemptions.inc(batch.num_preempted)
        outputs = []
        if not batch.empty:
            self.metrics.step_tokens.observe(sum(batch.num_new_tokens))
            logits, sampling = self.runner.execute(batch)
            for sequence, num_new in zip(batch.sequences, batch.num_new_tokens):
                sequence.num_computed_tokens += num_new
            sampled = [batch.sequences[index] for index in sampling]
            tokens, logprobs = sample(logits, sampled)
            outputs = [self._append_token(s, t, lp) for s, t, lp in zip(sampled, tokens, logprobs)]
        return outputs

    def _append_token(self, sequence: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        sequence.token_ids.append(token)
        self._record_token_timing(sequence)
        stop = self.stop_checker.check(sequence)
        if stop is not None:
            self.scheduler.finish(sequence, *stop)
            del self.sequences[sequence.request_id]
            self._record_finish(sequence)
        return RequestOutput(
            request_id=sequence.request_id,
            token_ids=[token],
            text=self.stop_checker.take_new_text(sequence),
            logprobs=[logprob] if logprob is not None else [],
            finished=sequence.finished,
            finish_reason=sequence.finish_reason,
            stop_reason=sequence.stop_reason,
            num_prompt_tokens=sequence.num_prompt_tokens,
            num_output_tokens=sequence.num_output_tokens,
            num_cached_tokens=sequence.num_cached_tokens,
        )

    def _record_token_timing(self, sequence: Sequence) -> None:
        now = time.monotonic()
        self.metrics.generation_tokens.inc()
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
