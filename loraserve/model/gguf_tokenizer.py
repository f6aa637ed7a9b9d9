"""Rebuild a GGUF file's tokenizer from its metadata with the `tokenizers` library.

Only tokenizers we can rebuild exactly are accepted: byte-level BPE with a pre-tokenizer we know. Anything
else would encode text differently from the model's training, silently, so it is refused by name.
"""
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from loraserve.model.errors import ModelLoadError
from loraserve.model.tokenizer import Tokenizer

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

# llama.cpp's `tokenizer.ggml.pre` names -> how the text is split before BPE.
PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
}


def read_gguf_tokenizer(metadata: dict[str, Any], eos_token_ids: list[int]) -> Tokenizer:
    """The Tokenizer described by `tokenizer.*` metadata; stopping uses `eos_token_ids`."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    backend = byte_level_bpe(metadata)
    add_marked_tokens(backend, tokens, metadata["tokenizer.ggml.token_type"])
    bos_id, eos_id = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")
    bos_token = tokens[bos_id] if bos_id is not None else None
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos_token is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
        )
    eos_token = tokens[eos_id] if eos_id is not None else None
    return Tokenizer(backend, bos_token, eos_token, eos_token_ids, metadata.get("tokenizer.chat_template"))


def byte_level_bpe(metadata: dict[str, Any]) -> tokenizers.Tokenizer:
    """GPT-2-style BPE: vocabulary and merges as the file spells them, split by the named pre-tokenizer."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer model {model!r} is not supported; only 'gpt2' (byte-level BPE) is")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ModelLoadError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(PRE_TOKENIZERS)}")
    vocab = {token: index for index, token in enumerate(metadata["tokenizer.ggml.tokens"])}
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    return backend


def add_marked_tokens(backend: tokenizers.Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens become special; user-defined ones are matched whole but stay ordinary text."""
    typed = list(zip(tokens, token_types, strict=True))
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token, kind in typed
                                if kind == CONTROL])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token, kind in typed
                        if kind == USER_DEFINED])
