"""Submitting, merging and aborting the engine requests behind one HTTP request (with stand-in streams)."""
import asyncio

import pytest

from loraserve.api.errors import GenerationAbortedError
from loraserve.api.generation import Submission, submit
from loraserve.engine.async_engine import RequestStream
from loraserve.engine.errors import QueueFullError, RequestFailedError
from loraserve.engine.outputs import RequestOutput
from loraserve.engine.sampling_params import SamplingParams


def output(text: str, finished: bool = False, reason: str | None = None) -> RequestOutput:
    return RequestOutput("r", [1], text, [], finished, reason if finished else None, None, 3, 1)


class FakeEngine:
    """Accepts `capacity` requests, then refuses like a full queue; records aborts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.streams: list[RequestStream] = []
        self.aborted: list[str] = []

    def check_capacity(self, count: int) -> None:
        """The batch seems to fit when it arrives; others fill the queue while it is submitted."""

    def submit(self, prompt: list[int], params: SamplingParams, request_id: str, adapter: None,
               outputs: asyncio.Queue, index: int) -> RequestStream:
        if len(self.streams) == self.capacity:
            raise QueueFullError("full")
        self.streams.append(RequestStream(request_id, 3, self.aborted.append, outputs, index))
        return self.streams[-1]


def submission_with(outputs: list[tuple[int, RequestOutput | Exception]], num_streams: int) -> Submission:
    queue: asyncio.Queue = asyncio.Queue()
    for item in outputs:
        queue.put_nowait(item)
    return Submission([RequestStream(f"r{index}", 3, lambda _: None, queue, index) for index in range(num_streams)],
                      queue)


def test_a_refused_submission_aborts_the_requests_already_in():
    engine = FakeEngine(capacity=2)
    with pytest.raises(QueueFullError):
        submit(engine, [[1], [2], [3]], [SamplingParams()] * 3, "id", None)
    assert engine.aborted == ["id-0", "id-1"]


def test_outputs_of_all_requests_are_merged_and_collected_in_order():
    interleaved = [(1, output("f1")), (0, output("s1")), (1, output("f2")), (0, output("s2", True, "length")),
                   (1, output("f3", True, "stop"))]
    generations = asyncio.run(submission_with(interleaved, 2).collect())
    assert [g.text for g in generations] == ["s1s2", "f1f2f3"]
    assert [g.finish_reason for g in generations] == ["length", "stop"]


def test_leaving_the_with_block_aborts_the_requests_still_running():
    engine = FakeEngine(capacity=3)
    with submit(engine, [[1], [2], [3]], [SamplingParams()] * 3, "id", None):
        engine.streams[1].put(output("done", True, "stop"))
    assert engine.aborted == ["id-0", "id-2"]


def test_an_engine_abort_is_an_error_not_an_answer():
    with pytest.raises(GenerationAbortedError):
        asyncio.run(submission_with([(0, output("x")), (0, output("", True, "abort"))], 1).collect())


def test_a_failed_request_raises_its_error():
    with pytest.raises(RequestFailedError):
        asyncio.run(submission_with([(1, output("x")), (0, RequestFailedError("failed"))], 2).collect())
