"""Where adapter files go before they are accepted: uploads are staged inside the adapter directory (a killed
server's leftovers are removed when it starts again), and vLLM's load route checks a path before copying it."""
import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.api.conftest import ADAPTER_FLAGS, start_server
from tests.api.lora_helpers import ADMIN, ADMIN_KEY, save_random_adapter

BOUNDARY = "loraserveboundary"


def begin_upload(url: str, declared_bytes: int) -> socket.socket:
    """Send an upload's headers and its first part, then leave the body unfinished."""
    address = urlsplit(url)
    connection = socket.create_connection((address.hostname, address.port))
    head = (f"POST /v1/adapters HTTP/1.1\r\nHost: {address.netloc}\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {declared_bytes}\r\n\r\n")
    part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nhalf\r\n--{BOUNDARY}\r\n"
            f"Content-Disposition: form-data; name=\"adapter_model.safetensors\"; filename=\"w\"\r\n\r\n")
    connection.sendall(head.encode() + part.encode() + b"\0" * 50_000)
    return connection


def staging_directories(adapter_dir: Path) -> list[Path]:
    return sorted(adapter_dir.glob(".tmp-*"))


def staged_bytes(adapter_dir: Path) -> int:
    """Bytes written so far under the staging directories (the directory appears before its first file)."""
    return sum(path.stat().st_size for path in adapter_dir.glob(".tmp-*/**/*") if path.is_file())


def test_an_upload_cut_by_kill_9_is_cleaned_at_the_next_start(tmp_path, tiny_model_dir):
    servers = start_server(tmp_path, *ADAPTER_FLAGS, model=str(tiny_model_dir), admin_key=ADMIN_KEY)
    server = next(servers)
    connection = begin_upload(server.url, 200_000)
    deadline = time.monotonic() + 10
    while not staged_bytes(server.adapter_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert staged_bytes(server.adapter_dir), "the upload's first bytes are on disk"
    [staging] = staging_directories(server.adapter_dir)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    connection.close()
    servers.close()
    assert staging.exists()
    restarted = start_server(tmp_path, *ADAPTER_FLAGS, model=str(tiny_model_dir), admin_key=ADMIN_KEY)
    next(restarted)
    try:
        assert not staging.exists() and staging_directories(server.adapter_dir) == []
    finally:
        restarted.close()


@pytest.fixture
def adapter_on_server(tiny_model_dir, tmp_path) -> Path:
    return save_random_adapter(tiny_model_dir, tmp_path / "on-server", seed=21, rank=4)


def load(url: str, path: Path | str) -> httpx.Response:
    return httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "from-path", "lora_path": str(path)},
                      headers=ADMIN, timeout=60)


def contents(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*"))


def test_a_link_out_of_the_folder_is_refused_before_anything_is_copied(adapter_server, adapter_on_server):
    before = contents(adapter_server.adapter_dir)
    weights = adapter_on_server / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to("/proc/self/mem")
    response = load(adapter_server.url, adapter_on_server)
    assert response.status_code == 400 and "no link leading out" in response.json()["error"]["message"]
    assert contents(adapter_server.adapter_dir) == before
    assert httpx.get(f"{adapter_server.url}/health").status_code == 200


def test_the_size_limit_applies_to_loads(adapter_server, adapter_on_server):
    """The test server accepts 256 KiB; these weights are larger (and would not validate either)."""
    before = contents(adapter_server.adapter_dir)
    (adapter_on_server / "adapter_model.safetensors").write_bytes(b"\0" * (300 << 10))
    response = load(adapter_server.url, adapter_on_server)
    assert response.status_code == 413 and "accepts 262144" in response.json()["error"]["message"]
    assert contents(adapter_server.adapter_dir) == before


def test_an_invalid_adapter_is_refused_where_it_lies(adapter_server, adapter_on_server):
    before = contents(adapter_server.adapter_dir)
    (adapter_on_server / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    response = load(adapter_server.url, adapter_on_server)
    assert response.status_code == 400
    assert contents(adapter_server.adapter_dir) == before
