"""The draft budget (--spec-adaptive): a step verifies the drafts expected to raise its tokens per second, learned
from how often each request's drafts held and what a row cost; guesses it does not verify are still checked, so
verification comes back when drafts hold again. Output never changes (the sampled case is in
test_speculative_sampling)."""
import itertools
import math
import random

import pytest
import torch

from loraserve.engine.draft_budget import PROBE_INTERVAL, DraftBudget, StepCosts
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampler import Sampled
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.sequence import Sequence
from tests.engine import test_speculative
from tests.engine.test_speculative import PROMPTS

# The looping tiny target and its engines, as test_speculative makes them.
model_dir, target, adapter_dirs = test_speculative.model_dir, test_speculative.target, test_speculative.adapter_dirs
make_engine = test_speculative.make_engine
GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
FIXED, PER_ROW = 5e-3, 1.25e-3  # a step of the embedded model on a 2-core CPU: 5 ms, and 1.25 ms a row


def costing(budget: DraftBudget, fixed: float = FIXED, per_row: float = PER_ROW) -> DraftBudget:
    """The budget with steps that cost `fixed + per_row * rows` seconds, whatever the machine's take."""
    for rows in (1, 8):
        budget.record_step(rows, fixed + per_row * rows)
    budget.record_step = budget.record_proposal = lambda count, seconds: None  # guesses: free
    return budget


def sequence(name: str, drafts: list[int]) -> Sequence:
    result = Sequence(name, [1, 2, 3], 3, GREEDY, torch.Generator())
    result.draft_token_ids = list(drafts)
    return result


def test_step_costs_fit_the_line_of_recorded_steps() -> None:
    costs = StepCosts()
    costs.record(4, 0.01)
    assert costs.line() is None  # one row count says nothing of what a row costs
    for index in range(40):
        rows = 1 + index % 6
        costs.record(rows, (FIXED + PER_ROW * rows) * (1.02 if index % 2 else 0.98))
    fixed, per_row = costs.line()
    assert fixed == pytest.approx(FIXED, rel=0.15) and per_row == pytest.approx(PER_ROW, rel=0.15)
    falling = StepCosts()
    for rows, seconds in ((1, 0.003), (2, 0.002)):
        falling.record(rows, seconds)
    assert falling.line()[1] == 0.0  # noise that makes rows look cheaper than free is read as free


def expected_rate(rates: list[list[float]], counts: tuple[int, ...], line: tuple[float, float]) -> float:
    """Tokens per second a step is expected to give verifying counts[i] drafts of request i."""
    tokens = len(rates) + sum(math.prod(request[:count]) for request, count in zip(rates, counts)
                              for count in range(1, count + 1))
    return tokens / (line[0] + line[1] * (len(rates) + sum(counts)))


@pytest.mark.parametrize("fixed, per_row", [(FIXED, PER_ROW), (2e-3, 1.6e-3), (1e-2, 1e-5)],
                         ids=["cpu-batch-1", "cpu-batch-8", "gpu-like"])
def test_the_drafts_chosen_give_the_most_tokens_per_second(fixed: float, per_row: float) -> None:
    """Against every choice of draft counts, for random acceptance estimates: none is expected to give more."""
    generator = random.Random(7)
    for trial in range(30):
        budget = costing(DraftBudget(3), fixed, per_row)
        sequences = [sequence(f"{trial}-{index}", [5, 6, 7][:generator.randint(0, 3)]) for index in range(3)]
        rates = [[generator.random() ** 0.5 for _ in range(3)] for _ in sequences]
        budget.rates = {item.request_id: list(rate) for item, rate in zip(sequences, rates)}
        guesses = [len(item.draft_token_ids) for item in sequences]
        budget.choose(sequences)
        chosen = tuple(len(item.draft_token_ids) for item in sequences)
        best = max(expected_rate(rates, counts, budget.costs.line())
                   for counts in itertools.product(*(range(count + 1) for count in guesses)))
        assert expected_rate(rates, chosen, budget.costs.line()) == pytest.approx(best, rel=1e-9)


def test_guesses_the_step_verifies_and_the_next_one_teach_the_estimates() -> None:
    budget = costing(DraftBudget(3))
    held, missed = sequence("held", [4, 5, 6]), sequence("missed", [4, 5, 6])
    budget.rates = {"held": [0.9, 0.9, 0.1], "missed": [0.9, 0.9, 0.9]}
    budget.choose([held, missed])
    assert held.draft_token_ids == [4, 5] and missed.draft_token_ids == [4, 5, 6]
    # "held": both drafts held and the unverified third guess is the token sampled after them; "missed": the
    # first draft held, the second did not.
    budget.observe([held, missed], [Sampled([4, 5, 6], [None] * 3, 2, 2), Sampled([4, 9], [None] * 2, 3, 1)])
    assert budget.rates["held"] == pytest.approx([0.92, 0.92, 0.28])
    assert budget.rates["missed"] == pytest.approx([0.92, 0.72, 0.9])  # the third was never reached
    budget.release("held")
    assert "held" not in budget.rates and "held" not in budget.guesses


class SwitchingProposer:
    """Guesses a request's next tokens wrong until it has `switch` output tokens, then right (from a plain run's
    answers, by request id)."""

    def __init__(self, answers: dict[str, list[int]], switch: int) -> None:
        self.answers, self.switch = answers, switch
        self.asked: dict[str, list[tuple[int, int]]] = {name: [] for name in answers}  # (output tokens, limit)

    def propose(self, sequences: list[Sequence], limits: list[int]) -> None:
        for item, limit in zip(sequences, limits):
            done = item.num_output_tokens
            self.asked[item.request_id].append((done, limit))
            right = self.answers[item.request_id][done:done + limit]
            item.draft_token_ids = right if done >= self.switch else [(token + 1) % 100 for token in right]
            item.draft_probabilities = None

    def release(self, request_id: str) -> None:
        pass

    def wants_hidden_state(self, sequence: Sequence) -> bool:
        return False


def test_drafts_stop_being_verified_while_they_miss_and_come_back_when_they_hold(make_engine) -> None:
    """Three requests run to the end and a fourth is aborted on the way; nothing of any is kept after."""
    answers = {str(index): tokens for index, tokens in enumerate(make_engine().generate(PROMPTS[:4], GREEDY))}
    engine: LLMEngine = make_engine(spec_tokens=3, spec_adaptive=True)
    costing(engine.speculation.budget)
    proposer = engine.speculation.proposer = SwitchingProposer(answers, switch=20)
    verified: dict[str, list[tuple[int, int]]] = {name: [] for name in answers}  # (output tokens, drafts kept)
    propose = engine.speculation.propose

    def recording(running: list[Sequence]) -> int:
        unverified = propose(running)
        for item in running:
            verified[item.request_id].append((item.num_output_tokens, len(item.draft_token_ids)))
        return unverified

    engine.speculation.propose = recording
    for name, prompt in zip(answers, PROMPTS):
        engine.add_request(name, prompt, GREEDY)
    outputs: dict[str, list[int]] = {name: [] for name in answers}
    for step in itertools.count():
        if step == 10:
            engine.abort_request("3")
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            outputs[output.request_id].extend(output.token_ids)
    assert 0 < len(outputs.pop("3")) < GREEDY.max_tokens
    assert outputs == {name: answers[name] for name in outputs}
    for name in outputs:
        steps = verified[name]
        missing = [count for done, count in steps if 6 <= done < proposer.switch]
        holding = [count for done, count in steps if done >= proposer.switch + 8 and done < GREEDY.max_tokens - 4]
        assert missing and not any(missing), (name, steps)  # a few misses, and nothing more is verified
        probes = [limit for done, limit in proposer.asked[name] if 6 <= done < proposer.switch]
        # and guesses, which cost too, are asked for one at a time, now and then
        assert probes and set(probes) == {1} and len(probes) <= len(missing) // PROBE_INTERVAL + 1
        assert holding and all(holding), (name, steps)  # checked guesses held: verified again
    assert engine.metrics.spec_accepted_tokens._value.get() > 0
    budget = engine.speculation.budget
    assert not budget.rates and not budget.guesses and not budget.waited
