"""Text to token ids and back, plus chat template rendering, over a `tokenizers.Tokenizer`."""
import json
from datetime import datetime
from typing import Any

import jinja2
import tokenizers
from jinja2 import meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loraserve.model.errors import ChatTemplateError, InvalidTextError, TextTooLongError

# A text is tokenized a prefix at a time, the first of this many characters per allowed token, each next one four
# times as long; a prefix holding more than twice the allowed tokens (and some slack for the word it cuts) already
# proves the whole text too long. A 10 MB prompt is refused after tokenizing a few kilobytes of it.
FIRST_PREFIX_CHARS_PER_TOKEN = 16


class Tokenizer:
    """The one tokenizer the server uses, whichever format the model came in.

    Whether `encode` adds BOS is the backend's post-processor's business, as in transformers: a GGUF loader
    installs one when the file says `add_bos_token`. Encode a rendered chat prompt with
    `add_special_tokens=False`, since templates write their own BOS.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: list[int],
        chat_template: str | None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_ids = eos_token_ids
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = {index for index, token in backend.get_added_tokens_decoder().items() if token.special}
        self.chat_template = chat_template
        self.compiled_template = compile_chat_template(chat_template) if chat_template is not None else None
        self.tool_call_format = tool_call_format(chat_template) if chat_template is not None else None

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """Token ids of `text`. With `max_tokens`, a text far longer than that raises TextTooLongError having
        tokenized only a prefix of it (a text a little longer is returned whole, for the caller to refuse)."""
        require_unicode(text)
        if max_tokens is not None:
            self._refuse_far_longer(text, max_tokens)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def _refuse_far_longer(self, text: str, max_tokens: int) -> None:
        limit = 2 * max_tokens + 64
        length = FIRST_PREFIX_CHARS_PER_TOKEN * max_tokens
        while length < len(text):
            if len(self.backend.encode(text[:length], add_special_tokens=False).ids) > limit:
                raise TextTooLongError(f"the text holds more than {limit} tokens; at most {max_tokens} fit")
            length *= 4

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """What this one token reads as on its own (a partial UTF-8 character shows as U+FFFD)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render messages (and the tools the model may call, for templates that show them) to the prompt text
        the model was trained on."""
        if self.compiled_template is None:
            raise ChatTemplateError("this model has no chat template; send a plain completion prompt instead")
        try:
            return self.compiled_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template failed: {error}") from error


def require_unicode(text: str) -> None:
    """JSON can carry a lone surrogate (an escaped half of a pair), which no encoder can turn into bytes."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidTextError(f"the text is not valid Unicode: a lone surrogate U+{ord(text[error.start]):04X} "
                               f"at character {error.start}") from None


def compile_chat_template(source: str) -> jinja2.Template:
    """A sandbox with the helpers Hub templates expect, and the whitespace rules they are written for."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.globals["raise_exception"] = raise_template_error
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    environment.filters["tojson"] = template_json
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"chat template does not compile: {error}") from error


def tool_call_format(source: str) -> str | None:
    """The format a template teaches the model to call tools in, when it shows the model its tools and the format
    is one the server reads: "hermes" (`<tool_call>` JSON blocks, as Qwen and Hermes models write), else None."""
    variables = meta.find_undeclared_variables(ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(source))
    return "hermes" if "tools" in variables and "<tool_call>" in source else None


def raise_template_error(message: str) -> None:
    """Templates call `raise_exception` to reject a conversation (say, roles out of order)."""
    raise jinja2.TemplateError(message)


def template_json(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    """Jinja's own `tojson` escapes HTML characters, which would change the prompt."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
