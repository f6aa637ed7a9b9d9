import asyncio

import pytest

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.errors import QueueFullError, ShuttingDownError
from loraserve.engine.sampling_params import SamplingParams


async def collect(stream) -> list[int]:
    tokens = []
    async for output in stream:
        tokens.extend(output.token_ids)
    return tokens


def test_concurrent_streams_get_their_own_tokens(make_engine):
    prompts = [list(range(3, 3 + length)) for length in (4, 19, 7, 31)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = [make_engine().generate([prompt], params)[0] for prompt in prompts]

    async def scenario() -> list[list[int]]:
        engine = AsyncEngine(make_engine(max_num_batched_tokens=16), "tiny", max_queue=8)
        await engine.start()
        try:
            streams = []
            for prompt in prompts:  # arrivals spread over the first steps
                streams.append(engine.submit(prompt, params))
                await asyncio.sleep(0.01)
            return await asyncio.gather(*(collect(stream) for stream in streams))
        finally:
            await engine.shutdown()

    assert asyncio.run(scenario()) == expected


def test_abort_mid_stream_returns_every_block(make_engine):
    async def scenario() -> tuple[int, int]:
        engine = AsyncEngine(make_engine(), "tiny", max_queue=8)
        await engine.start()
        try:
            stream = engine.submit(list(range(3, 40)), SamplingParams(max_tokens=200, ignore_eos=True))
            await anext(stream)
            stream.abort()
            for _ in range(100):
                await asyncio.sleep(0.01)
                stats = engine.stats()
                if stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks:
                    break
            return stats.num_free_blocks, stats.num_total_blocks
        finally:
            await engine.shutdown()

    free, total = asyncio.run(scenario())
    assert free == total


def test_full_queue_refuses_at_once(make_engine):
    async def scenario() -> None:
        engine = AsyncEngine(make_engine(), "tiny", max_queue=2)  # not started: nothing leaves the queue
        engine.submit([5, 6], SamplingParams(max_tokens=2))
        engine.submit([5, 6], SamplingParams(max_tokens=2))
        with pytest.raises(QueueFullError):
            engine.submit([5, 6], SamplingParams(max_tokens=2))

    asyncio.run(scenario())


def test_drain_refuses_new_requests_and_stops_those_still_running(make_engine):
    async def scenario() -> tuple[list[int], int, int]:
        engine = AsyncEngine(make_engine(), "tiny", max_queue=8)
        await engine.start()
        try:
            short = engine.submit(list(range(3, 10)), SamplingParams(max_tokens=2, ignore_eos=True))
            long = engine.submit(list(range(3, 40)), SamplingParams(max_tokens=450, ignore_eos=True))
            short_tokens = await collect(short)
            await engine.drain(timeout=0.01)  # far less than 450 steps take
            with pytest.raises(ShuttingDownError):
                engine.submit(list(range(3, 10)), SamplingParams(max_tokens=2))
            with pytest.raises(ShuttingDownError):
                async for _ in long:
                    pass
            for _ in range(100):  # the abort reaches the scheduler on the loop's next turn
                await asyncio.sleep(0.01)
                stats = engine.stats()
                if stats.num_running == 0:
                    break
            return short_tokens, stats.num_free_blocks, stats.num_total_blocks
        finally:
            await engine.shutdown()

    short_tokens, free, total = asyncio.run(scenario())
    assert len(short_tokens) == 2
    assert free == total
