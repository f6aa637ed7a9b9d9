"""LoRA adapters: PEFT format and validation, the on-disk store, the registry with its CPU cache, and the
device slot pool the model reads. Imports `kernels`, never `api`, `engine` or `model`."""
