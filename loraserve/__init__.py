"""loraserve: one base LLM served with many LoRA adapters. Data flows one way: api -> engine -> model -> kernels,
and engine -> adapters -> kernels (docs/ARCHITECTURE.md)."""
