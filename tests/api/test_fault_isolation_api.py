"""A request the model fails on, among fifteen others: it alone ends with an error, the others answer as they
would have, and nothing stays held. A fault that hits every request stops the process for its supervisor."""
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loraserve.cli import EXIT_ENGINE_DEAD
from loraserve.engine.engine import MAX_CONSECUTIVE_CULPRITS
from tests.api.conftest import Server, start_server
from tests.api.lora_helpers import ADMIN_KEY, save_random_adapter, upload

FAULT_POSITION = 150  # the faulty model raises when a step computes this position or a later one
FLAGS = ("--max-model-len", "256", "--num-kv-blocks", "160", "--max-loras", "2", "--max-lora-rank", "8",
         "--max-num-seqs", "16", "--max-num-batched-tokens", "256")


def start_faulty(directory: Path, model_dir: Path, fault_position: int) -> Iterator[Server]:
    yield from start_server(directory, *FLAGS, model=str(model_dir), admin_key=ADMIN_KEY,
                            module="tests.api.faulty_server",
                            environment={"LORASERVE_TEST_FAULT_POSITION": str(fault_position)})


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    yield from start_faulty(tmp_path_factory.mktemp("faulty"), tiny_model_dir, FAULT_POSITION)


def request_of(index: int) -> tuple[str, dict]:
    """Fifteen ordinary requests: completions, chats and LoRAX, greedy and seeded, some streamed, some with the
    adapter; none reaches the fault position."""
    adapter = "isolated" if index % 3 == 0 else None
    if index % 4 == 0:
        return "/generate", {"inputs": f"story {index}", "parameters": {
            "max_new_tokens": 20, "ignore_eos_token": True, "adapter_id": adapter}}
    body = {"max_tokens": 20, "ignore_eos": True, "stream": index % 2 == 1, "model": adapter, "temperature": 0}
    if index % 5 == 0:
        body |= {"temperature": 0.9, "seed": index}
    if index % 4 == 2:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": f"question {index}"}]}
    return "/v1/completions", body | {"prompt": f"the quick brown fox {index}"}


def answer_of(url: str, path: str, body: dict) -> tuple[int, str]:
    """The status and the whole text; a stream's text is joined from its chunks (an error event is kept)."""
    if not body.get("stream"):
        response = httpx.post(url + path, json=body, timeout=120)
        return response.status_code, response.text if response.status_code != 200 else text_of(response.json())
    pieces = []
    with httpx.stream("POST", url + path, json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                pieces.append(chunk["error"]["message"] if "error" in chunk else "".join(
                    choice.get("text") or choice.get("delta", {}).get("content") or ""
                    for choice in chunk["choices"]))
    return response.status_code, "".join(pieces)


def text_of(body: dict) -> str:
    if "generated_text" in body:
        return body["generated_text"]
    choice = body["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_one_failing_request_among_sixteen_ends_alone(faulty_server, tiny_model_dir, tmp_path):
    url = faulty_server.url
    assert upload(url, "isolated", save_random_adapter(tiny_model_dir, tmp_path / "adapter", seed=4)).status_code == 201
    ordinary = [request_of(index) for index in range(15)]
    alone = [answer_of(url, path, body) for path, body in ordinary]
    marked = ("/v1/completions", {"prompt": list(range(3, 3 + FAULT_POSITION + 10)), "max_tokens": 5})
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(answer_of, url, path, body) for path, body in ordinary[:8] + [marked] + ordinary[8:]]
        answers = [future.result() for future in futures]
    failed = answers.pop(8)
    assert failed[0] == 500 and json.loads(failed[1])["error"]["type"] == "internal_error"
    assert "RuntimeError" in json.loads(failed[1])["error"]["message"]
    assert answers == alone
    assert httpx.get(f"{url}/health").status_code == 200
    faulty_server.wait_until_idle()
    info = httpx.get(f"{url}/info").json()
    assert info["adapter_pins"] == 0 and info["adapter_references"] == 0
    assert faulty_server.metric("loraserve:engine_failed_steps_total") >= 1
    assert faulty_server.metric("loraserve:request_success_total", finished_reason="error") == 1


def test_a_failing_stream_ends_with_an_error_event(faulty_server):
    status, text = answer_of(faulty_server.url, "/v1/completions", {
        "prompt": list(range(3, 3 + FAULT_POSITION + 10)), "max_tokens": 5, "stream": True})
    assert status == 200 and "generation failed inside the engine" in text
    assert httpx.get(f"{faulty_server.url}/health").status_code == 200


def test_a_fault_every_request_hits_restarts_the_server(tmp_path, tiny_model_dir):
    """Position 0: every step fails. After a few requests fail alone, /health fails and the process exits with
    EXIT_ENGINE_DEAD, for its supervisor to restart it."""
    servers = start_faulty(tmp_path, tiny_model_dir, 0)
    server = next(servers)
    try:
        statuses = [httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                               timeout=60).status_code for _ in range(MAX_CONSECUTIVE_CULPRITS)]
        assert statuses[:-1] == [500] * (MAX_CONSECUTIVE_CULPRITS - 1) and statuses[-1] == 503
        assert server.process.wait(timeout=30) == EXIT_ENGINE_DEAD
        assert "the engine stopped after an unrecoverable error" in server.log.read_text()
    finally:
        servers.close()
