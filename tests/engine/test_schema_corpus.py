"""A hundred generated JSON schemas of varied shape (nested objects, arrays, enums, bounded integers, booleans,
bounded strings, optional fields), each with the base model and with an adapter: every answer sampled at
temperature 1 validates, and greedy answers are equal with and without speculation. The tiny random model picks
almost any token, so only the grammar keeps the answers valid."""
import json
import random
from pathlib import Path

import jsonschema
import pytest
import torch

from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.grammar import GrammarSpec
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import load_model
from tests.api.lora_helpers import save_random_adapter
from tests.model.helpers import save_tiny_llama

NUM_SCHEMAS = 100
WORDS = ["fox", "dog", "red", "blue", "hello", "keys"]


def leaf(generator: random.Random) -> dict:
    kind = generator.choice(["integer", "enum", "boolean", "string", "array"])
    if kind == "integer":
        low = generator.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + generator.randint(0, 200)}
    if kind == "enum":
        return {"enum": generator.sample(WORDS, generator.randint(1, 4))}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "string":
        return {"type": "string", "maxLength": generator.randint(0, 6)}
    return {"type": "array", "items": leaf_without_arrays(generator), "minItems": generator.randint(0, 2),
            "maxItems": generator.randint(2, 4)}


def leaf_without_arrays(generator: random.Random) -> dict:
    schema = leaf(generator)
    return schema if schema.get("type") != "array" else {"type": "boolean"}


def make_schema(generator: random.Random, depth: int = 0) -> dict:
    """An object of 1-4 properties, some optional, some of them objects in turn (two levels at most)."""
    names = generator.sample(["name", "age", "tags", "owner", "ok", "colour", "count", "note"], generator.randint(1, 4))
    properties = {name: make_schema(generator, depth + 1) if depth < 2 and generator.random() < 0.25
                  else leaf(generator) for name in names}
    required = [name for name in names if generator.random() < 0.7]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("corpus")
    model_dir = save_tiny_llama(directory / "model", seed=8, max_position_embeddings=1024)
    return model_dir, save_random_adapter(model_dir, directory / "adapter", seed=9, rank=8)


def engine_for(model_dir: Path, adapter_dir: Path, tmp_path: Path, **settings) -> LLMEngine:
    engine = LLMEngine(load_model(str(model_dir), torch.device("cpu"), torch.float32),
                       ServerConfig(block_size=16, num_kv_blocks=2048, max_num_seqs=256, max_loras=2,
                                    adapter_dir=str(tmp_path / "registry"), **settings))
    engine.adapters.add_from_path("adapter", adapter_dir)
    return engine


def answers(engine: LLMEngine, schemas: list[dict], temperature: float) -> dict[tuple[int, bool], str]:
    """Every schema with the base and with the adapter, all at once; the answers' text by (schema, adapter)."""
    prompt = engine.tokenizer.encode('answer in JSON: {"name": "fox", "tags": ["red"]}')
    for index, schema in enumerate(schemas):
        spec = GrammarSpec("json_schema", json.dumps(schema))
        for adapted in (False, True):
            params = SamplingParams(max_tokens=900, temperature=temperature, seed=index, grammar=spec)
            engine.add_request(f"{index}-{adapted}", prompt, params,
                               engine.adapters.resolve("adapter") if adapted else None)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.error is None and output.finish_reason in (None, "stop"), output
            tokens.setdefault(output.request_id, []).extend(output.token_ids)
    return {(int(key.split("-")[0]), key.endswith("True")): engine.tokenizer.decode(value)
            for key, value in tokens.items()}


def test_sampled_answers_validate_and_greedy_ones_ignore_speculation(setup, tmp_path) -> None:
    generator = random.Random(2026)
    schemas = [make_schema(generator) for _ in range(NUM_SCHEMAS)]
    model_dir, adapter_dir = setup
    sampled = answers(engine_for(model_dir, adapter_dir, tmp_path / "a"), schemas, temperature=1.0)
    assert len(sampled) == 2 * NUM_SCHEMAS
    for (index, _), text in sampled.items():
        jsonschema.validate(json.loads(text), schemas[index])
    plain = answers(engine_for(model_dir, adapter_dir, tmp_path / "b"), schemas, temperature=0.0)
    speculating = engine_for(model_dir, adapter_dir, tmp_path / "c", spec_tokens=4,
                             spec_adaptive=False)  # every draft verified
    assert answers(speculating, schemas, temperature=0.0) == plain
    assert speculating.metrics.spec_draft_tokens._value.get() > 0
    assert plain[(0, False)] != plain[(0, True)] or plain[(1, False)] != plain[(1, True)]  # the adapter counts
