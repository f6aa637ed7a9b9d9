"""Every request field the official clients can send is served or refused, never accepted and ignored: each field
of openai's chat and completion parameters, and of lorax-client's, that our schema does not serve gets a 400
(LoRAX: 422) that names it when set to a value that asks for something. The clients' own field lists make the
audit: a field a new client version adds is checked the day it appears."""
import httpx
import pytest
from lorax.types import Parameters
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from loraserve.api.lorax_schemas import GenerateParameters
from loraserve.api.openai_schemas import ChatCompletionRequest, CompletionRequest

PROBE = {"probe": [1, "x"]}  # asks for something whatever the field means: no field's neutral value


def typed_dict_keys(params: type) -> set[str]:
    return set(params.__required_keys__ | params.__optional_keys__)


def served(schema: type) -> set[str]:
    return {field.alias or name for name, field in schema.model_fields.items()}


CASES = [(name, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
         for name in sorted(typed_dict_keys(chat_create_params.CompletionCreateParamsBase)
                            - served(ChatCompletionRequest))]
CASES += [(name, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
          for name in sorted(typed_dict_keys(completion_create_params.CompletionCreateParamsBase)
                             - served(CompletionRequest))]
CASES += [(name, "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}})
          for name in sorted(set(Parameters.model_fields) - served(GenerateParameters))]


def test_the_audit_covers_the_fields_we_leave_out() -> None:
    """The clients' lists are read (not empty) and what we leave out is what we mean to: features not served."""
    left_out = {name for name, _, _ in CASES}
    assert {"logit_bias", "functions", "suffix", "best_of", "typical_p", "watermark", "audio"} <= left_out
    assert not {"tools", "tool_choice", "response_format", "seed", "stop"} & left_out


@pytest.mark.parametrize("name, route, body", CASES, ids=[f"{route} {name}" for name, route, _ in CASES])
def test_a_field_we_do_not_serve_is_refused_by_name(server, name: str, route: str, body: dict) -> None:
    if route == "/generate":
        body = {**body, "parameters": {**body["parameters"], name: PROBE}}
    else:
        body = {**body, name: PROBE}
    response = httpx.post(f"{server.url}{route}", json=body, timeout=60)
    if route == "/generate":  # LoRAX's (TGI's) shape: 422 and the message as a string
        assert response.status_code == 422 and name in response.json()["error"], response.text
    else:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert name in f"{error['message']} {error.get('param')}"
