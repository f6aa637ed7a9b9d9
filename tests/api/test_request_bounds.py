"""Inputs a fuzzer found that stopped or stalled the server: each now gets a clear 4xx, and the server goes on."""
import json
import threading
import time

import httpx
import pytest

from loraserve.api.body_limits import MAX_JSON_DEPTH

HUGE_INTS = [9223372036854775808, 10**30]
CHAT = [{"role": "user", "content": "hi"}]


def assert_refused(response: httpx.Response, status: int, words: str = "") -> dict:
    """A JSON error body in its API's shape, naming what was wrong."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
    assert words in message, message
    return body


def post_raw_json(url: str, body: object) -> httpx.Response:
    """Encoded by `json.dumps`: a lone surrogate becomes the escape a client can send, and NaN Python's NaN."""
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)


def assert_serving(url: str) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    answer = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("top_k", HUGE_INTS)
def test_a_huge_top_k_is_refused_in_every_api(adapter_server, top_k):
    url = adapter_server.url
    assert_refused(httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "top_k": top_k}),
                   400, "top_k")
    assert_refused(httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "top_k": top_k}), 400, "top_k")
    assert_refused(httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"top_k": top_k}}), 422,
                   "top_k")
    assert_serving(url)


def test_top_k_larger_than_the_vocabulary_keeps_every_token(adapter_server):
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0.7, "seed": 3}
    plain = httpx.post(f"{adapter_server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    wide = httpx.post(f"{adapter_server.url}/v1/completions", json=body | {"top_k": 2**31 - 1}, timeout=60)
    assert wide.status_code == 200 and wide.json()["choices"][0]["text"] == plain


@pytest.mark.parametrize("path, status", [("/v1/completions", 400), ("/v1/chat/completions", 400), ("/", 422),
                                          ("/generate", 422)])
def test_deeply_nested_json_is_refused_unparsed(adapter_server, path, status):
    nested = b"[" * 50_000 + b"]" * 50_000
    response = httpx.post(adapter_server.url + path, content=nested, headers={"content-type": "application/json"})
    assert_refused(response, status, f"at most {MAX_JSON_DEPTH}")
    assert_serving(adapter_server.url)


@pytest.mark.parametrize("path, body, status", [
    ("/v1/completions", {"prompt": "a\ud800b"}, 400),
    ("/v1/completions", {"prompt": ["fine", "a\udfffb"]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, 400),
    ("/generate", {"inputs": "a\ud800b"}, 422),
    ("/", {"inputs": "a\ud800b", "stream": True}, 422),
])
def test_a_lone_surrogate_is_refused(adapter_server, path, body, status):
    assert_refused(post_raw_json(adapter_server.url + path, body), status, "lone surrogate U+D")
    assert_serving(adapter_server.url)


def test_a_tiny_temperature_is_greedy(adapter_server):
    url = adapter_server.url
    body = {"prompt": "the quick brown", "max_tokens": 8, "ignore_eos": True}
    greedy = httpx.post(f"{url}/v1/completions", json=body | {"temperature": 0}, timeout=60).json()
    tiny = httpx.post(f"{url}/v1/completions", json=body | {"temperature": 1e-300}, timeout=60).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]
    parameters = {"max_new_tokens": 8, "ignore_eos_token": True}
    lorax_greedy = httpx.post(f"{url}/generate", json={"inputs": "the quick brown", "parameters": parameters},
                              timeout=60).json()
    lorax_tiny = httpx.post(f"{url}/generate", timeout=60, json={"inputs": "the quick brown", "parameters": {
        **parameters, "do_sample": True, "temperature": 1e-300}}).json()
    assert lorax_tiny["generated_text"] == lorax_greedy["generated_text"] == greedy["choices"][0]["text"]


def test_a_batch_larger_than_the_queue_is_a_client_error(adapter_server):
    response = httpx.post(f"{adapter_server.url}/v1/completions", json={"prompt": ["hi"] * 2000, "max_tokens": 1})
    assert_refused(response, 400, "queues at most 256")
    response = httpx.post(f"{adapter_server.url}/v1/completions", json={"prompt": ["hi"] * 100, "n": 3})
    assert_refused(response, 400, "asks for 300 completions")


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, "false"])
def test_stream_takes_only_a_boolean(adapter_server, value):
    for path, body in [("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT}),
                       ("/", {"inputs": "hi"})]:
        response = httpx.post(adapter_server.url + path, json=body | {"stream": value})
        assert_refused(response, 400 if path.startswith("/v1") else 422, "stream")


@pytest.mark.parametrize("body, field", [
    ({"prompt": "hi", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"prompt": "hi", "best_of": 2}, "best_of"),
    ({"prompt": "hi", "stop": ["x" * 2000]}, "stop"),
    ({"prompt": "hi", "stop_token_ids": [10**12]}, "stop_token_ids"),
    ({"prompt": "hi", "seed": 2**64}, "seed"),
    ({"prompt": "hi", "presence_penalty": float("nan")}, "presence_penalty"),
    ({"prompt": "hi", "max_tokens": "4"}, "max_tokens"),
])
def test_unknown_or_out_of_range_fields_are_named(adapter_server, body, field):
    response = post_raw_json(f"{adapter_server.url}/v1/completions", body)
    assert assert_refused(response, 400)["error"]["param"] == field


class HealthWatch:
    """Polls /health from a thread while something else happens; records how long each answer took."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                assert client.get(f"{self.url}/health").status_code == 200
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.02)

    def __enter__(self) -> "HealthWatch":
        self.thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc_info: object) -> None:
        time.sleep(0.1)
        self.stop.set()
        self.thread.join()


def chunks(total: int, size: int = 1 << 16):
    """A body sent chunked (no Content-Length), so the server can only count its bytes as they come."""
    sent = 0
    yield b'{"prompt": "'
    while sent < total:
        yield b"x" * size
        sent += size
    yield b'"}'


LIMIT = 2 << 20  # --max-request-bytes' default


@pytest.mark.parametrize("kind", ["declared", "chunked", "text at the limit", "token ids at the limit",
                                  "a batch of token ids at the limit"])
def test_health_answers_while_a_maximal_body_is_refused(adapter_server, kind):
    url = f"{adapter_server.url}/v1/completions"
    headers = {"content-type": "application/json"}
    with HealthWatch(adapter_server.url) as watch:
        if kind == "declared":
            response = httpx.post(url, content=b'{"prompt": "' + b"x" * (10 << 20) + b'"}', headers=headers)
            expected, words = 413, "exceeds"
        elif kind == "chunked":
            response = httpx.post(url, content=chunks(10 << 20), headers=headers, timeout=60)
            expected, words = 413, "exceeds"
        elif kind == "text at the limit":
            response = httpx.post(url, content=b'{"prompt": "' + b"word " * ((LIMIT - 20) // 5) + b'"}',
                                  headers=headers, timeout=60)
            expected, words = 400, "tokens"
        elif kind == "token ids at the limit":
            ids = b"7, " * ((LIMIT - 20) // 3)
            response = httpx.post(url, content=b'{"prompt": [' + ids + b'7]}', headers=headers, timeout=60)
            expected, words = 400, "tokens"
        else:
            prompts = b"[7, 8], " * ((LIMIT - 20) // 8)
            response = httpx.post(url, content=b'{"prompt": [' + prompts + b'[7]]}', headers=headers, timeout=60)
            expected, words = 400, "queues at most"
    assert_refused(response, expected, words)
    assert watch.latencies and max(watch.latencies) < 1.0, max(watch.latencies)
    assert_serving(adapter_server.url)
