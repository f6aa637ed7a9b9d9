"""LoRA adapters: format, validation, registry and slot pool (arrives with the multi-LoRA issue)."""
