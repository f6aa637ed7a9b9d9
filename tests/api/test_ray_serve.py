"""`loraserve serve --replicas 2`: a local Ray cluster with two engine replicas of the embedded model behind one
ingress. Each adapter's requests go to one replica (Ray Serve's model multiplexing), the answers are a single
server's, and adapters uploaded or replaced through the ingress are served."""
import asyncio
import json
import os
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.api.conftest import MAIN_FLAGS, Server, start_server
from tests.api.lora_helpers import ADMIN, ADMIN_KEY, delete, generate_body, save_random_adapter, upload

pytest.importorskip("ray.serve", reason="the scale-out test needs the ray extra")
pytestmark = pytest.mark.slow

ADAPTERS = [f"affinity-{index}" for index in range(4)]
PROMPTS = ["the quick brown fox", "hello world, hello there"]
NUM_TOKENS = 8
REPLICA = "x-loraserve-replica"


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(tmp_path_factory.mktemp("replicated"), *MAIN_FLAGS, "--replicas", "2",
                            admin_key=ADMIN_KEY, ready_timeout=300)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Small adapters of the embedded model, made by PEFT, plus one more to replace the first with."""
    from benchmarks.perplexity import load_transformers

    base, directory = load_transformers(None), tmp_path_factory.mktemp("replicated_adapters")
    with torch.no_grad():
        return [save_random_adapter(base, directory / f"adapter{index}", seed=70 + index, rank=4,
                                    targets=["q_proj", "v_proj"]) for index in range(len(ADAPTERS) + 1)]


@pytest.fixture(scope="module")
def single(server: Server) -> Iterator[Server]:
    """The shared single server, for reference answers; the adapters the tests upload to it go afterwards."""
    yield server
    for name in [f"single-{name}" for name in ADAPTERS] + ["single-replacement"]:
        delete(server.url, name)


async def generate(client: httpx.AsyncClient, adapter: str | None, prompt: str) -> tuple[list[int], str]:
    """Greedy token ids, and the replica that answered (none for a single server)."""
    response = await client.post("/generate", json=generate_body(prompt, adapter, NUM_TOKENS))
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]], response.headers.get(REPLICA, "")


def answers_of(url: str, requests: list[tuple[str | None, str]]) -> list[tuple[list[int], str]]:
    async def run() -> list[tuple[list[int], str]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(generate(client, adapter, prompt) for adapter, prompt in requests))
    return asyncio.run(run())


def test_each_adapters_requests_go_to_one_replica_and_answer_as_a_single_server(replicated, single, adapter_dirs):
    for name, directory in zip(ADAPTERS, adapter_dirs):
        assert upload(replicated.url, name, directory).status_code == 201
        assert upload(single.url, f"single-{name}", directory).status_code == 201
    answers_of(replicated.url, [(name, PROMPTS[0]) for name in ADAPTERS])  # each adapter's first request
    requests = [(name, PROMPTS[index % 2]) for index in range(10) for name in ADAPTERS]
    replicas_of: dict[str, set[str]] = defaultdict(set)
    for (name, prompt), (tokens, replica) in zip(requests, answers_of(replicated.url, requests)):
        replicas_of[name].add(replica)
        assert tokens == answers_of(single.url, [(f"single-{name}", prompt)])[0][0], (name, prompt)
    assert all(len(replicas) == 1 for replicas in replicas_of.values()), replicas_of
    base_replicas = {replica for _, replica in answers_of(replicated.url, [(None, PROMPTS[0])] * 8)}
    assert len(base_replicas) == 2  # base requests go by load, to either
    from loraserve.scaleout.metrics_board import PUSH_INTERVAL_S  # with Ray: the module's import-or-skip comes first
    time.sleep(PUSH_INTERVAL_S + 1)  # each replica has posted its metrics since
    samples = replicated.metrics()
    for name in ADAPTERS:  # the replicas' own counters agree: every request of an adapter on one replica
        counts = {dict(labels)["replica"]: value for (metric, labels), value in samples.items()
                  if metric == "loraserve:adapter_requests_total" and dict(labels)["adapter"] == name}
        assert sorted(counts.values()) in ([11.0], [0.0, 11.0]), (name, counts)
    infos = [dict(labels) for (metric, labels) in samples if metric == "loraserve:lora_requests_info"]
    assert len(infos) == 2 and {info["max_lora"] for info in infos} == {"1024"}


def test_a_new_version_uploaded_through_the_ingress_replaces_the_old_on_every_replica(replicated, single,
                                                                                   adapter_dirs):
    name = "replaced"
    assert upload(replicated.url, name, adapter_dirs[0]).status_code == 201
    before = answers_of(replicated.url, [(name, PROMPTS[0])])[0][0]
    response = httpx.post(f"{replicated.url}/v1/adapters", data={"name": name}, headers=ADMIN, timeout=60,
                          files={file: (file, (adapter_dirs[-1] / file).read_bytes())
                                 for file in ("adapter_config.json", "adapter_model.safetensors")})
    assert response.status_code == 201 and response.json()["version"] == 2
    assert upload(single.url, "single-replacement", adapter_dirs[-1]).status_code == 201
    expected = answers_of(single.url, [("single-replacement", PROMPTS[0])])[0][0]
    assert expected != before
    answers = answers_of(replicated.url, [(name, PROMPTS[0])] * 6 + [(None, PROMPTS[1])] * 6)
    assert [tokens for tokens, _ in answers[:6]] == [expected] * 6
    listed = {entry["id"]: entry["version"] for entry in httpx.get(f"{replicated.url}/v1/adapters").json()["data"]}
    assert listed[name] == 2
    seen: dict[str, int] = {}  # reads go by load: ask until both replicas have said which version the name means
    for _ in range(40):
        response = httpx.get(f"{replicated.url}/v1/adapters/{name}", timeout=30)
        seen[response.headers[REPLICA]] = response.json()["version"]
        if len(seen) == 2:
            break
    assert list(seen.values()) == [2, 2], seen


def test_a_killed_replica_ends_its_requests_with_an_error_and_ray_brings_it_back(replicated):
    """SIGKILL to the replica streaming a request: that stream ends with an error event, the adapter's next
    requests are served (by the other replica, the same answer), and Ray starts a replacement."""
    name = ADAPTERS[1]
    expected, replica = answers_of(replicated.url, [(name, PROMPTS[0])])[0]
    with httpx.stream("POST", f"{replicated.url}/generate_stream", json=generate_body(PROMPTS[0], name, 200),
                      timeout=120) as response:
        assert response.headers[REPLICA] == replica
        events = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line.removeprefix("data:")))
                if len(events) == 2:
                    os.kill(int(replica.split(":")[1]), signal.SIGKILL)
    assert 2 <= len(events) < 200 and "replica" in events[-1]["error"], events[-1]
    tokens, survivor = answers_of(replicated.url, [(name, PROMPTS[0])])[0]
    assert (tokens, survivor != replica) == (expected, True)
    deadline = time.monotonic() + 180
    while True:
        replicas = {answered for _, answered in answers_of(replicated.url, [(None, PROMPTS[0])] * 8)}
        if len(replicas) == 2 and replica not in replicas:
            break  # two replicas answer again, the killed one replaced
        assert time.monotonic() < deadline, replicas
        time.sleep(2)
