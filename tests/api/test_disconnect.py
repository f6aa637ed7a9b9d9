"""A client that leaves takes its request with it: the request is aborted and its KV blocks freed at once."""
import httpx
import pytest

pytestmark = pytest.mark.slow

LONG = {"max_tokens": 200, "ignore_eos": True}  # far longer than the tests wait


def aborted(server) -> float:
    return server.metric("loraserve:request_success_total", finished_reason="abort")


def test_closing_a_stream_aborts_its_request(server):
    aborted_before = aborted(server)
    with httpx.Client(timeout=30) as client:
        body = {"prompt": "Once upon a time", "stream": True, **LONG}
        with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            events = (line for line in response.iter_lines() if line.startswith("data:"))
            next(events), next(events)
            assert server.metric("loraserve:num_requests_running") == 1
            assert server.metric("loraserve:kv_cache_usage_perc") > 0
    server.wait_until_idle(timeout=5)
    assert aborted(server) == aborted_before + 1


def test_closing_a_lorax_stream_aborts_its_request(server):
    aborted_before = aborted(server)
    with httpx.Client(timeout=30) as client:
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
        with client.stream("POST", f"{server.url}/generate_stream", json=body) as response:
            next(line for line in response.iter_lines() if line.startswith("data:"))
    server.wait_until_idle(timeout=5)
    assert aborted(server) == aborted_before + 1


def test_a_client_that_gives_up_on_a_whole_answer_aborts_it(server):
    aborted_before = aborted(server)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], **LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=1.0)
    server.wait_until_idle(timeout=5)
    assert aborted(server) == aborted_before + 1
