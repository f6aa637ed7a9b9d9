"""Two servers sharing their adapters, on one directory (--shared-adapter-dir, as replicas on a ReadWriteMany
volume) or through an object store (--adapter-store, an fsspec URL; file:// here), each then with a directory of
its own: what one places or deletes, the other serves or forgets at its next request (after the store's listing
interval), and a request in flight keeps its version."""
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loraserve.adapters.remote_store import LISTING_TTL_S
from tests.api.conftest import ADAPTER_FLAGS, Server, start_server
from tests.api.lora_helpers import (ADMIN_KEY, delete, encode, generate_body, generated_ids, peft_greedy,
                                    save_random_adapter, upload)

PROMPT = "the quick brown fox"
NUM_TOKENS = 8


@pytest.fixture(scope="module", params=["directory", "object store"])
def sharing(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """How the two servers share adapters, and the flags that say so (start_server gives each its own directory)."""
    shared = tmp_path_factory.mktemp("shared_adapters")
    if request.param == "directory":
        return request.param, ["--adapter-dir", str(shared), "--shared-adapter-dir"]
    return request.param, ["--adapter-store", f"file://{shared}"]


def start_replica(tmp_path_factory, tiny_model_dir: Path, sharing: tuple[str, list[str]], label: str
                  ) -> Iterator[Server]:
    yield from start_server(tmp_path_factory.mktemp(label), *ADAPTER_FLAGS, *sharing[1], model=str(tiny_model_dir),
                            admin_key=ADMIN_KEY)


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_model_dir, sharing) -> Iterator[Server]:
    yield from start_replica(tmp_path_factory, tiny_model_dir, sharing, "first")


@pytest.fixture(scope="module")
def second(tmp_path_factory, tiny_model_dir, sharing) -> Iterator[Server]:
    yield from start_replica(tmp_path_factory, tiny_model_dir, sharing, "second")


def settle(sharing: tuple[str, list[str]]) -> None:
    """Until a server's listing of the object store, kept LISTING_TTL_S seconds, is taken again."""
    if sharing[0] == "object store":
        time.sleep(LISTING_TTL_S + 0.1)


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
        first, second, sharing, versions, tiny_model_dir):
    assert upload(first.url, "shared", versions[0]).status_code == 201
    assert generated_ids(second.url, PROMPT, "shared", NUM_TOKENS) == expected(tiny_model_dir, versions[0])
    assert httpx.get(f"{second.url}/v1/adapters/shared").json()["version"] == 1
    assert upload(second.url, "shared", versions[1]).status_code == 201  # version 2, placed by the other
    settle(sharing)
    for server in (first, second):
        assert generated_ids(server.url, PROMPT, "shared", NUM_TOKENS) == expected(tiny_model_dir, versions[1])
        assert [entry["version"] for entry in httpx.get(f"{server.url}/v1/adapters").json()["data"]
                if entry["id"] == "shared"] == [2]
    assert delete(first.url, "shared").status_code == 200
    settle(sharing)
    response = httpx.post(f"{second.url}/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "shared"}})
    assert response.status_code == 404


def test_a_request_in_flight_keeps_its_version_while_the_other_server_replaces_it(first, second, sharing, versions,
                                                                                  tiny_model_dir):
    assert upload(first.url, "inflight", versions[0]).status_code == 201
    answers: list[list[int]] = []
    started = threading.Event()
    long_request = threading.Thread(target=lambda: answers.append(stream_ids(second.url, "inflight", 120, started)))
    long_request.start()
    assert started.wait(60)
    assert upload(first.url, "inflight", versions[2]).status_code == 201
    settle(sharing)
    assert generated_ids(second.url, PROMPT, "inflight", NUM_TOKENS) == expected(tiny_model_dir, versions[2])
    long_request.join(60)
    assert answers[0][:NUM_TOKENS] == expected(tiny_model_dir, versions[0])
