"""Adapters change under load: while 34 streams over 8 adapters run through 2 slots (two long ones of the
adapters about to change), one adapter gets a new version, one is deleted and one is added. Every request keeps
the version it was submitted with to its last token, new requests see the change, and afterwards nothing is
held."""
import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Server, start_adapter_server
from tests.api.lora_helpers import (ADMIN, encode, generate_body, greedy, peft_model, save_random_adapter,
                                    upload_files)

pytestmark = pytest.mark.slow

NAMES = [f"swap-{index}" for index in range(8)]
REPLACED, DELETED, ADDED = NAMES[0], NAMES[1], "swap-new"
PROMPTS = ["the quick brown fox", "hello world, hello there", "paged attention caches keys", "the lazy dog"]
NUM_TOKENS = 24
LONG_TOKENS = 160  # the answers still running when the adapters change, however fast the machine
Version = tuple[str, int]  # (adapter name, version number)


@pytest.fixture(scope="module")
def swap_server(tmp_path_factory, tiny_model_dir) -> Iterator[Server]:
    """A server of its own: the test ends by deleting every adapter it has."""
    yield from start_adapter_server(tmp_path_factory.mktemp("hot_swap"), tiny_model_dir)


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory) -> dict[Version, Path]:
    directory = tmp_path_factory.mktemp("swap_adapters")
    versions = [(name, 1) for name in NAMES] + [(REPLACED, 2), (ADDED, 1)]
    return {(name, version): save_random_adapter(tiny_model_dir, directory / f"{name}-v{version}", seed=seed)
            for seed, (name, version) in enumerate(versions)}


@pytest.fixture(scope="module")
def expected(tiny_model_dir, saved) -> dict[Version, list[list[int]]]:
    """PEFT's greedy answer of each version alone, to each prompt."""
    prompts = [encode(tiny_model_dir, text) for text in PROMPTS]
    answers = {}
    for version, adapter_dir in saved.items():
        model = peft_model(tiny_model_dir, adapter_dir)
        answers[version] = [greedy(model, prompt, NUM_TOKENS) for prompt in prompts]
    return answers


async def upload(client: httpx.AsyncClient, name: str, adapter_dir: Path) -> dict:
    response = await client.post("/v1/adapters", data={"name": name}, files=upload_files(adapter_dir), headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()


async def stream_tokens(client: httpx.AsyncClient, name: str, prompt_index: int, submitted: asyncio.Event,
                        num_tokens: int) -> list[int]:
    """Token ids of one LoRAX stream; `submitted` is set once the server has accepted the request."""
    body = generate_body(PROMPTS[prompt_index], name, num_tokens)
    async with client.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200, await response.aread()
        submitted.set()
        events = [json.loads(line.removeprefix("data:")) async for line in response.aiter_lines()
                  if line.startswith("data:")]
    assert all("error" not in event for event in events), events
    return [event["token"]["id"] for event in events]


async def run_streams(client: httpx.AsyncClient, requests: list[tuple[str, int]], num_tokens: int = NUM_TOKENS
                      ) -> list[asyncio.Task]:
    """Start one stream per (adapter, prompt index); return once the server has accepted each (or it failed,
    which awaiting its task reports)."""
    events = [asyncio.Event() for _ in requests]
    tasks = [asyncio.create_task(stream_tokens(client, name, index, event, num_tokens))
             for (name, index), event in zip(requests, events)]
    for event, task in zip(events, tasks):
        accepted = asyncio.create_task(event.wait())
        await asyncio.wait([accepted, task], return_when=asyncio.FIRST_COMPLETED)
        accepted.cancel()
    return tasks


async def hot_swap(url: str, saved: dict[Version, Path], expected: dict[Version, list[list[int]]]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for name in NAMES:
            assert (await upload(client, name, saved[name, 1]))["version"] == 1
        first = [(name, index) for index in range(len(PROMPTS)) for name in NAMES]  # 32, interleaved
        first_tasks = await run_streams(client, first)
        # Accepted last, they have all or most of their tokens to go, however fast the machine: the changes below
        # meet requests under way. Their first NUM_TOKENS tokens are the answers expected.
        long = [(REPLACED, 0), (DELETED, 0)]
        long_tasks = await run_streams(client, long, LONG_TOKENS)
        assert not any(task.done() for task in long_tasks)
        assert (await upload(client, REPLACED, saved[REPLACED, 2]))["version"] == 2
        assert (await client.delete(f"/v1/adapters/{DELETED}", headers=ADMIN)).status_code == 200
        await upload(client, ADDED, saved[ADDED, 1])
        refused = await client.post("/generate", json=generate_body(PROMPTS[0], DELETED, NUM_TOKENS))
        assert refused.status_code == 404 and refused.json()["error_type"] == "not_found"
        later = [(name, index) for index in range(len(PROMPTS)) for name in (REPLACED, ADDED, NAMES[2])]
        later_tasks = await run_streams(client, later)
        for (name, index), task in zip(first, first_tasks):
            assert await task == expected[name, 1][index], (name, index)
        for (name, index), task in zip(long, long_tasks):
            tokens = await task
            assert len(tokens) == LONG_TOKENS and tokens[:NUM_TOKENS] == expected[name, 1][index], (name, index)
        for (name, index), task in zip(later, later_tasks):
            assert await task == expected[name, 2 if name == REPLACED else 1][index], (name, index)


def test_requests_keep_their_version_through_uploads_evictions_and_deletes(swap_server, saved, expected):
    asyncio.run(hot_swap(swap_server.url, saved, expected))
    swap_server.wait_until_idle()
    info = httpx.get(f"{swap_server.url}/info").json()
    assert info["adapter_references"] == 0 and info["adapter_pins"] == 0
    assert swap_server.metric("loraserve:adapter_evictions_total", tier="gpu") > 0
    assert swap_server.metric("loraserve:adapter_evictions_total", tier="cpu") > 0
    for adapter in httpx.get(f"{swap_server.url}/v1/adapters").json()["data"]:
        assert httpx.delete(f"{swap_server.url}/v1/adapters/{adapter['id']}", headers=ADMIN).status_code == 200
    assert swap_server.metric("loraserve:adapter_slots_in_use") == 0
    assert list(swap_server.adapter_dir.iterdir()) == []
