"""Speculative sampling is lossless: with drafts verified by rejection sampling, every token is distributed exactly
as the target model's own processed distribution p, whatever proposed the drafts.

The engine tests run a tiny 16-token-vocabulary target whose exact distribution over the first three output
tokens is computed independently (Hugging Face's LlamaForCausalLM in float64, sampling settings applied here),
and compare thousands of seeded speculative generations against it with a chi-square goodness-of-fit test. The
proposers are prompt lookup and Medusa heads (point-mass drafts: heads in Medusa-1's layout, each with its own
projection, here) and a different random draft model (drafts from its own q, so q != p and rejections redraw
from the residual). Everything is seeded, so the outcome is deterministic; the
significance level only bounds how likely a correct sampler is to fail after an unrelated change reshuffles the
random draws (the p-value is computed exactly: scipy is not a dependency).
"""
import dataclasses
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks.train_medusa import save_medusa_heads
from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampler import accept_sampled
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import LoadedModel, load_model
from tests.model.helpers import save_tiny_llama

VOCAB_SIZE = 16
TINY = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
NUM_REQUESTS = 2000
NUM_JUDGED_TOKENS = 3  # the joint distribution of the first three output tokens is tested
MAX_TOKENS = 4  # with 3 speculative tokens, the step after the first token verifies two drafts, then a bonus
# token that is the fourth, never judged; with 1, the bonus token after an accepted draft is the third
SIGNIFICANCE = 1e-4  # per test; several tests share a file run by everyone, so false alarms must be rare
MIN_EXPECTED_COUNT = 5.0  # cells expected fewer times than this are pooled
BOUNDARY_MARGIN = 1e-6  # float32 and float64 must agree on which tokens top-p and min-p keep

SETTINGS = {
    "plain": SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True),
    "truncated": SamplingParams(temperature=0.8, top_k=8, top_p=0.9, max_tokens=MAX_TOKENS, ignore_eos=True),
    "penalised": SamplingParams(temperature=1.3, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.4,
                                frequency_penalty=0.3, max_tokens=MAX_TOKENS, ignore_eos=True),
}

Outcome = tuple[int, ...]


# ---------------------------------------------------------------------------------------------- statistics


def chi_square_p_value(statistic: float, degrees_of_freedom: int) -> float:
    """P(X >= statistic) for X chi-square distributed: one minus the regularised lower incomplete gamma function
    P(k/2, statistic/2), summed as its power series (precise enough for the p-values that matter, >= 1e-6)."""
    shape, x = degrees_of_freedom / 2.0, statistic / 2.0
    if x <= 0.0:
        return 1.0
    term = total = 1.0 / shape
    index = 1
    while term > 1e-17 * total:
        term *= x / (shape + index)
        total += term
        index += 1
    return max(0.0, 1.0 - total * math.exp(shape * math.log(x) - x - math.lgamma(shape)))


def chi_square_statistic(observed: Counter, probabilities: dict[Outcome, float]) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom. Cells expected fewer than MIN_EXPECTED_COUNT times are
    pooled into one (itself merged into the smallest other cell if still too small); an observed outcome of
    probability zero lands in the pool, so a sample outside the support fails the test."""
    total = sum(observed.values())
    large = sorted((cell for cell, probability in probabilities.items()
                    if total * probability >= MIN_EXPECTED_COUNT), key=lambda cell: probabilities[cell])
    cells = [(float(observed[cell]), total * probabilities[cell]) for cell in large]
    pooled_observed = total - sum(observed_count for observed_count, _ in cells)
    pooled_expected = total - sum(expected for _, expected in cells)
    if pooled_expected >= MIN_EXPECTED_COUNT:
        cells.append((pooled_observed, pooled_expected))
    elif pooled_expected > 1e-9:
        observed_count, expected = cells[0]
        cells[0] = (observed_count + pooled_observed, expected + pooled_expected)
    else:
        assert pooled_observed == 0, f"{pooled_observed} samples fell outside the target's support"
    statistic = sum((observed_count - expected) ** 2 / expected for observed_count, expected in cells)
    return statistic, len(cells) - 1


def total_variation(observed: Counter, probabilities: dict[Outcome, float]) -> float:
    total = sum(observed.values())
    cells = set(observed) | set(probabilities)
    return 0.5 * sum(abs(observed[cell] / total - probabilities.get(cell, 0.0)) for cell in cells)


def assert_matches(observed: Counter, probabilities: dict[Outcome, float]) -> None:
    statistic, degrees_of_freedom = chi_square_statistic(observed, probabilities)
    p_value = chi_square_p_value(statistic, degrees_of_freedom)
    distance = total_variation(observed, probabilities)
    assert p_value > SIGNIFICANCE, (f"chi-square {statistic:.1f} with {degrees_of_freedom} degrees of freedom: "
                                    f"p = {p_value:.2g}; total variation {distance:.4f}")


# ------------------------------------------------------------------------------- exact reference distribution


def processed_distribution(logits: torch.Tensor, context: list[int], num_prompt_tokens: int,
                           params: SamplingParams) -> torch.Tensor:
    """The distribution one next token is drawn from, in float64: penalties (repetition over the whole context,
    presence and frequency over the output), temperature, then top-k, then top-p over what top-k kept
    (renormalised), then min-p relative to the most likely token that is left."""
    logits = logits.double().clone()
    if params.repetition_penalty != 1.0:
        for token in set(context):
            value = logits[token]
            logits[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
    for token, count in Counter(context[num_prompt_tokens:]).items():
        logits[token] -= params.frequency_penalty * count + params.presence_penalty
    logits = logits / params.temperature
    probabilities = logits.softmax(dim=-1)
    keep = torch.ones(len(logits), dtype=torch.bool)
    order = probabilities.argsort(descending=True)
    if params.top_k:
        keep[order[params.top_k:]] = False
    if params.top_p < 1.0:
        kept = torch.where(keep, probabilities, 0.0)[order]
        kept = kept / kept.sum()
        mass_before = kept.cumsum(dim=-1) - kept
        assert (mass_before - params.top_p).abs().min() > BOUNDARY_MARGIN, "top-p boundary too close to call"
        keep[order[mass_before >= params.top_p]] = False
    if params.min_p > 0.0:
        renormalised = torch.where(keep, probabilities, 0.0) / probabilities[keep].sum()
        threshold = params.min_p * renormalised.max()
        assert (renormalised[keep] - threshold).abs().min() > BOUNDARY_MARGIN, "min-p boundary too close to call"
        keep &= renormalised >= threshold
    kept = torch.where(keep, probabilities, 0.0)
    return kept / kept.sum()


@torch.no_grad()
def exact_joint_distribution(reference: LlamaForCausalLM, prompt: list[int], params: SamplingParams
                             ) -> dict[Outcome, float]:
    """P(first three output tokens) under the target, from one float64 forward over every two-token
    continuation of the prompt (its logits at the last three positions give every conditional needed)."""
    pairs = [(first, second) for first in range(VOCAB_SIZE) for second in range(VOCAB_SIZE)]
    inputs = torch.tensor([prompt + list(pair) for pair in pairs])
    logits = reference(inputs).logits[:, -3:]
    length = len(prompt)
    first_distribution = processed_distribution(logits[0, 0], prompt, length, params)
    joint: dict[Outcome, float] = {}
    for row, (first, second) in enumerate(pairs):
        if first_distribution[first] == 0:
            continue
        second_distribution = processed_distribution(logits[row, 1], prompt + [first], length, params)
        if second_distribution[second] == 0:
            continue
        third_distribution = processed_distribution(logits[row, 2], prompt + [first, second], length, params)
        prefix = float(first_distribution[first] * second_distribution[second])
        for third, probability in enumerate(third_distribution.tolist()):
            if probability > 0:
                joint[(first, second, third)] = prefix * probability
    assert abs(sum(joint.values()) - 1.0) < 1e-9
    return joint


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A target and a draft: different random weights over the same vocabulary, so the draft's q is not p."""
    directory = tmp_path_factory.mktemp("speculative-sampling")
    return {
        "target": save_tiny_llama(directory / "target", seed=21, **TINY),
        "draft": save_tiny_llama(directory / "draft", seed=22, **{**TINY, "num_hidden_layers": 1}),
    }


@pytest.fixture(scope="module")
def medusa_heads(checkpoints: dict[str, Path], target: LoadedModel) -> Path:
    """Three heads with their own projections: the target's head, perturbed, after a random residual block, so
    their guesses are the target's likely tokens, not always the right ones."""
    generator = torch.Generator().manual_seed(23)
    head = target.model.head_weight.detach()
    width = head.shape[1]
    projections = head + 0.5 * head.std() * torch.randn(3, *head.shape, generator=generator)
    return save_medusa_heads(checkpoints["target"].parent / "medusa", 0.3 * torch.randn(3, 1, width, width,
                             generator=generator) / width ** 0.5, torch.zeros(3, 1, width), projections)


@pytest.fixture(scope="module")
def target(checkpoints: dict[str, Path]) -> LoadedModel:
    return load_model(str(checkpoints["target"]), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def draft(checkpoints: dict[str, Path]) -> LoadedModel:
    return load_model(str(checkpoints["draft"]), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> LlamaForCausalLM:
    """The target as Hugging Face runs it, in float64: an oracle independent of our model code."""
    return LlamaForCausalLM.from_pretrained(checkpoints["target"], dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def prompt(reference: LlamaForCausalLM) -> list[int]:
    """The target's own greedy continuation of a few tokens, repeated: prompt lookup finds the tokens the target
    tends to produce in it, so its drafts are accepted often enough (and rejected often enough) to matter."""
    tokens = [3, 9, 5]
    with torch.no_grad():
        while len(tokens) < 10:
            tokens.append(int(reference(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens + tokens[3:8]


# ------------------------------------------------------------------------------------------------- helpers


def speculative_engine(target: LoadedModel, draft: LoadedModel | None, spec_tokens: int = 3,
                       medusa_heads: Path | None = None, adaptive: bool = False) -> LLMEngine:
    """An engine that runs every request at once: the cache, batch and token budget hold them all. Every draft is
    verified, unless `adaptive`: then a request verifies the drafts its own earlier draws make likely to hold, by
    step costs set so that a draft must hold about half the time to pay (not the machine's, which vary)."""
    config = ServerConfig(block_size=4, num_kv_blocks=8 * NUM_REQUESTS, max_num_seqs=NUM_REQUESTS,
                          max_num_batched_tokens=32 * NUM_REQUESTS, spec_tokens=spec_tokens, spec_ngram_min=1,
                          spec_ngram_max=3, medusa_heads=None if medusa_heads is None else str(medusa_heads),
                          spec_adaptive=adaptive)
    engine = LLMEngine(target, config, draft=draft)
    if adaptive:
        budget = engine.speculation.budget
        for rows in (NUM_REQUESTS, 4 * NUM_REQUESTS):
            budget.record_step(rows, 1e-5 * (NUM_REQUESTS + rows))
        budget.record_step = budget.record_proposal = lambda count, seconds: None
        limits, budget.granted = budget.limits, []

        def granting(sequences: list, wanted: list[int]) -> list[int]:
            granted = limits(sequences, wanted)
            budget.granted.extend(granted)
            return granted

        budget.limits = granting
    return engine


def sample_first_tokens(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> Counter:
    """How often each first-three-token sequence came out of NUM_REQUESTS requests, request i seeded with i.
    One greedy single-token request goes first, so the others find the prompt's blocks in the prefix cache."""
    engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    for index in range(NUM_REQUESTS):
        engine.add_request(f"sample-{index}", prompt, dataclasses.replace(params, seed=index))
    outputs: dict[str, list[int]] = {f"sample-{index}": [] for index in range(NUM_REQUESTS)}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].extend(output.token_ids)
    assert all(len(tokens) == MAX_TOKENS for tokens in outputs.values())
    return Counter(tuple(tokens[:NUM_JUDGED_TOKENS]) for tokens in outputs.values())


def speculation_counts(engine: LLMEngine) -> tuple[int, int]:
    """Draft tokens verified, and how many of them were accepted."""
    return (int(engine.metrics.spec_draft_tokens._value.get()),
            int(engine.metrics.spec_accepted_tokens._value.get()))


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("proposer, setting, spec_tokens, adaptive", [
    ("ngram", "plain", 1, False), ("ngram", "truncated", 3, False), ("ngram", "penalised", 3, False),
    ("draft_model", "plain", 1, False), ("draft_model", "truncated", 3, False), ("draft_model", "penalised", 3, False),
    ("medusa", "plain", 1, False), ("medusa", "truncated", 3, False), ("medusa", "penalised", 3, False),
    ("ngram", "penalised", 3, True), ("draft_model", "truncated", 3, True),
])
def test_speculative_samples_follow_the_exact_target_distribution(
        proposer: str, setting: str, spec_tokens: int, adaptive: bool, target: LoadedModel, draft: LoadedModel,
        medusa_heads: Path, reference: LlamaForCausalLM, prompt: list[int]) -> None:
    """The first three output tokens, sampled with speculation, pass a chi-square test against the exact joint
    distribution of the target alone; and the test is not vacuous: drafts were proposed, some accepted and some
    rejected (and, where a budget chose, some left unverified). One draft per step puts the bonus token among those
    judged; three chain two drafts."""
    params = SETTINGS[setting]
    engine = speculative_engine(target, draft if proposer == "draft_model" else None, spec_tokens,
                                medusa_heads if proposer == "medusa" else None, adaptive)
    observed = sample_first_tokens(engine, prompt, params)
    num_drafts, num_accepted = speculation_counts(engine)
    assert num_drafts >= NUM_REQUESTS // 2, "too few drafts were verified for the test to mean anything"
    assert 0.05 * num_drafts < num_accepted < 0.95 * num_drafts, (num_drafts, num_accepted)
    if adaptive:  # requests were granted drafts by their own earlier draws: some none, some more
        granted = Counter(engine.speculation.budget.granted)
        assert granted[0] >= NUM_REQUESTS // 10 and sum(granted.values()) - granted[0] >= NUM_REQUESTS // 10, granted
    assert_matches(observed, exact_joint_distribution(reference, prompt, params))


def test_sampling_without_speculation_follows_the_same_reference(
        target: LoadedModel, reference: LlamaForCausalLM, prompt: list[int]) -> None:
    """Control for the oracle: the plain sampler, with the most involved settings, matches it too."""
    params = SETTINGS["penalised"]
    engine = speculative_engine(target, None, spec_tokens=0)
    observed = sample_first_tokens(engine, prompt, params)
    assert speculation_counts(engine) == (0, 0)
    assert_matches(observed, exact_joint_distribution(reference, prompt, params))


def test_chi_square_p_value_matches_tabulated_quantiles() -> None:
    """The p-value at table values of the chi-square 0.999 and 0.9999 quantiles."""
    for degrees_of_freedom, quantile, p_value in [(10, 29.588, 1e-3), (30, 59.703, 1e-3), (100, 149.449, 1e-3),
                                                  (10, 35.564, 1e-4), (1, 3.841, 0.05), (2, 5.991, 0.05)]:
        assert chi_square_p_value(quantile, degrees_of_freedom) == pytest.approx(p_value, rel=1e-3)
    assert chi_square_p_value(0.0, 5) == 1.0


def accepted_runs(probabilities: torch.Tensor, draft_probabilities: torch.Tensor | None, fixed_drafts: list[int],
                  trials: int) -> list[list[int]]:
    """accept_sampled's output over many draws, drafting from `draft_probabilities` (else `fixed_drafts`)."""
    generator = torch.Generator().manual_seed(7)
    runs = []
    for _ in range(trials):
        if draft_probabilities is None:
            drafts = fixed_drafts
        else:
            drafts = [int(torch.multinomial(row, 1, generator=generator)) for row in draft_probabilities]
        accepted, last = accept_sampled(drafts, probabilities, draft_probabilities, generator)
        runs.append(accepted + [int(last)])
    return runs


def token_probabilities(row: torch.Tensor) -> dict[Outcome, float]:
    return {(token,): float(probability) for token, probability in enumerate(row.tolist()) if probability > 0}


@pytest.mark.parametrize("proposal", ["point_mass", "full_q"])
def test_accept_sampled_tokens_are_distributed_as_p(proposal: str) -> None:
    """Rejection sampling of two drafts against p [3, V]: the first token returned follows p[0]; the second, when
    the first draft was accepted, follows p[1]; the bonus token after both drafts follows p[2]. p has a zero (a
    truncated token) that q proposes."""
    probabilities = torch.tensor([[0.40, 0.25, 0.20, 0.15, 0.00],
                                  [0.10, 0.50, 0.00, 0.10, 0.30],
                                  [0.05, 0.15, 0.45, 0.10, 0.25]])
    draft_probabilities = torch.tensor([[0.10, 0.10, 0.30, 0.20, 0.30],
                                        [0.30, 0.20, 0.30, 0.10, 0.10]]) if proposal == "full_q" else None
    runs = accepted_runs(probabilities, draft_probabilities, fixed_drafts=[1, 1], trials=20000)
    for position in range(3):
        tokens = Counter((run[position],) for run in runs if len(run) > position)
        assert sum(tokens.values()) > 1000, "too few runs reach this position"
        assert_matches(tokens, token_probabilities(probabilities[position]))
    assert any(len(run) < 3 for run in runs), "some drafts were rejected"
