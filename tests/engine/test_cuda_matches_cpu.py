"""The server's CUDA path (Triton kernels, CUDA graphs) gives the CPU reference path's greedy tokens on the
embedded model (GPU only)."""
import pytest
import torch

from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.errors import ModelLoadError
from loraserve.model.loader import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Explain what a GPU is in one sentence."]
NUM_TOKENS = 40


def greedy_answers(device: str) -> list[list[int]]:
    try:
        loaded = load_model("embedded", torch.device(device), torch.float32)
    except ModelLoadError as error:
        pytest.skip(str(error))
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]),
                                add_special_tokens=False) for question in QUESTIONS]
    engine = LLMEngine(loaded, ServerConfig(num_kv_blocks=256))
    return engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True))


def test_float32_greedy_tokens_match_the_cpu_path() -> None:
    assert greedy_answers("cuda") == greedy_answers("cpu")


def test_a_quantized_base_on_cuda_answers_as_the_cpu_kernel_does() -> None:
    """int4 on the GPU (Triton, float activations) and on the CPU (int16 activations): the same codes, so the same
    first tokens, and Paris."""
    answers = {}
    for device in ("cuda", "cpu"):
        loaded = load_model("embedded", torch.device(device), torch.float32, "int4")
        tokenizer = loaded.tokenizer
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}]),
                                  add_special_tokens=False)
        engine = LLMEngine(loaded, ServerConfig(num_kv_blocks=64))
        [answers[device]] = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))
    assert answers["cuda"][:8] == answers["cpu"][:8]
    assert "Paris" in tokenizer.decode(answers["cuda"])
