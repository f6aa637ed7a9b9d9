"""SIGTERM drains the server: new requests get 503, running streams finish or end with a clean error event, and
the process exits once the shutdown timeout has passed."""
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import MAIN_FLAGS, wait_for_ready_line

pytestmark = pytest.mark.slow

SHUTDOWN_TIMEOUT_S = 2.0
EXIT_MARGIN_S = 10.0  # model teardown and the interpreter's exit, on a busy machine
NUM_STREAMS = 16
LONG = {"max_tokens": 200, "ignore_eos": True}  # far longer than the shutdown timeout allows on a CPU


def start(directory: Path) -> tuple[subprocess.Popen, str]:
    log = directory / "server.log"
    command = [sys.executable, "-m", "loraserve.cli", "serve", "--port", "0", "--log-level", "warning",
               "--adapter-dir", str(directory / "adapters"), "--max-num-seqs", str(NUM_STREAMS),
               "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), *MAIN_FLAGS]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                   cwd=Path(__file__).parents[2])
    return process, wait_for_ready_line(process, log)


def read_stream(url: str, index: int, started: threading.Event, events: list) -> None:
    """Every `data:` payload of one stream until the server closes it; OpenAI and LoRAX streams alternate."""
    if index % 2:
        path, body = "/generate_stream", {"inputs": f"Story {index}:", "parameters": {
            "max_new_tokens": LONG["max_tokens"], "ignore_eos_token": True}}
    else:
        path, body = "/v1/completions", {"prompt": f"Story {index}:", "stream": True, **LONG}
    with httpx.Client(timeout=60) as client, client.stream("POST", url + path, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(line.removeprefix("data:").strip())
                started.set()


def ended_cleanly(index: int, events: list[str]) -> str:
    """'finished' or 'stopped' when the stream ended as its API says a stream ends; fails otherwise."""
    if index % 2 == 0:
        assert events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        if "error" in last:
            assert last["error"]["code"] == "shutting_down", last
            return "stopped"
        assert last["choices"][0]["finish_reason"] == "length", last
        return "finished"
    last = json.loads(events[-1])
    if "error" in last:
        assert last["error_type"] == "overloaded", last
        return "stopped"
    assert last["generated_text"] is not None, last
    return "finished"


def wait_for_drain(url: str) -> None:
    """Until /health says the server is shutting down (uvicorn notices the signal on its next tick)."""
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
    while httpx.get(f"{url}/health").status_code == 200:
        assert time.monotonic() < deadline, "the server never started draining"
        time.sleep(0.02)


def test_sigterm_drains_streams_then_exits(tmp_path):
    process, url = start(tmp_path)
    try:
        started = [threading.Event() for _ in range(NUM_STREAMS)]
        events: list[list[str]] = [[] for _ in range(NUM_STREAMS)]
        threads = [threading.Thread(target=read_stream, args=(url, index, started[index], events[index]))
                   for index in range(NUM_STREAMS)]
        for thread in threads:
            thread.start()
        for event in started:
            assert event.wait(timeout=60), "a stream never produced its first event"

        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        wait_for_drain(url)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "late", "max_tokens": 1}, timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"

        process.wait(timeout=SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S)
        assert time.monotonic() - signalled < SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S
        for thread in threads:
            thread.join(timeout=10)
            assert not thread.is_alive()
        outcomes = [ended_cleanly(index, stream_events) for index, stream_events in enumerate(events)]
        assert "stopped" in outcomes, "every stream finished: the test no longer exercises the abort"
        assert "Traceback" not in (tmp_path / "server.log").read_text()
    finally:
        process.kill()
        process.wait()
