"""Grammars in the engine: masks for draft positions (checked against the grammar as it stands after the drafts
before them), answers that match at temperature 1, and greedy answers equal with and without speculation."""
import json

import llguidance
import pytest
import torch

from loraserve.engine.grammar import GrammarSpec, mask_logits
from loraserve.engine.sampling_params import SamplingParams
from tests.engine.helpers import run_staggered

CHOICES = ["alpha beta", "alpha gamma", "delta"]
SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 4}


def test_draft_rows_are_masked_after_the_drafts_before_them(make_engine) -> None:
    engine = make_engine()
    spec = GrammarSpec("choice", json.dumps(["ab", "cd"]))
    matcher = engine.grammars.matcher(spec)
    tokenizer = engine.tokenizer
    a, c = tokenizer.encode("a", add_special_tokens=False)[0], tokenizer.encode("c", add_special_tokens=False)[0]
    logits = torch.zeros(3, engine.model_config.vocab_size)
    masked = mask_logits(logits, [(matcher, [a, c], False)])  # "a" is allowed; "c" cannot follow it
    allowed = [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in masked]
    assert a in allowed[0] and c in allowed[0]
    assert c not in allowed[1]  # so verification rejects the second draft
    assert len(allowed[2]) == engine.model_config.vocab_size  # never drawn from: left open
    assert isinstance(matcher, llguidance.LLMatcher) and not matcher.is_error()
    assert set(torch.nonzero(mask_logits(logits[:1], [(matcher, [], False)])[0] > float("-inf")).flatten().tolist()) \
        == allowed[0]  # the drafts were given back


def test_a_greedy_row_is_masked_only_when_the_grammar_forbids_its_best_token(make_engine) -> None:
    """Masking cannot change a greedy choice the grammar allows, so such rows are spared their mask; step after
    step, the choices equal those made over fully masked rows."""
    engine = make_engine()
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    lazy, full = engine.grammars.matcher(spec), engine.grammars.matcher(spec)
    generator = torch.Generator().manual_seed(0)
    spared = masked = 0
    while not full.is_stopped():
        logits = torch.randn(1, engine.model_config.vocab_size, generator=generator)
        fully_masked = mask_logits(logits, [(full, [], False)])
        if spared + masked & 1:  # every other step the best token is one the grammar allows
            allowed = torch.nonzero(fully_masked[0] > float("-inf")).flatten()
            logits[0, allowed[torch.randint(len(allowed), (1,), generator=generator)]] = 10.0
            fully_masked = mask_logits(logits, [(full, [], False)])
        lazily_masked = mask_logits(logits, [(lazy, [], True)])
        spared, masked = spared + (lazily_masked is logits), masked + (lazily_masked is not logits)
        choice = int(fully_masked.argmax())
        assert int(lazily_masked.argmax()) == choice
        assert lazy.consume_token(choice) and full.consume_token(choice)
    assert spared >= 3 and masked >= 3 and lazy.is_stopped()


@pytest.mark.parametrize("spec", [GrammarSpec("choice", json.dumps(CHOICES)),
                                  GrammarSpec("json_schema", json.dumps(SCHEMA))], ids=["choice", "schema"])
def test_greedy_answers_are_equal_with_and_without_speculation(make_engine, spec) -> None:
    """Prompts that hold text the answers may copy, so prompt lookup drafts (some drafts the grammar forbids)."""
    texts = ['alpha beta alpha gamma delta alpha beta', '["the", "fox", "dog"] ["the", "lazy"]', 'delta ["dog"]']
    prompts = [make_engine().tokenizer.encode(text) for text in texts]
    params = SamplingParams(max_tokens=40, temperature=0.0, grammar=spec)
    plain = run_staggered(make_engine(), [(prompt, params) for prompt in prompts])
    speculating = make_engine(spec_tokens=4, spec_adaptive=False)  # every draft verified
    drafted = run_staggered(speculating, [(prompt, params) for prompt in prompts])
    assert drafted == plain
    assert speculating.metrics.spec_draft_tokens._value.get() > 0


def test_sampled_answers_match_the_grammar(make_engine) -> None:
    engine = make_engine(spec_tokens=3)
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=seed, grammar=spec) for seed in range(12)]
    outputs = run_staggered(engine, [([5, 17, 42, 9, 5, 17], request) for request in params])
    for tokens in outputs.values():
        value = json.loads(engine.tokenizer.decode(tokens))
        assert isinstance(value, list) and 2 <= len(value) <= 4 and all(len(item) <= 6 for item in value)
