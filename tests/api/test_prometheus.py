"""A real Prometheus scrapes the server every second and reads back what was sent; promtool lints the exposition.
Both are skipped where Prometheus is not installed (CI installs Debian's `prometheus` package)."""
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.api.conftest import Server

pytestmark = pytest.mark.slow

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
READY_TIMEOUT_S = 30
SCRAPE_TIMEOUT_S = 10
# promtool's complaints that our names make on purpose: vLLM's names with a `loraserve:` prefix, so operators'
# dashboards carry over (the colon is meant for recording rules), and vLLM's `iteration_tokens_total` histogram.
ACCEPTED_PROBLEMS = ("metric names should not contain ':'",
                     'loraserve:iteration_tokens_total non-counter metrics should not have "_total" suffix')
CONFIG = """global:
  scrape_interval: 1s
scrape_configs:
  - job_name: loraserve
    static_configs:
      - targets: ["{target}"]
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(metrics_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus on loopback scraping `metrics_server`; yields its URL."""
    if PROMETHEUS is None:
        pytest.skip("Prometheus is not installed (apt-get install prometheus)")
    directory = tmp_path_factory.mktemp("prometheus")
    (directory / "prometheus.yml").write_text(CONFIG.format(target=urlsplit(metrics_server.url).netloc))
    address = f"127.0.0.1:{free_port()}"
    command = [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}",
               f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address={address}"]
    with open(directory / "prometheus.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(f"http://{address}", process, directory / "prometheus.log")
        yield f"http://{address}"
    finally:
        process.terminate()
        process.wait(timeout=15)


def wait_until_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"Prometheus exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/-/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"Prometheus not ready within {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def query(prometheus: str, expression: str) -> float:
    """The value of an instant query that selects one series; 0 when it selects none (a counter never touched)."""
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}).json()
    assert answer["status"] == "success", answer
    series = answer["data"]["result"]
    assert len(series) <= 1, series
    return float(series[0]["value"][1]) if series else 0.0


def wait_for_scrape_after(prometheus: str, moment: float) -> None:
    """Until Prometheus holds a successful scrape that began after `moment` (Unix time)."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    # timestamp() gives a sample's own time only when applied to a plain selector, so `up` is checked after.
    while query(prometheus, 'timestamp(up{job="loraserve"})') <= moment:
        assert time.monotonic() < deadline, f"no scrape within {SCRAPE_TIMEOUT_S} s"
        time.sleep(0.2)
    assert query(prometheus, 'up{job="loraserve"}') == 1, "the last scrape failed"


def read_all(prometheus: str, expressions: list[str]) -> dict[str, float]:
    return {expression: query(prometheus, expression) for expression in expressions}


def test_prometheus_scrapes_what_the_traffic_made(prometheus, metrics_server):
    expressions = ['loraserve:request_success_total{finished_reason="length"}', "loraserve:generation_tokens_total",
                   "loraserve:prompt_tokens_total", "loraserve:e2e_request_latency_seconds_count",
                   "loraserve:time_to_first_token_seconds_count"]
    wait_for_scrape_after(prometheus, time.time())
    before = read_all(prometheus, expressions)
    prompt_tokens = 0
    streamed = {"stream": True, "stream_options": {"include_usage": True}}
    for prompt, options in [("scrape me", {}), ("and me", {}), ("stream me", streamed)]:
        body = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True, **options}
        response = httpx.post(f"{metrics_server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        prompt_tokens += usage_of(response)["prompt_tokens"]
    wait_for_scrape_after(prometheus, time.time())
    after = read_all(prometheus, expressions)
    growth = {expression: after[expression] - before[expression] for expression in expressions}
    assert growth == dict(zip(expressions, [3, 12, prompt_tokens, 3, 3]))


def usage_of(response: httpx.Response) -> dict:
    """A whole answer's usage, or a stream's (its last data event before [DONE])."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()["usage"]
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    return json.loads(events[-2])["usage"]


def test_promtool_finds_no_problem_in_the_exposition(metrics_server):
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    exposition = httpx.get(f"{metrics_server.url}/metrics").text
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=30)
    problems = [line for line in (lint.stdout + lint.stderr).splitlines()
                if line and not any(accepted in line for accepted in ACCEPTED_PROBLEMS)]
    assert problems == []
