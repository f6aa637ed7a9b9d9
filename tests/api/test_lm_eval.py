"""lm-evaluation-harness against a real server: its `local-completions` model (echo with logprobs over HTTP) gives
the figures of its `hf` model (transformers; PEFT for an adapter) on the same weights, for a multiple-choice task
and a rolling-loglikelihood (perplexity) task of our own."""
import json
from pathlib import Path

import pytest

from tests.api.lora_helpers import save_random_adapter, upload

pytestmark = pytest.mark.slow

ADAPTER = "lm-eval-adapter"
BOS = 1  # what lm-eval's hf model puts first (its tokenizer's default), told to local-completions too
QUESTIONS = [
    ("the quick brown", ["fox", "dog", "hello"], 0),
    ("hello world, hello", ["there", "keys", "lazy"], 0),
    ("paged attention caches", ["keys", "fox jumps", "world"], 0),
    ("the lazy", ["dog", "brown fox", "attention"], 0),
]
TEXTS = ["the quick brown fox jumps over the lazy dog. hello world, hello there.",
         "paged attention caches keys, and hello there says the quick brown fox to the lazy dog " * 3]


def write_tasks(directory: Path) -> Path:
    """A multiple-choice task and a loglikelihood_rolling task, each over a local JSON-lines file."""
    choice_file, text_file = directory / "choice.jsonl", directory / "text.jsonl"
    choice_file.write_text("".join(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n"
                                   for question, choices, answer in QUESTIONS))
    text_file.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    common = "dataset_path: json\ntest_split: test\n"
    (directory / "choice.yaml").write_text(
        f"task: loraserve_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {choice_file}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ' '\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "rolling.yaml").write_text(
        f"task: loraserve_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {text_file}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return directory


def evaluate(model: str, model_args: dict, tasks: Path) -> dict[str, float]:
    from lm_eval import simple_evaluate  # imported here: it takes seconds, for the slow suite only
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=model, model_args=model_args, tasks=["loraserve_choice", "loraserve_rolling"],
                              task_manager=TaskManager(include_path=str(tasks)), batch_size=1, device="cpu",
                              log_samples=True)
    figures = {f"{task}/{name}": value for task, metrics in results["results"].items()
               for name, value in metrics.items() if isinstance(value, float) and "stderr" not in name}
    figures |= {f"loglikelihood/{index}/{choice}": response[0][0]
                for index, sample in enumerate(results["samples"]["loraserve_choice"])
                for choice, response in enumerate(sample["resps"])}
    return figures


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
def test_local_completions_equal_the_hf_model(adapter_server, tiny_model_dir, tmp_path, monkeypatch,
                                              adapter) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_tasks(tmp_path)
    peft = {}
    name = ""
    if adapter:
        adapter_dir = save_random_adapter(tiny_model_dir, tmp_path / "adapter", seed=90, rank=8)
        assert upload(adapter_server.url, ADAPTER, adapter_dir).status_code == 201
        peft, name = {"peft": str(adapter_dir)}, ADAPTER
    served = evaluate("local-completions", {
        "base_url": f"{adapter_server.url}/v1/completions", "model": name, "tokenizer": str(tiny_model_dir),
        "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": 200, "max_retries": 1,
        "num_concurrent": 1, "add_bos_token": True, "custom_prefix_token_id": BOS}, tasks)
    local = evaluate("hf", {"pretrained": str(tiny_model_dir), "dtype": "float32", "max_length": 200, **peft}, tasks)
    assert served.keys() == local.keys() and len(served) > 6
    assert served == pytest.approx(local, rel=1e-4)
