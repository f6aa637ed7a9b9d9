"""Submitting, merging and aborting the engine requests behind one HTTP request (with stand-in streams)."""
import asyncio

import pytest

from server.api.errors import GenerationAbortedError
from server.api.generation import Submission, submit
from server.engine.errors import QueueFullError
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams


def output(text: str, finished: bool = False, reason: str | None = None) -> RequestOutput:
    return RequestOutput("r", [1], text, [], finished, reason if finished else None, None, 3, 1)


class FakeStream:
    """Yields its outputs with a pause before each, so two streams interleave; counts aborts."""

    def __init__(self, outputs: list[RequestOutput], delay: float) -> None:
        self.outputs = list(outputs)
        self.delay = delay
        self.num_prompt_tokens = 3
        self.aborts = 0

    def __aiter__(self) -> "FakeStream":
        return self

    async def __anext__(self) -> RequestOutput:
        await asyncio.sleep(self.delay)
        if not self.outputs:
            raise StopAsyncIteration
        return self.outputs.pop(0)

    def abort(self) -> None:
        self.aborts += 1


class FakeEngine:
    """Accepts `capacity` requests, then refuses like a full queue."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.streams: list[FakeStream] = []

    def check_capacity(self, count: int) -> None:
        """The batch seems to fit when it arrives; others fill the queue while it is submitted."""

    def submit(self, prompt: list[int], params: SamplingParams, request_id: str, adapter: None) -> FakeStream:
        if len(self.streams) == self.capacity:
            raise QueueFullError("full")
        self.streams.append(FakeStream([output("a"), output("b", finished=True, reason="stop")], 0.001))
        return self.streams[-1]


def test_a_refused_submission_aborts_the_requests_already_in():
    engine = FakeEngine(capacity=2)
    with pytest.raises(QueueFullError):
        submit(engine, [[1], [2], [3]], [SamplingParams()] * 3, "id", None)
    assert [stream.aborts for stream in engine.streams] == [1, 1]


def test_outputs_of_all_requests_are_merged_and_collected_in_order():
    slow = FakeStream([output("s1"), output("s2", finished=True, reason="length")], 0.02)
    fast = FakeStream([output("f1"), output("f2"), output("f3", finished=True, reason="stop")], 0.001)
    generations = asyncio.run(Submission([slow, fast]).collect())
    assert [g.text for g in generations] == ["s1s2", "f1f2f3"]
    assert [g.finish_reason for g in generations] == ["length", "stop"]


def test_leaving_the_with_block_aborts_every_request():
    streams = [FakeStream([output("x")], 0.001) for _ in range(2)]
    with Submission(streams):
        pass
    assert [stream.aborts for stream in streams] == [1, 1]


def test_an_engine_abort_is_an_error_not_an_answer():
    stream = FakeStream([output("x"), output("", finished=True, reason="abort")], 0.001)
    with pytest.raises(GenerationAbortedError):
        asyncio.run(Submission([stream]).collect())
