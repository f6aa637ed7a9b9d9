"""The one typed configuration object, made once at start-up from CLI flags and passed down."""
from dataclasses import dataclass


@dataclass
class ServerConfig:
    """Everything the server needs to know to start; each field is a `loraserve serve` flag."""

    model: str = "embedded"  # "embedded", a Hugging Face directory, or a .gguf file
    served_model_name: str | None = None  # the name clients use; defaults to the model's own name
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "auto"  # auto, cpu or cuda
    dtype: str = "auto"  # auto (bfloat16 on CUDA and for quantized weights on a bf16 CPU, else float32), ...
    quantization: str = "auto"  # auto (a GGUF file's Q4/Q8_0 layers as stored), none, int4 or int8: weight-only
    block_size: int = 16
    num_kv_blocks: int | None = None  # overrides kv_cache_memory when set
    kv_cache_memory: int = 1 << 30  # bytes for the paged KV cache
    max_model_len: int | None = None  # defaults to the model's context length
    max_num_batched_tokens: int = 512  # token budget of one engine step
    max_num_seqs: int = 64  # requests running at once
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs (CUDA only)
    prefix_caching: bool = True  # reuse the KV of full blocks that earlier requests computed
    max_queue: int = 256  # requests waiting before new ones get 429
    max_overtaking_steps: int = 64  # steps others may pass a request waiting for its adapter to load
    seed: int = 0  # seeds sampling of requests that bring no seed
    adapter_dir: str | None = None  # where uploaded adapters persist; None: a temporary directory
    adapter_roots: str | None = None  # comma-separated directories requests may name adapters in by path
    adapter_store: str | None = None  # an fsspec URL (s3://, gs://, file://) of the adapters replicas share
    shared_adapter_dir: bool = False  # other servers use adapter_dir too: take up their uploads and deletes
    max_loras: int = 1024  # adapters resident at once, in pages of adapter_memory
    adapter_memory: int = 4 << 30  # bytes of device memory for resident adapters' weights
    max_cpu_loras: int = 32  # adapters kept loaded in CPU memory (LRU)
    max_lora_rank: int = 64
    max_adapter_bytes: int = 512 << 20  # largest accepted upload
    max_request_bytes: int = 2 << 20  # largest request body (uploads excepted; TGI's default): 413 unread
    spec_tokens: int = 0  # speculative decoding: tokens proposed per step (0: off)
    spec_adaptive: bool = True  # verify only the drafts expected to pay for their rows (else every draft)
    spec_ngram_min: int = 2  # prompt lookup matches suffixes of spec_ngram_min to spec_ngram_max tokens
    spec_ngram_max: int = 4
    draft_model: str | None = None  # propose with this model (same tokenizer) instead of prompt lookup
    medusa_heads: str | None = None  # propose with these Medusa heads (a directory) instead of prompt lookup
    shutdown_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM
    replicas: int = 1  # engine replicas; more than one run as a Ray Serve application (the ray extra)
    replica_routing: str = "adapter"  # replicas: an adapter's requests to a replica holding it, or by load alone
