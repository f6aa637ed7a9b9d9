"""Bad requests get a 4xx with a JSON body in their API's error shape, and the server keeps serving."""
import httpx
import pytest

pytestmark = pytest.mark.slow

TOO_LONG = "word " * 400  # the test server's context holds 256 tokens
CHAT = [{"role": "user", "content": "Hi"}]

OPENAI_CASES = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "model": "no-such-model"}, 404, "model"),
    ("/v1/completions", {"prompt": TOO_LONG}, 400, None),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1000}, 400, None),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1000, "stream": True}, 400, None),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, None),  # nothing to answer without echo
    ("/v1/completions", {"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "temperature": 50}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "Hi", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["x"] * 40}, 400, "stop"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "Hi", "prompt_logprobs": 1, "stream": True}, 400, None),
    ("/v1/completions", {"prompt": ""}, 400, None),
    ("/v1/completions", {"prompt": [99999999]}, 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "no-such-model", "stream": True}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, 400, None),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 5000}, 400, None),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, 400, None),
    ("/v1/chat/completions", {"messages": CHAT, "prompt_logprobs": 1, "stream": True}, 400, None),
]

LORAX_CASES = [
    ("/generate", b"{not json", 422, "validation"),
    ("/generate", {"inputs": ["a", "b"]}, 422, "validation"),
    ("/generate", {"inputs": ""}, 422, "validation"),
    ("/generate", {"inputs": TOO_LONG}, 422, "validation"),
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 1000}}, 422, "validation"),
    ("/generate", {"inputs": "Hi", "parameters": {"temperature": 0}}, 422, "validation"),
    ("/generate", {"inputs": "Hi", "parameters": {"top_k": 0}}, 422, "validation"),
    ("/generate", {"inputs": "Hi", "parameters": {"top_p": 2}}, 422, "validation"),
    ("/generate", {"inputs": "Hi", "parameters": {"repetition_penalty": -1}}, 422, "validation"),
    ("/generate", {"inputs": "Hi", "parameters": {"watermark": True}}, 422, "validation"),
    ("/generate", {"inputs": "Hi", "parameters": {"typical_p": 0.5}}, 422, "validation"),
    ("/generate", {"inputs": "Hi", "parameters": {"best_of": 2}}, 422, "validation"),
    ("/generate", {"inputs": "Hi", "parameters": {"adapter_id": "no/such-adapter"}}, 404, "not_found"),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 1000}}, 422, "validation"),
    ("/", {"inputs": "Hi", "stream": True, "parameters": {"seed": -1}}, 422, "validation"),
]


def post(url: str, body: dict | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    return httpx.post(url, json=body, timeout=30)


def assert_still_serving(server) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=30)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path, body, status, param", OPENAI_CASES)
def test_openai_errors(server, path, body, status, param):
    response = post(server.url + path, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    assert error["param"] == param
    assert_still_serving(server)


@pytest.mark.parametrize("path, body, status, error_type", LORAX_CASES)
def test_lorax_errors(server, path, body, status, error_type):
    response = post(server.url + path, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json().keys() == {"error", "error_type"}
    assert response.json()["error_type"] == error_type
    assert_still_serving(server)


def test_refusals_are_counted_by_reason(server):
    before = server.metric("loraserve:request_rejected_total", reason="model_not_found")
    post(f"{server.url}/v1/completions", {"prompt": "Hi", "model": "no-such-model"})
    assert server.metric("loraserve:request_rejected_total", reason="model_not_found") == before + 1


def test_full_queue_answers_429_in_both_shapes(tiny_queue_server):
    """One request runs and one waits; the next is refused until they are gone."""
    url = tiny_queue_server.url
    long_request = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as running, httpx.Client(timeout=30) as waiting:
        with running.stream("POST", f"{url}/v1/completions", json=long_request) as first:
            lines = first.iter_lines()  # kept: dropping a half-read iterator closes the connection
            next(line for line in lines if line.startswith("data:"))  # it runs
            with waiting.stream("POST", f"{url}/v1/completions", json=long_request) as second:
                assert second.status_code == 200  # submitted: it waits
                refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
                assert refused.status_code == 429
                assert refused.json()["error"]["code"] == "queue_full"
                refused = httpx.post(f"{url}/generate", json={"inputs": "Hi"})
                assert refused.status_code == 429
                assert refused.json()["error_type"] == "overloaded"
    tiny_queue_server.wait_until_idle()
    assert_still_serving(tiny_queue_server)
