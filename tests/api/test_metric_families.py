"""Each metric family moves as the traffic sent says it should. Most tests share the tiny model's server (eight KV
blocks, one adapter slot); those that must catch a request while it runs use the embedded model, which the tiny
one outruns. Servers are shared, so each test compares samples before and after its own requests."""
import httpx
import pytest

from tests.api.conftest import Server
from tests.api.lora_helpers import delete, generated_ids, save_random_adapter, upload

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple], float]
LATENCY_HISTOGRAMS = ("time_to_first_token_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
                      "request_decode_time_seconds", "request_time_per_output_token_seconds",
                      "e2e_request_latency_seconds")


def growth(server: Server, before: Samples, name: str, **labels: str) -> float:
    """How much `loraserve:<name>` grew since the `before` snapshot."""
    key = (f"loraserve:{name}", tuple(sorted(labels.items())))
    return server.metrics().get(key, 0.0) - before.get(key, 0.0)


def complete(server: Server, prompt: str | list[str], max_tokens: int, **options) -> dict:
    """A greedy completion that runs `max_tokens` tokens unless a stop token comes first."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, **options}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def start_and_leave(server: Server, prompt: str) -> None:
    """Stream a long completion, read its first event, check that it runs, and disconnect."""
    body = {"prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # held: dropping the iterator would close the stream
        next(line for line in lines if line.startswith("data:"))
        assert server.metric("loraserve:num_requests_running") == 1
        assert server.metric("loraserve:kv_cache_usage_perc") > 0


def lora_info(server: Server) -> dict[str, str]:
    """The labels of the one `lora_requests_info` sample."""
    (labels,) = [dict(labels) for (name, labels) in server.metrics() if name == "loraserve:lora_requests_info"]
    return labels


def test_lora_requests_info_names_the_adapters_of_running_requests(server, tmp_path):
    """The metric Kubernetes inference routers read to route by adapter (vLLM's lora_requests_info)."""
    from benchmarks.perplexity import load_transformers

    adapter = save_random_adapter(load_transformers(None), tmp_path / "info", 3, rank=2, targets=["q_proj"])
    assert upload(server.url, "info-adapter", adapter).is_success
    try:
        server.wait_until_idle()
        body = {"model": "info-adapter", "prompt": "Watch me", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            assert lora_info(server) == {"running_lora_adapters": "info-adapter", "waiting_lora_adapters": "",
                                         "max_lora": "1024"}
        server.wait_until_idle()
        assert lora_info(server)["running_lora_adapters"] == ""
    finally:
        delete(server.url, "info-adapter")  # the shared server lists only its model to the other tests


def test_requests_are_counted_by_finish_reason(server):
    server.wait_until_idle()  # no earlier test's request may finish inside this one's counts
    before = server.metrics()
    first_token = generated_ids(server.url, "Stop at once", None, 2)[0]  # finishes by length
    stopped = complete(server, "Stop at once", 8, stop_token_ids=[first_token])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    start_and_leave(server, "Left behind")
    server.wait_until_idle()
    assert growth(server, before, "request_success_total", finished_reason="length") == 1
    assert growth(server, before, "request_success_total", finished_reason="stop") == 1
    assert growth(server, before, "request_success_total", finished_reason="abort") == 1


def test_token_counters_add_up_the_usage_reported(metrics_server):
    before = metrics_server.metrics()
    usage = complete(metrics_server, "count my tokens", 5)["usage"]
    assert growth(metrics_server, before, "prompt_tokens_total") == usage["prompt_tokens"]
    assert growth(metrics_server, before, "generation_tokens_total") == usage["completion_tokens"] == 5


def test_each_latency_histogram_counts_a_finished_request(metrics_server):
    before = metrics_server.metrics()
    usage = complete(metrics_server, "time me", 3)["usage"]  # under one block: nothing comes from the cache
    for name in LATENCY_HISTOGRAMS:
        assert growth(metrics_server, before, f"{name}_count") == 1, name
    assert growth(metrics_server, before, "inter_token_latency_seconds_count") == 2
    # One step computes the prompt, two more a token each; the last token is sampled, never computed.
    assert growth(metrics_server, before, "iteration_tokens_total_count") == 3
    assert growth(metrics_server, before, "iteration_tokens_total_sum") == usage["prompt_tokens"] + 2


def test_gauges_follow_a_running_request_and_return_to_zero(server):
    server.wait_until_idle()
    start_and_leave(server, "Watch me run")
    server.wait_until_idle()
    assert server.metric("loraserve:num_requests_swapped") == 0  # preemption recomputes instead


def test_two_long_requests_on_eight_blocks_preempt(metrics_server):
    before = metrics_server.metrics()
    # Two prompts in one HTTP request start in the same step; each would end holding 7 of the 8 blocks.
    answer = complete(metrics_server, ["one story", "another"], 110)
    assert answer["usage"]["completion_tokens"] == 220
    assert growth(metrics_server, before, "num_preemptions_total") >= 1
    metrics_server.wait_until_idle()


def test_one_adapter_slot_loads_and_evicts_by_tier(metrics_server, tiny_model_dir, tmp_path):
    names = ["metrics-a", "metrics-b"]
    for seed, name in enumerate(names):
        assert upload(metrics_server.url, name, save_random_adapter(tiny_model_dir, tmp_path / name, seed)).is_success
    before = metrics_server.metrics()
    for name in [names[0], names[1], names[0]]:
        generated_ids(metrics_server.url, "hello world", name, 2)
    assert growth(metrics_server, before, "adapter_loads_total", tier="gpu") == 3
    assert growth(metrics_server, before, "adapter_load_latency_seconds_count", tier="gpu") == 3
    assert growth(metrics_server, before, "adapter_evictions_total", tier="gpu") == 2
    assert growth(metrics_server, before, "adapter_requests_total", adapter=names[0]) == 2
    assert growth(metrics_server, before, "adapter_requests_total", adapter=names[1]) == 1
    assert growth(metrics_server, before, "adapter_request_queue_time_seconds_count", adapter=names[0]) == 2
    assert metrics_server.metric("loraserve:adapters_loaded", tier="gpu") == 1
    assert metrics_server.metric("loraserve:adapter_slots_held") == 0
    assert metrics_server.metric("loraserve:num_requests_waiting_adapter") == 0


def test_a_repeated_prompt_hits_the_prefix_cache(metrics_server):
    prompt = "the quick brown fox jumps over the lazy dog " * 4  # more than two blocks of 16 tokens
    complete(metrics_server, prompt, 2)
    before = metrics_server.metrics()
    usage = complete(metrics_server, prompt, 2)["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 32
    assert growth(metrics_server, before, "prefix_cache_hits_total") == cached
    assert growth(metrics_server, before, "prefix_cache_queries_total") == usage["prompt_tokens"]
