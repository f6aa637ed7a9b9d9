"""The adapter admin routes: upload, list, show, delete, vLLM's load and unload, the admin key, and every bad
upload refused with a 4xx JSON error that leaves nothing on disk."""
import json
import tempfile
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save

from tests.api.lora_helpers import ADMIN, ADMIN_KEY, ALL_TARGETS, delete, save_random_adapter, upload

pytestmark = pytest.mark.slow

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def good_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return save_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("routes") / "good", seed=7)


def files_on_disk(server) -> list[Path]:
    return sorted(path.relative_to(server.adapter_dir) for path in server.adapter_dir.rglob("*"))


def assert_json_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


def test_upload_list_show_replace_and_delete(adapter_server, good_adapter):
    url = adapter_server.url
    created = upload(url, "routes-a", good_adapter)
    assert created.status_code == 201, created.text
    record = created.json()
    assert (record["id"], record["object"], record["version"], record["rank"]) == ("routes-a", "adapter", 1, 8)
    assert record["targets"] == ALL_TARGETS and record["size_bytes"] > 0
    assert upload(url, "routes-a", good_adapter).json()["version"] == 2
    assert "routes-a" in [adapter["id"] for adapter in httpx.get(f"{url}/v1/adapters").json()["data"]]
    assert httpx.get(f"{url}/v1/adapters/routes-a").json()["version"] == 2
    assert sorted((adapter_server.adapter_dir / "routes-a").iterdir()) == [adapter_server.adapter_dir / "routes-a/v2"]
    assert delete(url, "routes-a").json() == {"id": "routes-a", "object": "adapter", "deleted": True}
    assert not (adapter_server.adapter_dir / "routes-a").exists()
    assert_json_error(httpx.get(f"{url}/v1/adapters/routes-a"), 404)
    assert_json_error(delete(url, "routes-a"), 404)
    completion = httpx.post(f"{url}/v1/completions", json={"model": "routes-a", "prompt": "hello"}, timeout=60)
    assert assert_json_error(completion, 404)["param"] == "model"


def test_vllm_load_and_unload(adapter_server, good_adapter):
    url = adapter_server.url
    before = sorted(good_adapter.iterdir())
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "vllm-a", "lora_path": str(good_adapter)},
                        headers=ADMIN, timeout=60)
    assert loaded.status_code == 200 and loaded.headers["content-type"].startswith("text/plain")
    assert sorted(good_adapter.iterdir()) == before  # copied, not moved
    answer = httpx.post(f"{url}/v1/completions", json={"model": "vllm-a", "prompt": "hello", "max_tokens": 2},
                        timeout=60)
    assert answer.status_code == 200
    unloaded = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "vllm-a"}, headers=ADMIN, timeout=60)
    assert unloaded.status_code == 200
    assert_json_error(httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "vllm-a"}, headers=ADMIN), 404)
    # Whatever lies at a path that holds no adapter, the answer is the same: it tells nothing of the server's files.
    answers = [assert_json_error(httpx.post(f"{url}/v1/load_lora_adapter", headers=ADMIN,
                                            json={"lora_name": "vllm-b", "lora_path": path}), 400)["message"]
               for path in (str(good_adapter.parent / "nowhere"), "/etc", "/etc/passwd", "/proc/self/mem")]
    assert len(set(answers)) == 1


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
    ("DELETE", "/v1/adapters/x", None),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_KEY}])
def test_admin_routes_need_the_key(adapter_server, method, path, body, headers):
    response = httpx.request(method, adapter_server.url + path, json=body, headers=headers)
    assert assert_json_error(response, 401)["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"


def test_reading_needs_no_key(adapter_server):
    assert httpx.get(f"{adapter_server.url}/v1/adapters").status_code == 200


def test_the_cli_warns_when_no_admin_key_is_set(server, adapter_server):
    assert "LORASERVE_ADMIN_KEY is not set" in server.log.read_text()
    assert "LORASERVE_ADMIN_KEY is not set" not in adapter_server.log.read_text()


def good_files(adapter_dir: Path) -> dict[str, bytes]:
    return {CONFIG: (adapter_dir / CONFIG).read_bytes(), WEIGHTS: (adapter_dir / WEIGHTS).read_bytes()}


def with_config(adapter_dir: Path, **changes: object) -> dict[str, bytes]:
    config = json.loads((adapter_dir / CONFIG).read_text()) | changes
    return good_files(adapter_dir) | {CONFIG: json.dumps(config).encode()}


def with_transposed_tensor(adapter_dir: Path) -> dict[str, bytes]:
    tensors = load_file(adapter_dir / WEIGHTS)
    name = next(name for name in tensors if "q_proj.lora_A" in name)
    tensors[name] = tensors[name].T.contiguous()
    return good_files(adapter_dir) | {WEIGHTS: save(tensors)}


def with_pickled_weights(adapter_dir: Path) -> dict[str, bytes]:
    path = adapter_dir.parent / "adapter_model.bin"
    torch.save(load_file(adapter_dir / WEIGHTS), path)
    return {CONFIG: (adapter_dir / CONFIG).read_bytes(), "adapter_model.bin": path.read_bytes()}


def large_rank_files(adapter_dir: Path) -> dict[str, bytes]:
    """Rank 32 over the server's --max-lora-rank 16; only q_proj, so the files stay under the size limit."""
    model_dir = Path(json.loads((adapter_dir / CONFIG).read_text())["base_model_name_or_path"])
    return good_files(save_random_adapter(model_dir, adapter_dir.parent / "rank32", 1, rank=32, targets=["q_proj"]))


BAD_UPLOADS = {  # case: (name, files, headers, status)
    "corrupt safetensors": lambda d: ("bad", good_files(d) | {WEIGHTS: b"\x10\x00\x00\x00\x00\x00\x00\x00{}"}, ADMIN,
                                      400),
    "wrong shapes": lambda d: ("bad", with_transposed_tensor(d), ADMIN, 400),
    "rank too large": lambda d: ("bad", large_rank_files(d), ADMIN, 413),
    "unknown targets": lambda d: ("bad", with_config(d, target_modules=["embed_tokens"]), ADMIN, 400),
    "kind not served": lambda d: ("bad", with_config(d, peft_type="IA3"), ADMIN, 400),
    "prompt tuning of another task": lambda d: ("bad", with_config(d, peft_type="PROMPT_TUNING", task_type="SEQ_CLS",
                                                                   num_virtual_tokens=4), ADMIN, 400),
    "pickled weights": lambda d: ("bad", with_pickled_weights(d), ADMIN, 400),
    "traversal name": lambda d: ("../x", good_files(d), ADMIN, 400),
    "slash in name": lambda d: ("a/b", good_files(d), ADMIN, 400),
    "empty name": lambda d: ("", good_files(d), ADMIN, 400),
    "oversized": lambda d: ("bad", good_files(d) | {WEIGHTS: bytes(300 * 1024)}, ADMIN, 413),
    "missing config": lambda d: ("bad", {WEIGHTS: good_files(d)[WEIGHTS]}, ADMIN, 400),
    "unexpected file": lambda d: ("bad", good_files(d) | {"run.sh": b"echo hi"}, ADMIN, 400),
    "wrong key": lambda d: ("bad", good_files(d), {"Authorization": "Bearer wrong"}, 401),
    "missing auth": lambda d: ("bad", good_files(d), {}, 401),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_uploads_are_refused_and_leave_nothing(adapter_server, good_adapter, case):
    name, files, headers, status = BAD_UPLOADS[case](good_adapter)
    before = files_on_disk(adapter_server)
    form = {file: (file, content) for file, content in files.items()}
    response = httpx.post(f"{adapter_server.url}/v1/adapters", data={"name": name}, files=form, headers=headers,
                          timeout=60)
    assert_json_error(response, status)
    assert files_on_disk(adapter_server) == before
    assert not list(Path(tempfile.gettempdir()).glob("loraserve-upload-*"))
    assert httpx.get(f"{adapter_server.url}/v1/adapters/bad").status_code == 404
    still = httpx.post(f"{adapter_server.url}/v1/completions", json={"prompt": "hello", "max_tokens": 1}, timeout=60)
    assert still.status_code == 200


def test_an_upload_must_be_a_complete_form(adapter_server):
    url = f"{adapter_server.url}/v1/adapters"
    assert_json_error(httpx.post(url, json={"name": "x"}, headers=ADMIN), 400)
    assert_json_error(httpx.post(url, files={CONFIG: (CONFIG, b"{}")}, headers=ADMIN), 400)  # no name
    truncated = httpx.post(url, content=b"--cut\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nx",
                           headers=ADMIN | {"content-type": "multipart/form-data; boundary=cut"})
    assert_json_error(truncated, 400)
