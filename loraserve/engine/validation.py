"""What the engine refuses before queueing a request: what could never run, with a message for the client."""
from loraserve.engine.errors import RequestValidationError
from loraserve.engine.sampling_params import SamplingParams


def validate_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                     num_virtual_tokens: int = 0) -> None:
    """Raises RequestValidationError for an empty or out-of-vocabulary prompt, one the context cannot hold with
    its max_tokens (after its adapter's virtual tokens, if any), stop tokens outside the vocabulary, and settings
    that contradict each other."""
    if not prompt_token_ids:
        raise RequestValidationError("the prompt is empty")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise RequestValidationError(f"prompt token ids must lie in [0, {vocab_size})")
    virtual = f" after the adapter's {num_virtual_tokens} virtual tokens" if num_virtual_tokens else ""
    if num_virtual_tokens + len(prompt_token_ids) >= max_model_len:
        raise RequestValidationError(
            f"the prompt has {len(prompt_token_ids)} tokens{virtual}; this model's context holds {max_model_len}")
    if any(not 0 <= token < vocab_size for token in params.stop_token_ids):
        raise RequestValidationError(f"stop_token_ids must lie in [0, {vocab_size})")
    if params.grammar is not None and params.ignore_eos:
        raise RequestValidationError("ignore_eos cannot be combined with structured output: the grammar says where "
                                     "the output ends")
    if params.max_tokens < 0:
        raise RequestValidationError("max_tokens must be at least 0 (0: score the prompt only)")
    if num_virtual_tokens + len(prompt_token_ids) + params.max_tokens > max_model_len:
        raise RequestValidationError(
            f"the prompt ({len(prompt_token_ids)} tokens{virtual}) plus max_tokens ({params.max_tokens}) exceeds "
            f"this model's context of {max_model_len} tokens")
