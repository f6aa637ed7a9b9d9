"""Structured output: a request's grammar (a JSON schema, any JSON object, a regex, a choice of strings, or a Lark
grammar), enforced token by token with llguidance.

llguidance rather than xgrammar: it has no dependencies (xgrammar pulls transformers and triton into a plain
install), reads our `tokenizers` JSON directly, builds each step's token mask lazily from the parser's state (no
per-grammar precompilation over the vocabulary: a new schema costs about a millisecond), and rolls back, which
speculative decoding needs. vLLM serves it too (`guidance` backend). JSON is compact (no free whitespace): a small
model allowed free whitespace can spend its token budget on newlines.

A compiled grammar is cached by its spec; each request gets its own copy of the cached matcher. The API compiles
(validates) a request's grammar in a worker thread before submitting it, so the step thread only copies matchers.
"""
import json
import threading
from dataclasses import dataclass
from typing import Literal

import llguidance
import llguidance.torch as llguidance_torch
import torch

from loraserve.engine.errors import RequestValidationError
from loraserve.kernels.token_mask import apply_token_bitmask
from loraserve.model.tokenizer import Tokenizer

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]
JSON_OPTIONS = {"whitespace_flexible": False}
MAX_CACHED_GRAMMARS = 256


class GrammarError(RequestValidationError):
    """A grammar that cannot be compiled; the message says why, for a 400."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match: `source` is the schema as JSON text, the regex, the choices as a JSON
    list, or the Lark grammar (unused for `json_object`)."""

    kind: GrammarKind
    source: str = ""

    def llguidance_grammar(self) -> str:
        if self.kind in ("json_schema", "json_object"):
            schema = self.source if self.kind == "json_schema" else '{"type": "object"}'
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            choices = json.loads(self.source)
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        lark = llguidance.gbnf_to_lark(self.source) if "::=" in self.source else self.source  # GBNF, as xgrammar
        return llguidance.LLMatcher.grammar_from_lark(lark)


class GrammarCompiler:
    """Compiled grammars for one tokenizer, cached by spec (least recently compiled dropped past the limit)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._source = tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None  # made on first use (a quarter second)
        self._cache: dict[GrammarSpec, llguidance.LLMatcher] = {}
        self._lock = threading.Lock()

    def _llguidance_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(self._source.backend.to_str(), n_vocab=self.vocab_size,
                                                         eos_token=self._source.eos_token_ids[0])
            return self._tokenizer

    def compile(self, spec: GrammarSpec) -> None:
        """Compile and cache `spec`; raises GrammarError with the reason when it cannot be compiled."""
        with self._lock:
            if spec in self._cache:
                return
        try:
            grammar = spec.llguidance_grammar()
        except Exception as error:  # noqa: BLE001 - whatever llguidance's parsers raise, the grammar is at fault
            raise GrammarError(f"the {spec.kind} cannot be compiled: {error}") from error
        tokenizer = self._llguidance_tokenizer()
        problem = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if problem:
            raise GrammarError(f"the {spec.kind} cannot be compiled: {problem}")
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(f"the {spec.kind} cannot be compiled: {matcher.get_error()}")
        with self._lock:
            if len(self._cache) >= MAX_CACHED_GRAMMARS:
                del self._cache[next(iter(self._cache))]
            self._cache[spec] = matcher

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher for one request, at the grammar's start."""
        self.compile(spec)
        with self._lock:
            return self._cache[spec].deep_copy()


def mask_logits(logits: torch.Tensor, sequences: list[tuple[llguidance.LLMatcher | None, list[int], bool]]
                ) -> torch.Tensor:
    """`logits` with every token a row's grammar forbids at -inf (a copy if any row is masked; rows without a
    matcher unchanged).

    `sequences` holds each sequence's matcher (or None), draft tokens and whether it decodes greedily; a sequence
    has a row per draft and one after them. Row k is masked as the grammar stands after the first k drafts: the
    matcher takes them in turn and gives them back afterwards. Past a draft the grammar forbids, rows stay
    unmasked: verification rejects that draft (its row gives it no probability), so nothing is drawn from the rows
    after it. A greedy row whose best token the grammar allows is left unmasked, since masking cannot change its
    choice: checking one token costs about a microsecond, a row's mask a tenth of a millisecond or more."""
    if all(matcher is None for matcher, _, _ in sequences):
        return logits
    bitmask = llguidance_torch.allocate_token_bitmask(logits.shape[0], logits.shape[1])  # all allowed
    best = logits.argmax(dim=-1).tolist() if any(greedy for matcher, _, greedy in sequences if matcher) else []
    row, masked_any = 0, False
    for matcher, drafts, greedy in sequences:
        if matcher is not None:
            masked_any |= _fill_rows(matcher, drafts, bitmask, row, best if greedy else None)
        row += len(drafts) + 1
    if not masked_any:
        return logits
    masked = logits.clone()
    apply_token_bitmask(masked, bitmask)
    return masked


def _fill_rows(matcher: llguidance.LLMatcher, drafts: list[int], bitmask: torch.Tensor, first_row: int,
               best: list[int] | None) -> bool:
    """Fill the sequence's rows of the bitmask (a greedy sequence's `best` tokens, one per row, spare the rows
    whose best token is allowed); whether any row was filled."""
    taken, filled = 0, False
    for offset in range(len(drafts) + 1):
        row = first_row + offset
        if best is not None and matcher.validate_tokens([best[row]]) == 1:
            # Verification keeps the draft only if it is this row's best token, which the grammar allows.
            goes_on = offset < len(drafts) and drafts[offset] == best[row]
        else:
            llguidance_torch.fill_next_token_bitmask(matcher, bitmask, row)
            filled = True
            goes_on = offset < len(drafts) and _allowed(bitmask[row], drafts[offset])
        if not goes_on:
            break
        matcher.consume_token(drafts[offset])
        taken += 1
    if taken:
        matcher.rollback(taken)
    return filled


def _allowed(row: torch.Tensor, token: int) -> bool:
    return bool((int(row[token // 32]) >> (token % 32)) & 1)
