import torch

from loraserve.engine.sampler import draw, sample
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.sequence import Sequence

VOCAB = 32


def make_sequence(params: SamplingParams, tokens=(1, 2, 3), prompt_length=2, seed=0) -> Sequence:
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else seed)
    return Sequence("r", list(tokens), prompt_length, params, generator)


def sampled_tokens(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """The one token each draft-free sequence gets."""
    results = sample(logits, sequences)
    assert all(len(result.token_ids) == 1 for result in results)
    return [result.token_ids[0] for result in results]


def test_greedy_is_argmax_and_logprobs_match_log_softmax():
    logits = torch.randn(3, VOCAB)
    sequences = [make_sequence(SamplingParams(temperature=0.0, logprobs=3)) for _ in range(3)]
    results = sample(logits, sequences)
    tokens = [result.token_ids[0] for result in results]
    assert tokens == logits.argmax(-1).tolist()
    reference = logits.double().log_softmax(-1)
    for row, entry in enumerate(result.logprobs[0] for result in results):
        assert abs(entry.logprob - reference[row, tokens[row]].item()) < 1e-5
        top_ids = [token for token, _ in entry.top]
        assert top_ids == reference[row].topk(3).indices.tolist()


def test_seeded_draws_do_not_depend_on_the_rest_of_the_batch():
    logits = torch.randn(4, VOCAB)
    params = SamplingParams(temperature=1.0, seed=1234)

    def first_row_tokens(batch_size: int) -> list[int]:
        sequences = [make_sequence(params)] + [make_sequence(SamplingParams(), seed=s) for s in range(batch_size - 1)]
        return [sampled_tokens(logits[:batch_size].clone(), sequences)[0] for _ in range(10)]

    assert first_row_tokens(1) == first_row_tokens(4)


def test_sampling_frequencies_follow_the_tempered_distribution():
    logits = torch.randn(1, 6)
    params = SamplingParams(temperature=0.7)
    sequence = make_sequence(params)
    draws = 6000
    counts = torch.zeros(6)
    for _ in range(draws):
        counts[sampled_tokens(logits.clone(), [sequence])[0]] += 1
    expected = (logits[0] / 0.7).softmax(-1)
    total_variation = 0.5 * (counts / draws - expected).abs().sum().item()
    assert total_variation < 0.03


def test_a_draw_follows_the_weights_and_never_takes_a_weightless_token():
    """Three weighted tokens among 50,000 zeros are drawn in proportion and the zeros never; a share of 1e-9 is
    about never drawn; weights that are not finite still give a token of the vocabulary."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.zeros(50_000)
    weights[[3, 17, 49_999]] = torch.tensor([1.0, 3.0, 6.0])
    counts = torch.bincount(torch.stack([draw(weights, generator) for _ in range(20_000)]), minlength=50_000)
    assert counts.nonzero().flatten().tolist() == [3, 17, 49_999]
    assert torch.allclose(counts[[3, 17, 49_999]] / 20_000, torch.tensor([0.1, 0.3, 0.6]), atol=0.015)
    rare = torch.tensor([1.0, 1e-9]).double()
    assert sum(int(draw(rare, generator)) for _ in range(2000)) <= 1
    assert 0 <= int(draw(torch.full((8,), float("nan")), generator)) < 8


def test_top_k_top_p_and_min_p_never_draw_outside_their_set():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    cases = [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.8), {0, 1}),  # probabilities ~0.64, 0.23, 0.09, ...
        (SamplingParams(min_p=0.3), {0, 1}),  # 0.23 / 0.64 > 0.3; 0.09 / 0.64 < 0.3
        (SamplingParams(top_k=1, temperature=1.5), {0}),
        (SamplingParams(top_k=2, top_p=0.7), {0}),  # top-p judges top-k's renormalised pick: 0.73, 0.27
    ]
    for params, allowed in cases:
        sequence = make_sequence(params)
        drawn = {sampled_tokens(logits.clone(), [sequence])[0] for _ in range(300)}
        assert drawn == allowed, params


def test_a_top_p_that_rounds_to_zero_keeps_the_top_token():
    """5e-324 passes validation (> 0) but is 0 in float32: the top token still stays (not token 0, as an
    all-masked row's NaN would give)."""
    logits = torch.tensor([[0.0, 4.0, 3.0, 1.0]])
    sequence = make_sequence(SamplingParams(top_p=5e-324))
    assert {sampled_tokens(logits.clone(), [sequence])[0] for _ in range(50)} == {1}


def test_penalties_push_away_from_seen_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 1.0
    logits[0, 4] = 0.9
    repeated = make_sequence(SamplingParams(temperature=0.0, repetition_penalty=2.0), tokens=(3, 3), prompt_length=1)
    assert sampled_tokens(logits.clone(), [repeated]) == [4]
    present = make_sequence(SamplingParams(temperature=0.0, presence_penalty=0.5), tokens=(7, 3), prompt_length=1)
    assert sampled_tokens(logits.clone(), [present]) == [4]
    in_prompt_only = make_sequence(SamplingParams(temperature=0.0, frequency_penalty=2.0), tokens=(3, 5),
                                   prompt_length=1)
    assert sampled_tokens(logits.clone(), [in_prompt_only]) == [3]  # OpenAI penalties count output tokens only


def test_each_draft_position_is_penalised_as_if_the_drafts_before_it_were_accepted():
    logits = torch.zeros(3, VOCAB)
    logits[0, 5] = 1.0  # the first draft, 5, is the argmax: accepted
    logits[1, 5], logits[1, 6] = 1.0, 0.9  # 5 again, unless penalised for the accepted 5 before it
    sequence = make_sequence(SamplingParams(temperature=0.0, repetition_penalty=2.0), tokens=(1, 2, 3))
    sequence.draft_token_ids = [5, 5]
    (result,) = sample(logits, [sequence])
    assert result.token_ids == [5, 6]  # the second draft rejected; the target's 6 in its place
    assert (result.num_drafts, result.num_accepted) == (2, 1)


def test_logits_sent_to_infinity_share_the_distribution_and_never_draw_a_masked_token():
    """Found by the schemathesis fuzz: a repetition penalty of 5e-324 sends a seen token's positive logit to +inf;
    its softmax was NaN, and the draw fell on the last token, which the grammar had masked (a 500)."""
    from loraserve.engine.sampler import truncate_distribution

    logits = torch.tensor([[0.5, 2.0, -1.0, 3.0, float("-inf")]])
    logits[0, [1, 3]] /= 5e-324  # the penalised seen tokens: +inf
    for top_p in (1.0, 5e-324):
        probabilities = truncate_distribution(logits, [SamplingParams(temperature=1.0, top_p=top_p)]).softmax(dim=-1)
        assert torch.isfinite(probabilities).all() and probabilities[0, 4] == 0
        generator = torch.Generator().manual_seed(0)
        assert {int(draw(probabilities[0], generator)) for _ in range(50)} <= {1, 3}
