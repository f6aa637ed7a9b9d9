"""LoRAX's adapter_source "local" with a path as adapter_id, through the official client: adapters inside the
server's --adapter-roots are served as PEFT answers with them; anything else is refused, saying why (LoRAX's 422
for a location it may not read, 404 for none there; a relative id is an uploaded adapter's name)."""
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from lorax import Client

from tests.api.conftest import ADAPTER_FLAGS, Server, start_server
from tests.api.lora_helpers import ADMIN_KEY, encode, peft_greedy, save_random_adapter

PROMPT = "the quick brown fox"
NUM_TOKENS = 8


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("adapter_root")
    save_random_adapter(tiny_model_dir, root / "team-a" / "support", seed=91)
    save_random_adapter(tiny_model_dir, root.parent / "elsewhere", seed=92)
    return root


@pytest.fixture(scope="module")
def located_server(tmp_path_factory, tiny_model_dir, roots) -> Iterator[Server]:
    yield from start_server(tmp_path_factory.mktemp("located"), *ADAPTER_FLAGS, "--adapter-roots", str(roots),
                            model=str(tiny_model_dir), admin_key=ADMIN_KEY)


def test_an_adapter_named_by_its_path_inside_a_root_answers_as_peft(located_server, roots, tiny_model_dir):
    location = roots / "team-a" / "support"
    expected = peft_greedy(tiny_model_dir, location, encode(tiny_model_dir, PROMPT), NUM_TOKENS)
    lorax = Client(located_server.url, timeout=60, max_session_retries=0)
    for _ in range(2):  # the second finds it copied in already
        response = lorax.generate(PROMPT, adapter_id=str(location), adapter_source="local",
                                  max_new_tokens=NUM_TOKENS, ignore_eos_token=True, details=True)
        assert [token.id for token in response.details.tokens] == expected
    assert len([entry for entry in httpx.get(f"{located_server.url}/v1/adapters").json()["data"]
                if entry["id"].startswith("path-")]) == 1


@pytest.mark.parametrize("location, status, message", [
    ("{root}/../elsewhere", 422, "outside the directories"),
    ("{root}/team-a/missing", 404, "missing"),
    ("team-a/support", 404, "no model or adapter named 'team-a/support'"),
])
def test_other_locations_are_refused(located_server, roots, location, status, message):
    body = {"inputs": PROMPT, "parameters": {"adapter_id": location.format(root=roots), "adapter_source": "local"}}
    response = httpx.post(f"{located_server.url}/generate", json=body, timeout=60)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_a_server_without_roots_reads_no_adapter_by_location(adapter_server, roots):
    body = {"inputs": PROMPT, "parameters": {"adapter_id": str(roots / "team-a" / "support"),
                                             "adapter_source": "local"}}
    response = httpx.post(f"{adapter_server.url}/generate", json=body, timeout=60)
    assert response.status_code == 422 and "--adapter-roots" in response.json()["error"]
