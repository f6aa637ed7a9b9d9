"""Drivers the engine tests share."""
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.model_runner import StepOutput
from loraserve.engine.scheduler import ScheduledBatch


def run_staggered(engine: LLMEngine, workload: list[tuple[list[int], SamplingParams]],
                  arrivals_per_step: int = 1) -> dict[str, list[int]]:
    """Requests arrive a few per step while the engine runs; returns every request's output tokens."""
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(workload))
    while pending or engine.has_unfinished_requests():
        for index, (prompt, params) in pending[:arrivals_per_step]:
            engine.add_request(str(index), prompt, params)
            outputs[str(index)] = []
        pending = pending[arrivals_per_step:]
        for output in engine.step():
            outputs[output.request_id].extend(output.token_ids)
    return outputs


class ComputedTokens:
    """Counts the tokens an engine's model computes (the KV it writes), by wrapping its runner."""

    def __init__(self, engine: LLMEngine) -> None:
        self.total = 0
        self._execute = engine.runner.execute
        engine.runner.execute = self._count

    def _count(self, batch: ScheduledBatch) -> StepOutput:
        self.total += sum(batch.num_new_tokens)
        return self._execute(batch)
