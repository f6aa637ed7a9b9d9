"""Medusa heads in the engine: each draft is the heads' guess from the hidden state of the position that gave the
request's last token (checked against Hugging Face's hidden states), outputs stay those of plain decoding under
preemption and aborts with nothing left held, an adapter's own heads propose for its requests beside the base
heads, and a server refuses heads it cannot use at start-up."""
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks.train_medusa import save_medusa_heads
from loraserve.adapters.medusa_format import load_medusa_heads
from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import LoadedModel, load_model
from loraserve.model.medusa import medusa_logits
from tests.api.lora_helpers import save_random_adapter
from tests.engine.medusa_helpers import train_tiny_heads
from tests.engine import test_speculative
from tests.engine.test_speculative import PROMPTS, save_looping_llama

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
TIE_MARGIN = 1e-3  # float32 and float64 must agree on a head's top token


# The looping target of the speculative-decoding tests, whose prompts it answers.
model_dir, target = test_speculative.model_dir, test_speculative.target


@pytest.fixture(scope="module")
def heads_dir(target: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_heads(target, PROMPTS, tmp_path_factory.mktemp("medusa"))


def medusa_engine(target: LoadedModel, heads_dir: Path, **settings) -> LLMEngine:
    config = ServerConfig(**{"block_size": 4, "num_kv_blocks": 1024, "spec_tokens": 4,
                             "medusa_heads": str(heads_dir), "spec_adaptive": False, **settings})
    return LLMEngine(target, config)


def test_drafts_are_the_heads_guesses_from_the_last_tokens_hidden_state(target, model_dir, heads_dir):
    """Every proposal, including those after accepted runs (where the row to read is the last accepted one), is
    the heads' top tokens at Hugging Face's final hidden state of the position before the last token."""
    engine = medusa_engine(target, heads_dir)
    proposals: list[tuple[list[int], list[int]]] = []
    propose = engine.speculation.proposer.propose

    def recording(sequences, limits):
        propose(sequences, limits)
        proposals.extend((list(sequence.token_ids), list(sequence.draft_token_ids)) for sequence in sequences)

    engine.speculation.proposer.propose = recording
    engine.generate(PROMPTS[:3], GREEDY)
    accepted = engine.metrics.spec_accepted_tokens._value.get()
    assert accepted > 0.3 * engine.metrics.spec_draft_tokens._value.get(), "trained heads should guess well"
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    heads = load_medusa_heads(heads_dir, target.config.hidden_size, target.config.vocab_size)
    head_weight = reference.lm_head.weight.detach()
    compared = 0
    for tokens, drafts in proposals:
        assert drafts, "a request decoding had a fresh hidden state"
        with torch.no_grad():
            hidden = reference.model(torch.tensor([tokens[:-1]])).last_hidden_state[0, -1:]
            logits = medusa_logits(hidden, heads.block_weights.double(), heads.block_biases.double(), None,
                                   lambda states: states @ head_weight.T)[0, :len(drafts)]
        top_two = logits.topk(2, dim=-1).values
        clear = (top_two[:, 0] - top_two[:, 1] > TIE_MARGIN).tolist()
        expected = logits.argmax(dim=-1).tolist()
        assert [d for d, ok in zip(drafts, clear) if ok] == [e for e, ok in zip(expected, clear) if ok]
        compared += sum(clear)
    assert compared > 100


def test_outputs_equal_plain_decoding_under_preemption_and_aborts(target, heads_dir):
    """A cache too small for the batch preempts requests mid-speculation; aborted requests and finished ones
    leave no block, and the others answer as without speculation."""
    prompts = PROMPTS * 3
    expected = LLMEngine(target, ServerConfig(block_size=4, num_kv_blocks=1024)).generate(prompts, GREEDY)
    engine = medusa_engine(target, heads_dir, num_kv_blocks=48)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, GREEDY)
    outputs: dict[str, list[int]] = {str(index): [] for index in range(len(prompts))}
    aborted = set()
    for step in range(400):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            outputs[output.request_id] += output.token_ids
        if step in (6, 15) and engine.scheduler.running:
            victim = engine.scheduler.running[-1].request_id
            engine.abort_request(victim)
            aborted.add(victim)
    assert not engine.has_unfinished_requests()
    assert engine.metrics.preemptions._value.get() > 0 and len(aborted) == 2
    for index, tokens in enumerate(expected):
        if str(index) not in aborted:
            assert outputs[str(index)] == tokens
    assert engine.metrics.spec_accepted_tokens._value.get() > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.sequences


def test_sampled_requests_are_verified_against_the_heads_point_mass(target, heads_dir):
    """Drafts are guesses, not draws: sampled requests verify them as a point mass (no q kept)."""
    engine = medusa_engine(target, heads_dir)
    params = dataclasses.replace(GREEDY, temperature=0.7, seed=3)
    engine.add_request("r", PROMPTS[0], params)
    engine.step()
    engine.step()
    sequence = engine.sequences["r"]
    engine.speculation.propose(engine.scheduler.running)
    assert sequence.draft_token_ids and sequence.draft_probabilities is None


def test_heads_a_server_cannot_use_are_refused_at_start_up(target, heads_dir, tmp_path):
    with pytest.raises(ValueError, match="Medusa heads needs --spec-tokens"):
        medusa_engine(target, heads_dir, spec_tokens=0)
    with pytest.raises(ValueError, match="--spec-tokens 5 asks for more drafts than the 4 Medusa heads"):
        medusa_engine(target, heads_dir, spec_tokens=5)
    with pytest.raises(ValueError, match="choose one"):
        LLMEngine(target, ServerConfig(block_size=4, num_kv_blocks=64, spec_tokens=2, medusa_heads=str(heads_dir)),
                  draft=target)
    other = save_looping_llama(tmp_path / "wide", seed=1, hidden_size=96)
    wide = load_model(str(other), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=rf"--medusa-heads {heads_dir}: .*expected \[96, 96\]"):
        medusa_engine(wide, heads_dir)
    broken = shutil.copytree(heads_dir, tmp_path / "broken")
    (broken / "config.json").unlink()
    with pytest.raises(ValueError, match="need config.json"):
        medusa_engine(target, broken)


def save_fixed_guess_heads(directory: Path, target: LoadedModel, token: int, num_heads: int = 4) -> Path:
    """Heads in Medusa-1's layout that always guess `token`: a large constant block output along a direction only
    `token`'s projection row reads."""
    width, vocab = target.config.hidden_size, target.config.vocab_size
    direction = torch.nn.functional.normalize(torch.randn(width, generator=torch.Generator().manual_seed(4)), dim=0)
    projections = torch.zeros(num_heads, vocab, width)
    projections[:, token] = direction
    return save_medusa_heads(directory, torch.zeros(num_heads, 1, width, width),
                             (100 * direction).expand(num_heads, 1, width).clone(), projections)


def test_an_adapters_own_heads_propose_for_its_requests_beside_the_base_heads(target, model_dir, heads_dir,
                                                                             tmp_path):
    """One batch: base requests and those of an adapter without heads draft with the base heads, those of an
    adapter that brought heads (LoRAX's layout: its files beside the PEFT ones) with its own; every answer equals
    plain decoding's."""
    own = save_random_adapter(model_dir, tmp_path / "own", seed=1, rank=4)
    save_fixed_guess_heads(own, target, token=7)
    plain_adapter = save_random_adapter(model_dir, tmp_path / "plain", seed=2, rank=4)
    config = dict(block_size=4, num_kv_blocks=1024, max_loras=2, max_lora_rank=64)  # room for the heads' pages
    plain = LLMEngine(target, ServerConfig(**config, adapter_dir=str(tmp_path / "a")))
    engine = medusa_engine(target, heads_dir, **config, adapter_dir=str(tmp_path / "b"))
    for each in (plain, engine):
        each.adapters.add_from_path("own", own)
        each.adapters.add_from_path("plain", plain_adapter)
    assert engine.adapters.record("own").num_medusa_heads == 4
    assert engine.adapters.record("plain").num_medusa_heads == 0
    names = [None, "own", "plain"] * 2
    proposals: dict[str | None, list[list[int]]] = {name: [] for name in names}
    propose = engine.speculation.proposer.propose

    def recording(sequences, limits):
        propose(sequences, limits)
        for sequence in sequences:
            proposals[sequence.adapter.name if sequence.adapter else None].append(list(sequence.draft_token_ids))

    engine.speculation.proposer.propose = recording
    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(len(names))]
    expected = plain.generate(prompts, GREEDY, [plain.adapters.resolve(name) if name else None for name in names])
    assert engine.generate(prompts, GREEDY, [engine.adapters.resolve(name) if name else None
                                             for name in names]) == expected
    assert all(drafts == [7] * len(drafts) for drafts in proposals["own"]) and proposals["own"]
    for name in (None, "plain"):
        assert sum(drafts != [7] * len(drafts) for drafts in proposals[name]) > len(proposals[name]) // 2
    assert sum(heads is not None for heads in engine.speculation.proposer.adapter_heads) == 1  # the slot "own" sits in
    assert engine.adapters.num_references() == 0 and engine.adapters.num_pins() == 0
