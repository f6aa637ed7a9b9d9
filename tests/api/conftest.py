"""End-to-end fixtures: a real `loraserve serve` subprocess on a free port, and a reader of its metrics."""
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

READY_PREFIX = "loraserve ready: "
READY_TIMEOUT_S = 120
# A short context makes "too long" cheap to send; a small cache keeps start-up quick.
MAIN_FLAGS = ("--max-model-len", "256", "--num-kv-blocks", "96", "--seed", "0")


@dataclass
class Server:
    url: str
    log: Path

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        text = httpx.get(f"{self.url}/metrics").text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_until_idle(self, timeout: float = 5.0) -> None:
        """Until no request runs or waits and no KV block is held; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        names = ("loraserve:num_requests_running", "loraserve:num_requests_waiting", "loraserve:kv_cache_usage_perc")
        while any(self.metric(name) for name in names):
            assert time.monotonic() < deadline, {name: self.metric(name) for name in names}
            time.sleep(0.05)


def wait_for_ready_line(process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        readable, _, _ = select.select([process.stdout], [], [], 0.5)
        if readable:
            line = process.stdout.readline()
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX):].strip()
    raise TimeoutError(f"no ready line within {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def start_server(log: Path, *flags: str) -> Iterator[Server]:
    command = [sys.executable, "-m", "server.cli", "serve", "--model", "embedded", "--port", "0",
               "--log-level", "warning", *flags]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                   cwd=Path(__file__).parents[2])
    try:
        yield Server(wait_for_ready_line(process, log), log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server most tests share: greedy requests on it are deterministic."""
    yield from start_server(tmp_path_factory.mktemp("server") / "server.log", *MAIN_FLAGS)


@pytest.fixture(scope="session")
def tiny_queue_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One running request and one waiting at most, so a third is refused deterministically."""
    yield from start_server(tmp_path_factory.mktemp("tiny_queue") / "server.log",
                            "--max-model-len", "256", "--num-kv-blocks", "32", "--max-num-seqs", "1",
                            "--max-queue", "1")
