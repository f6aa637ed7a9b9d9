"""End-to-end fixtures: a real `loraserve serve` subprocess on a free port, and a reader of its metrics.

Adapter tests run on a tiny random Llama (tests/model/helpers.py) so PEFT can check every answer quickly.
"""
import os
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

from loraserve.api.auth import ADMIN_KEY_VARIABLE
from tests.api.lora_helpers import ADMIN_KEY
from tests.model.helpers import save_tiny_llama

READY_PREFIX = "loraserve ready: "
READY_TIMEOUT_S = 120
# A short context makes "too long" cheap to send; a small cache keeps start-up quick.
MAIN_FLAGS = ("--max-model-len", "256", "--num-kv-blocks", "96", "--seed", "0")
# Two slots and three CPU copies for many adapters: requests wait for slots, and weights are read again from disk.
ADAPTER_FLAGS = ("--max-model-len", "256", "--num-kv-blocks", "128", "--max-loras", "2", "--max-cpu-loras", "3",
                 "--max-lora-rank", "16", "--max-adapter-bytes", "256KiB")
# Eight KV blocks of 16 tokens and one adapter slot: a little traffic preempts requests and evicts adapters.
METRICS_FLAGS = ("--max-model-len", "128", "--num-kv-blocks", "8", "--max-loras", "1", "--max-cpu-loras", "1",
                 "--max-lora-rank", "16", "--max-adapter-bytes", "256KiB")


@dataclass
class Server:
    url: str
    log: Path
    adapter_dir: Path
    process: subprocess.Popen

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


def wait_for_ready_line(process: subprocess.Popen, log: Path, timeout: float = READY_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        readable, _, _ = select.select([process.stdout], [], [], 0.5)
        if readable:
            line = process.stdout.readline()
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX):].strip()
    raise TimeoutError(f"no ready line within {timeout} s:\n{log.read_text()[-3000:]}")


def start_server(directory: Path, *flags: str, model: str = "embedded", admin_key: str | None = None,
                 module: str = "loraserve.cli", environment: dict[str, str] | None = None,
                 ready_timeout: float = READY_TIMEOUT_S) -> Iterator[Server]:
    """A server whose log and adapters live in `directory`; the admin key is set only when given. `module` runs
    instead of the real command line (a test double around it), with `environment` added to the process's."""
    log, adapter_dir = directory / "server.log", directory / "adapters"
    command = [sys.executable, "-m", module, "serve", "--model", model, "--port", "0", "--log-level",
               "warning", "--adapter-dir", str(adapter_dir), *flags]
    environment = {name: value for name, value in os.environ.items() if name != ADMIN_KEY_VARIABLE} | (
        environment or {})
    if admin_key is not None:
        environment[ADMIN_KEY_VARIABLE] = admin_key
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                   cwd=Path(__file__).parents[2], env=environment)
    try:
        yield Server(wait_for_ready_line(process, log, ready_timeout), log, adapter_dir, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server most tests share: greedy requests on it are deterministic."""
    yield from start_server(tmp_path_factory.mktemp("server"), *MAIN_FLAGS)


@pytest.fixture(scope="session")
def tiny_queue_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One running request and one waiting at most, so a third is refused deterministically."""
    yield from start_server(tmp_path_factory.mktemp("tiny_queue"), "--max-model-len", "256", "--num-kv-blocks",
                            "32", "--max-num-seqs", "1", "--max-queue", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="session")
def metrics_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    """The tiny model on a tiny cache, shared by the metrics tests; each compares counters before and after its
    own traffic."""
    yield from start_server(tmp_path_factory.mktemp("metrics_server"), *METRICS_FLAGS, model=str(tiny_model_dir),
                            admin_key=ADMIN_KEY)


def start_adapter_server(directory: Path, model_dir: Path) -> Iterator[Server]:
    """The tiny model, with an admin key."""
    yield from start_server(directory, *ADAPTER_FLAGS, model=str(model_dir), admin_key=ADMIN_KEY)


@pytest.fixture(scope="session")
def adapter_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    """Shared by the adapter tests; each uploads adapters under names of its own."""
    yield from start_adapter_server(tmp_path_factory.mktemp("adapter_server"), tiny_model_dir)
