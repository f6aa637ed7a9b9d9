"""Tool calls read out of a chat answer's text as it streams, in OpenAI's delta shape.

One reader per choice takes the text of each engine output (`feed`) and its end (`finish`) and returns deltas:
`{"content": ...}`, a call's opening `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments":
""}}]}`, and its arguments as they come `{"tool_calls": [{"index", "function": {"arguments": ...}}]}`. A whole
answer is the same reader over its whole text (`read_message`), so streamed and whole answers always agree.

Readers: plain text (no tools); a named function's forced call (the text is its arguments); the array `required`
forces (`[{"name": ..., "parameters": {...}}, ...]`, arguments streamed as the model writes them); and Hermes-style
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks between free text under `auto`, each call given
once its block closes (a block that is not a call stays text).
"""
import json
import re
import uuid
from typing import Any, Protocol

from loraserve.api.tool_schema import HERMES_CLOSE, HERMES_OPEN, ToolMode

# The opening of one call in the array `required` forces, up to its arguments (whitespace allowed anywhere).
CALL_OPENING = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:\s*')


class CallReader(Protocol):
    called: bool  # whether the text held a tool call (the answer then finishes with "tool_calls")

    def feed(self, text: str) -> list[dict]: ...

    def finish(self) -> list[dict]: ...


def reader_for(mode: ToolMode, function_name: str | None = None) -> CallReader:
    """The reader of a choice's text under a request's tool mode (`auto` reads the Hermes format)."""
    if mode == "named":
        return NamedCallReader(function_name)
    if mode == "required":
        return RequiredCallsReader()
    return HermesReader() if mode == "auto" else PlainReader()


def read_message(reader: CallReader, text: str) -> dict[str, Any]:
    """The assistant message a whole text makes: content (None when tool calls leave none) and tool calls."""
    deltas = reader.feed(text) + reader.finish()
    content = "".join(delta.get("content", "") for delta in deltas)
    calls: list[dict] = []
    for delta in deltas:
        for part in delta.get("tool_calls", []):
            if part["index"] == len(calls):
                calls.append({"id": part["id"], "type": "function", "function": dict(part["function"])})
            else:
                calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    if not calls:
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": content.strip() or None, "tool_calls": calls}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallDeltas:
    """Numbers a choice's calls and writes their deltas."""

    def __init__(self) -> None:
        self.count = 0

    @property
    def called(self) -> bool:
        return self.count > 0

    def opening(self, name: str, arguments: str = "") -> dict:
        self.count += 1
        function = {"name": name, "arguments": arguments}
        return {"tool_calls": [{"index": self.count - 1, "id": call_id(), "type": "function", "function": function}]}

    def arguments(self, text: str) -> dict:
        return {"tool_calls": [{"index": self.count - 1, "function": {"arguments": text}}]}


class PlainReader:
    called = False

    def feed(self, text: str) -> list[dict]:
        return [{"content": text}] if text else []

    def finish(self) -> list[dict]:
        return []


class NamedCallReader(CallDeltas):
    """The grammar made the whole text the named function's arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def feed(self, text: str) -> list[dict]:
        if not self.called:
            return [self.opening(self.name, text)]
        return [self.arguments(text)] if text else []

    def finish(self) -> list[dict]:
        return [] if self.called else [self.opening(self.name)]


class RequiredCallsReader(CallDeltas):
    """The array of calls: each call's opening once its name is read, then its arguments character by character
    up to the end of the JSON value (strings and nesting tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = ""  # text not yet placed: between calls, or a call's opening still incomplete
        self.in_arguments = False
        self.depth = 0  # brackets open in the current arguments
        self.in_string = self.escaped = False

    def feed(self, text: str) -> list[dict]:
        deltas: list[dict] = []
        while text:
            if self.in_arguments:
                taken, text = self._take_arguments(text)
                if taken:
                    deltas.append(self.arguments(taken))
                continue
            self.pending += text
            text = ""
            opening = CALL_OPENING.search(self.pending)
            if opening is not None:
                deltas.append(self.opening(json.loads(opening[1])))
                text, self.pending, self.in_arguments = self.pending[opening.end():], "", True
        return deltas

    def _take_arguments(self, text: str) -> tuple[str, str]:
        """The part of `text` that belongs to the current arguments value, and the rest."""
        for position, character in enumerate(text):
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (character == "\\",
                                                                                    character != '"')
            elif character == '"':
                self.in_string = True
            elif character in "{[":
                self.depth += 1
            elif character in "}]":
                self.depth -= 1
            if self.depth == 0 and not self.in_string and not character.isspace():
                self.in_arguments = False
                return text[:position + 1], text[position + 1:]
        return text, ""

    def finish(self) -> list[dict]:
        return []


class HermesReader(CallDeltas):
    """Free text with `<tool_call>` blocks. Text that may be the start of a block, or whitespace that may only
    separate blocks, is held until the next text settles it."""

    def __init__(self) -> None:
        super().__init__()
        self.held = ""  # content not yet given out
        self.block: str | None = None  # inside a block: its text so far

    def feed(self, text: str) -> list[dict]:
        deltas: list[dict] = []
        while text:
            if self.block is None:
                self.held += text
                start = self.held.find(HERMES_OPEN)
                if start < 0:
                    return deltas + self._release(keep=_partial_suffix(self.held, HERMES_OPEN))
                text = self.held[start + len(HERMES_OPEN):]
                deltas += self._release(keep=len(self.held) - start)
                self.held, self.block = "", ""
            else:
                self.block += text
                end = self.block.find(HERMES_CLOSE)
                if end < 0:
                    return deltas
                text = self.block[end + len(HERMES_CLOSE):]
                deltas += self._close(self.block[:end])
        return deltas

    def finish(self) -> list[dict]:
        if self.block is not None:  # cut off inside a block: a call if its JSON is whole
            return self._close(self.block, closed=False)
        if self.called and not self.held.strip():
            return []
        text, self.held = self.held, ""
        return [{"content": text}] if text else []

    def _release(self, keep: int) -> list[dict]:
        """Give out the held text but its last `keep` characters; whitespace alone waits for what follows."""
        ready = self.held[:len(self.held) - keep]
        if not ready.strip():
            return []
        self.held = self.held[len(ready):]
        return [{"content": ready}]

    def _close(self, block: str, closed: bool = True) -> list[dict]:
        self.block = None
        call = _hermes_call(block)
        if call is None:
            raw = HERMES_OPEN + block + (HERMES_CLOSE if closed else "")
            text, self.held = self.held + raw, ""
            return [{"content": text}]
        self.held = ""  # whitespace before the block
        name, arguments = call
        return [self.opening(name, json.dumps(arguments, ensure_ascii=False))]


def _hermes_call(block: str) -> tuple[str, Any] | None:
    """(name, arguments) of a block holding {"name": ..., "arguments": ...}; None if it holds anything else."""
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return call["name"], call.get("arguments", call.get("parameters", {}))


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0
