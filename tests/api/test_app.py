"""The operational endpoints: /health, /info and /metrics."""
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def test_health_is_ok_while_the_engine_runs(server):
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_info_describes_the_model_and_its_limits(server):
    info = httpx.get(f"{server.url}/info").json()
    assert info["model_id"] == "SmolLM2-135M-Instruct"
    assert info["model_dtype"] == "float32"
    assert info["model_device_type"] == "cpu"
    assert info["max_total_tokens"] == 256
    assert info["max_input_length"] == 255
    assert info["max_batch_total_tokens"] == 96 * 16  # --num-kv-blocks 96 of 16 tokens


def test_metrics_parse_and_count_finished_requests(server):
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"loraserve:request_success", "loraserve:num_requests_running", "loraserve:kv_cache_usage_perc",
            "loraserve:time_to_first_token_seconds"} <= names
    before = server.metric("loraserve:request_success_total", finished_reason="length")
    tokens_before = server.metric("loraserve:generation_tokens_total")
    completion = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3,
                                                                  "ignore_eos": True}, timeout=30)
    assert completion.status_code == 200
    assert server.metric("loraserve:request_success_total", finished_reason="length") == before + 1
    assert server.metric("loraserve:generation_tokens_total") == tokens_before + 3
    server.wait_until_idle()
