"""Incremental detokenization and the stop conditions of a request (EOS, stop tokens, stop strings, lengths)."""
from loraserve.engine.sequence import Sequence
from loraserve.model.tokenizer import Tokenizer


def decode_new_text(sequence: Sequence, tokenizer: Tokenizer) -> None:
    """Extend the sequence's output text with what its newest token completes.

    Only a window from `prefix_offset` is decoded; text is added once it no longer ends in an incomplete
    UTF-8 character (which decodes to U+FFFD).
    """
    state = sequence.detokenizer
    output = sequence.output_token_ids
    prefix_text = tokenizer.decode(output[state.prefix_offset:state.read_offset])
    full_text = tokenizer.decode(output[state.prefix_offset:])
    if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
        state.text += full_text[len(prefix_text):]
        state.prefix_offset = state.read_offset
        state.read_offset = len(output)


def held_back_length(text: str, stop_strings: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string: not reported yet."""
    longest = 0
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class StopChecker:
    """Decides after each new token whether a request is done, and why."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = set(tokenizer.eos_token_ids)

    def check(self, sequence: Sequence) -> tuple[str, str | int | None] | None:
        """Update the sequence's text; return (finish_reason, stop_reason) if it should stop, else None."""
        params = sequence.params
        token = sequence.token_ids[-1]
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop", token
        if token in params.stop_token_ids:
            return "stop", token
        decode_new_text(sequence, self.tokenizer)
        if params.stop:
            stop = self._find_stop_string(sequence)
            if stop is not None:
                return "stop", stop
        if sequence.num_output_tokens >= params.max_tokens or sequence.num_tokens >= self.max_model_len:
            return "length", None
        return None

    def _find_stop_string(self, sequence: Sequence) -> str | None:
        """Cut the text at the first stop string that appeared with the newest token."""
        state = sequence.detokenizer
        longest = max(len(stop) for stop in sequence.params.stop)
        search_from = max(0, state.sent_length - longest)
        found = [(index, stop) for stop in sequence.params.stop
                 if (index := state.text.find(stop, search_from)) != -1]
        if not found:
            return None
        index, stop = min(found)
        state.text = state.text[:index]
        return stop

    def take_new_text(self, sequence: Sequence) -> str:
        """Text not yet reported; while running, a tail that may begin a stop string is held back."""
        state = sequence.detokenizer
        end = len(state.text)
        if not sequence.finished:
            end -= held_back_length(state.text, sequence.params.stop)
        end = max(end, state.sent_length)
        new_text = state.text[state.sent_length:end]
        state.sent_length = end
        return new_text
