"""Two servers on one adapter directory (--shared-adapter-dir, as replicas on a ReadWriteMany volume): what one
places or deletes, the other serves or forgets at its next request; a request in flight keeps its version."""
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import ADAPTER_FLAGS, Server, start_server
from tests.api.lora_helpers import (ADMIN_KEY, delete, encode, generate_body, generated_ids, peft_greedy,
                                    save_random_adapter, upload)

PROMPT = "the quick brown fox"
NUM_TOKENS = 8


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared_adapters")


def start_replica(tmp_path_factory, tiny_model_dir: Path, shared_dir: Path, label: str) -> Iterator[Server]:
    yield from start_server(tmp_path_factory.mktemp(label), *ADAPTER_FLAGS, "--adapter-dir", str(shared_dir),
                            "--shared-adapter-dir", model=str(tiny_model_dir), admin_key=ADMIN_KEY)


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_model_dir, shared_dir) -> Iterator[Server]:
    yield from start_replica(tmp_path_factory, tiny_model_dir, shared_dir, "first")


@pytest.fixture(scope="module")
def second(tmp_path_factory, tiny_model_dir, shared_dir) -> Iterator[Server]:
    yield from start_replica(tmp_path_factory, tiny_model_dir, shared_dir, "second")


@pytest.fixture(scope="module")
def versions(tiny_model_dir, tmp_path_factory) -> list[Path]:
    directory = tmp_path_factory.mktemp("shared_versions")
    return [save_random_adapter(tiny_model_dir, directory / f"v{index}", seed=60 + index) for index in range(3)]


def stream_ids(url: str, adapter: str, num_tokens: int, started: threading.Event) -> list[int]:
    """A LoRAX stream's token ids; `started` is set at its first token."""
    ids = []
    with httpx.stream("POST", f"{url}/generate_stream", json=generate_body(PROMPT, adapter, num_tokens),
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                ids.append(json.loads(line.removeprefix("data:"))["token"]["id"])
                started.set()
    return ids


def expected(tiny_model_dir: Path, adapter_dir: Path) -> list[int]:
    return peft_greedy(tiny_model_dir, adapter_dir, encode(tiny_model_dir, PROMPT), NUM_TOKENS)


def test_an_upload_to_one_server_is_served_by_the_other_and_so_are_new_versions_and_deletes(
        first, second, versions, tiny_model_dir):
    assert upload(first.url, "shared", versions[0]).status_code == 201
    assert generated_ids(second.url, PROMPT, "shared", NUM_TOKENS) == expected(tiny_model_dir, versions[0])
    assert httpx.get(f"{second.url}/v1/adapters/shared").json()["version"] == 1
    assert upload(second.url, "shared", versions[1]).status_code == 201  # version 2, placed by the other
    for server in (first, second):
        assert generated_ids(server.url, PROMPT, "shared", NUM_TOKENS) == expected(tiny_model_dir, versions[1])
        assert [entry["version"] for entry in httpx.get(f"{server.url}/v1/adapters").json()["data"]
                if entry["id"] == "shared"] == [2]
    assert delete(first.url, "shared").status_code == 200
    response = httpx.post(f"{second.url}/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "shared"}})
    assert response.status_code == 404


def test_a_request_in_flight_keeps_its_version_while_the_other_server_replaces_it(first, second, versions,
                                                                                  tiny_model_dir):
    assert upload(first.url, "inflight", versions[0]).status_code == 201
    answers: list[list[int]] = []
    started = threading.Event()
    long_request = threading.Thread(target=lambda: answers.append(stream_ids(second.url, "inflight", 120, started)))
    long_request.start()
    assert started.wait(60)
    assert upload(first.url, "inflight", versions[2]).status_code == 201
    assert generated_ids(second.url, PROMPT, "inflight", NUM_TOKENS) == expected(tiny_model_dir, versions[2])
    long_request.join(60)
    assert answers[0][:NUM_TOKENS] == expected(tiny_model_dir, versions[0])
