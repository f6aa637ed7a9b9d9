"""The OpenAPI document says what the server really answers, and a fuzzer holds it to that: schemathesis against a
real server over every operation, for a bounded time, with no server error and no response outside the document."""
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Server, start_server
from tests.api.lora_helpers import ADMIN_KEY

FUZZ_SECONDS = 120
# Every check but positive_data_acceptance, which expects any schema-valid body to succeed: the schema cannot say
# that roles must alternate, that an adapter's files must hold an adapter, or that a prompt must fit the context.
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,negative_data_rejection,missing_required_header,unsupported_method,"
          "allow_header_conformance,use_after_free,ensure_resource_availability,ignored_auth")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    yield from start_server(tmp_path_factory.mktemp("fuzz"), "--max-model-len", "256", "--num-kv-blocks", "128",
                            "--max-lora-rank", "16", "--max-adapter-bytes", "256KiB", model=str(tiny_model_dir),
                            admin_key=ADMIN_KEY)


def operations(document: dict) -> dict[str, dict]:
    return {f"{method.upper()} {path}": operation for path, methods in document["paths"].items()
            for method, operation in methods.items()}


def test_the_document_lists_errors_security_and_bodies(fuzz_server):
    document = operations(httpx.get(f"{fuzz_server.url}/openapi.json").json())
    for name in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert {"400", "404", "413", "429", "500", "503"} <= set(document[name]["responses"])
        assert {"application/json", "text/event-stream"} == set(document[name]["responses"]["200"]["content"])
    for name in ("POST /generate", "POST /generate_stream", "POST /"):
        assert {"404", "413", "422", "424", "429", "503"} <= set(document[name]["responses"])
    for name in ("POST /v1/adapters", "DELETE /v1/adapters/{name}", "POST /v1/load_lora_adapter",
                 "POST /v1/unload_lora_adapter"):
        assert document[name]["security"] == [{"adminKey": []}] and "401" in document[name]["responses"]
    assert "security" not in document["GET /v1/adapters"]
    assert set(document["GET /metrics"]["responses"]["200"]["content"]) == {"text/plain"}
    upload = document["POST /v1/adapters"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(upload["required"]) == {"name", "adapter_config.json", "adapter_model.safetensors"}
    assert all("422" not in operation["responses"] for name, operation in document.items() if "/v1/" in name)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(fuzz_server, tmp_path):
    command = [str(Path(sys.executable).parent / "st"), "run", f"{fuzz_server.url}/openapi.json",
               "--header", f"Authorization: Bearer {ADMIN_KEY}", "--checks", CHECKS, "--max-time", str(FUZZ_SECONDS),
               "--workers", "2", "--request-timeout", "30", "--seed", "1", "--no-color"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=FUZZ_SECONDS + 120)
    report = result.stdout[result.stdout.find("FAILURES"):] if "FAILURES" in result.stdout else result.stdout
    assert result.returncode == 0, report[-6000:] + result.stderr[-2000:]
    assert "Traceback" not in fuzz_server.log.read_text()
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200
