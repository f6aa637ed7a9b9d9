"""The synchronous engine: accepts requests, and each `step` schedules, runs the model, samples and reports."""
import logging
import random
import threading
import time

import torch

from loraserve.adapters.adapter_info import PREFIX_TUNING
from loraserve.adapters.locations import AdapterLocations
from loraserve.adapters.records import AdapterRef
from loraserve.adapters.registry import AdapterRegistry
from loraserve.adapters.slot_pool import SlotPool
from loraserve.config import ServerConfig
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.errors import EngineDeadError, RequestFailedError, RequestValidationError
from loraserve.engine.fault_isolation import GeneratorSnapshot, is_device_fatal, isolate
from loraserve.engine.grammar import GrammarCompiler
from loraserve.engine.model_runner import ModelRunner
from loraserve.engine.outputs import RequestOutput, TokenLogprob
from loraserve.engine.sampler import Sampled, sample
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.scheduler import ScheduledBatch, Scheduler
from loraserve.engine.speculation import Speculation
from loraserve.engine.sequence import Sequence, SequenceStatus
from loraserve.engine.setup import (ProjectionWeights, adapter_base_shape, adapter_directory, adapter_dtype,
                                 adapter_pages, kv_cache_blocks, make_proposer)
from loraserve.engine.stop_checker import StopChecker
from loraserve.engine.validation import validate_request
from loraserve.intra_op_threads import share_cores_with_helper
from loraserve.metrics import Metrics
from loraserve.model.loader import LoadedModel

logger = logging.getLogger(__name__)

# Requests that failed alone with no successful run between them: past this, the model (or the device) is broken.
MAX_CONSECUTIVE_CULPRITS = 8
# A step with nothing to run while requests wait (for their adapters' loads) waits this long at most for news,
# rather than return at once: a caller stepping in a loop would hold the GIL from the loader it waits for.
IDLE_WAIT_SECONDS = 0.05
# While the adapter loader works, a step leaves it a core, and computes at most this many prompt tokens, so that
# steps stay short (~0.1-0.3 s on one core) and the core comes back soon after the loads end: a 512-token prefill
# step decided on one core ran on one for a second after the loader had finished.
LOADING_PREFILL_TOKENS = 128


class LLMEngine:
    """One model, one KV cache, one scheduler. Not thread-safe: one caller drives it."""

    def __init__(self, loaded: LoadedModel, config: ServerConfig, metrics: Metrics | None = None,
                 draft: LoadedModel | None = None) -> None:
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.metrics = metrics or Metrics()
        num_blocks, block_bytes = kv_cache_blocks(config, [model for model in (loaded, draft) if model is not None])
        self.max_model_len = min(config.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings, num_blocks * config.block_size)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB%s); max model length %d", num_blocks,
                    config.block_size, num_blocks * block_bytes / 2**20, " with the draft's" if draft else "",
                    self.max_model_len)
        base = adapter_base_shape(loaded.config)
        device, dtype = next(loaded.model.parameters()).device, adapter_dtype(loaded.model)
        slots = SlotPool(base, config.max_loras, adapter_pages(config, base, dtype), config.max_lora_rank, device,
                         dtype)
        directory, self.adapter_scratch = adapter_directory(config)
        self._news = threading.Event()  # an adapter placed or failed, or (`notify`) a request arrived
        self.adapters = AdapterRegistry(directory, base, slots, config.max_cpu_loras, config.max_lora_rank,
                                        listener=self.metrics, max_bytes=config.max_adapter_bytes,
                                        on_change=self._news.set,
                                        base_weights=ProjectionWeights(loaded.model),
                                        shared_store=config.shared_adapter_dir,
                                        remote_store=config.adapter_store)
        roots = [root for root in (config.adapter_roots or "").split(",") if root]
        self.adapter_locations = AdapterLocations(self.adapters, roots)
        self.runner = ModelRunner(loaded.model, loaded.config, num_blocks, config.block_size, slots.layer_weights,
                                  slots.virtual_tokens)
        if config.cuda_graphs and self.runner.device.type == "cuda":
            self._capture_graphs(config.max_num_seqs)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.prefix_caching, self.metrics)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs,
                                   self.adapters, config.max_overtaking_steps)
        self.stop_checker = StopChecker(loaded.tokenizer, self.max_model_len)
        self.grammars = GrammarCompiler(loaded.tokenizer, loaded.config.vocab_size)
        self.sequences: dict[str, Sequence] = {}
        self.seed_source = random.Random(config.seed)
        proposer = make_proposer(config, loaded, draft, num_blocks, slots.medusa_heads)
        self.speculation = None if proposer is None else Speculation(proposer, config.spec_tokens,
                                                                     config.spec_adaptive)
        self.consecutive_culprits = 0

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

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, adapter: AdapterRef | None = None
                 ) -> None:
        """Refuse what can never run; raises RequestValidationError with a message for the client. `adapter`
        (pinned) counts its virtual tokens into the context."""
        validate_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len,
                         self._num_virtual_tokens(adapter))

    def _num_virtual_tokens(self, adapter: AdapterRef | None) -> int:
        return 0 if adapter is None else self.adapters.info(adapter).num_virtual_tokens

    def notify(self) -> None:
        """Thread-safe: new work is on its way, so a step waiting for news returns now."""
        self._news.set()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter: AdapterRef | None = None) -> None:
        """Queue a request. An adapter comes pinned by the caller (`resolve` or `pin`), so no upload or delete
        can free its version first; the request owns that pin from here, and drops it when it ends."""
        self.validate(prompt_token_ids, params, adapter)
        if request_id in self.sequences:
            raise RequestValidationError(f"request id {request_id!r} is already in use")
        generator = torch.Generator(device=self.runner.device)
        generator.manual_seed(params.seed if params.seed is not None else self.seed_source.getrandbits(63))
        sequence = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, generator, adapter)
        if adapter is not None:
            info = self.adapters.info(adapter)
            sequence.num_virtual_tokens, sequence.virtual_kv_given = info.num_virtual_tokens, info.kind == PREFIX_TUNING
        if params.grammar is not None:
            sequence.grammar_matcher = self.grammars.matcher(params.grammar)
        if adapter is not None:
            self.adapters.count_request(adapter)
            self.adapters.prefetch(adapter)
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
        """Run one scheduled batch; return an output for every request that got new tokens or failed.

        A request the step fails on ends alone with an error (see fault_isolation.py); a device error, or a fault
        that every request hits, raises EngineDeadError or the error itself: the engine cannot go on.
        """
        started = time.perf_counter()
        if self.speculation is not None:
            self.metrics.spec_unverified_tokens.inc(self.speculation.propose(self.scheduler.running))
        self._news.clear()
        batch = self.scheduler.schedule(LOADING_PREFILL_TOKENS if self.adapters.loading() else None)
        share_cores_with_helper(self.adapters.loading())  # after scheduling, which may have asked for loads
        outputs = [self._failure_output(sequence, error) for sequence, error in self.scheduler.take_failed()]
        self.metrics.preemptions.inc(batch.num_preempted)
        if batch.empty:
            if not outputs and self.scheduler.waiting:
                self._news.wait(IDLE_WAIT_SECONDS)
            return outputs
        self.metrics.step_tokens.observe(sum(batch.num_new_tokens))
        work = list(zip(batch.sequences, batch.num_new_tokens))
        snapshot = GeneratorSnapshot([sequence for sequence in batch.sequences if not sequence.params.greedy])
        decoding = all(sequence.num_tokens - sequence.num_computed_tokens == 1 for sequence in batch.sequences)
        failures = isolate(work, lambda group: outputs.extend(self._run(group)),
                           lambda group: snapshot.restore(sequence for sequence, _ in group),
                           lambda item, error: outputs.append(self._fail(item[0], error)))
        if failures:
            self.metrics.failed_steps.inc()
        elif decoding and self.speculation is not None:
            self.speculation.record_step(sum(batch.num_new_tokens), time.perf_counter() - started)
        return outputs

    def _run(self, work: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """Compute and sample the given requests' new tokens, then append them. Until the tokens are appended
        nothing changes but KV-cache contents and generators, so a failed run can be retried in parts. Requests
        taken out of the step meanwhile (a culprit's dependents) are skipped."""
        work = [(sequence, num_new) for sequence, num_new in work if sequence.status is SequenceStatus.RUNNING]
        if not work:
            return []
        batch = ScheduledBatch([sequence for sequence, _ in work], [num_new for _, num_new in work])
        logits, sampling, prompt_scores, hidden = self.runner.execute(batch)
        sampled = [batch.sequences[index] for index in sampling]
        results = sample(logits, sampled)
        if self.speculation is not None:
            self.speculation.after_sampling(sampled, results, hidden)
        self.consecutive_culprits = 0
        for sequence, num_new in work:
            sequence.num_computed_tokens += num_new
        for index, scores in prompt_scores.items():
            batch.sequences[index].prompt_logprobs.extend(scores)
        outputs = [self._finish_scoring(sequence) for sequence, _ in work
                   if sequence.params.max_tokens == 0 and sequence.num_computed_tokens == sequence.num_tokens]
        for sequence, result in zip(sampled, results):
            try:
                outputs.append(self._accept(sequence, result))
            except Exception as error:  # detokenizing or stop checking failed: this request alone is at fault
                if is_device_fatal(error):
                    raise
                outputs.append(self._fail(sequence, error))
        return outputs

    def _fail(self, sequence: Sequence, error: Exception) -> RequestOutput:
        """End a request the step failed on. Blocks it was computing lose their prefix-cache keys (their KV may be
        incomplete), and requests admitted this step onto them go back to waiting, to compute them again."""
        logger.error("request %s failed inside an engine step and was ended", sequence.request_id, exc_info=error)
        self.consecutive_culprits += 1
        if self.consecutive_culprits >= MAX_CONSECUTIVE_CULPRITS:
            raise EngineDeadError(f"{self.consecutive_culprits} requests in a row failed with no step succeeding "
                                  f"in between: the fault is the server's, not theirs") from error
        suspect = self.block_manager.forget_uncomputed(sequence)
        for other in list(self.scheduler.running):
            if other is not sequence and suspect.intersection(other.block_table[:other.num_computed_tokens
                                                                                 // self.block_manager.block_size]):
                self.scheduler.preempt(other)
                self.metrics.preemptions.inc()
        self._finish(sequence, "error")
        return self._failure_output(sequence, error)

    def _failure_output(self, sequence: Sequence, error: Exception) -> RequestOutput:
        """The final output of a request ended by a failure (its blocks, slot and pin already returned)."""
        self.sequences.pop(sequence.request_id, None)
        if self.speculation is not None:
            self.speculation.release(sequence.request_id)
        self.metrics.requests_finished.labels(finished_reason="error").inc()
        if not isinstance(error, RequestValidationError):
            error = RequestFailedError(f"generation failed inside the engine ({type(error).__name__}); this request "
                                       f"was ended, and the server goes on serving the others")
        return RequestOutput(sequence.request_id, [], "", [], True, "error", None, sequence.num_prompt_tokens,
                             sequence.num_output_tokens, sequence.num_cached_tokens, error=error)

    def _finish_scoring(self, sequence: Sequence) -> RequestOutput:
        """End a request that only scores its prompt (max_tokens 0), now that its prompt is computed."""
        self._finish(sequence, "length")
        del self.sequences[sequence.request_id]
        self.metrics.requests_finished.labels(finished_reason="length").inc()
        return RequestOutput(sequence.request_id, [], "", [], True, "length", None, sequence.num_prompt_tokens, 0,
                             sequence.num_cached_tokens, prompt_logprobs=self._prompt_logprobs(sequence))

    @staticmethod
    def _prompt_logprobs(sequence: Sequence) -> list[TokenLogprob | None] | None:
        return sequence.prompt_logprobs if sequence.params.prompt_logprobs is not None else None

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
        first_output = sequence.first_token_time is None
        appended = 0
        for token in result.token_ids:
            sequence.token_ids.append(token)
            if sequence.grammar_matcher is not None and not sequence.grammar_matcher.consume_token(token):
                raise RuntimeError(f"the grammar refused token {token}: {sequence.grammar_matcher.get_error()}")
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
            prompt_logprobs=self._prompt_logprobs(sequence) if first_output else None,
        )

    def _finish(self, sequence: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        self.scheduler.finish(sequence, reason, stop_reason)
        if self.speculation is not None:
            self.speculation.release(sequence.request_id)

    def _record_token_timing(self, sequence: Sequence, num_tokens: int) -> None:
        """Tokens verified together arrive together: one inter-token gap per step, as vLLM counts it."""
        now = time.monotonic()
        self.metrics.generation_tokens.inc(num_tokens)
        if sequence.first_token_time is None:
            sequence.first_token_time = now
            self.metrics.first_token(sequence.arrival_time, sequence.first_scheduled_time, now,
                                     sequence.adapter.name if sequence.adapter is not None else None)
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

