"""The `loraserve` command: `loraserve serve` loads the model and serves HTTP until interrupted.

Each `ServerConfig` field is a flag of the same name (underscores become dashes), so a new field only needs its
help text here.
"""
import argparse
import asyncio
import dataclasses
import logging
import re
import typing
from collections.abc import Callable

import uvicorn

from loraserve.config import ServerConfig

if typing.TYPE_CHECKING:  # torch loads only when serving
    from loraserve.engine.async_engine import AsyncEngine

HELP = {
    "model": "'embedded' (the bundled SmolLM2-135M-Instruct), a Hugging Face model directory, or a .gguf file",
    "served_model_name": "the model name clients send and see (default: the model's own name)",
    "host": "address to listen on",
    "port": "port to listen on (0 picks a free one; the ready line tells which)",
    "device": "where the model runs; auto picks cuda when available",
    "dtype": "activation, float weight and KV-cache precision; auto is bfloat16 on CUDA, and on a CPU with native "
             "bfloat16 when weights are quantized, else float32 (--dtype float32 is the exact reference path)",
    "quantization": "weight-only quantization of the layers' projections: auto serves a GGUF file's Q4_0/Q4_1 "
                    "layers as int4 and Q8_0 ones as int8, as they are, on a CPU (unless --dtype float32); int4 or "
                    "int8 quantize on load (CPU or CUDA); none dequantizes",
    "block_size": "tokens per KV-cache block",
    "num_kv_blocks": "KV-cache blocks to allocate; overrides --kv-cache-memory",
    "kv_cache_memory": "memory for the KV cache: bytes, or a size such as 512MiB or 2GiB",
    "max_model_len": "longest prompt plus output, in tokens (default: the model's context, capped by the cache)",
    "max_num_batched_tokens": "token budget of one engine step (prefill chunks and decodes together)",
    "max_num_seqs": "requests running at once",
    "cuda_graphs": "capture decode steps of up to --max-num-seqs requests as CUDA graphs at start-up and replay "
                   "them (CUDA only; --no-cuda-graphs runs every step eagerly)",
    "prefix_caching": "reuse the KV-cache blocks of prompt prefixes earlier requests computed (same adapter version)",
    "max_queue": "requests allowed to wait; beyond that new ones get HTTP 429",
    "max_overtaking_steps": "while a request waits for its adapter to be loaded, runnable requests behind it go "
                            "first for at most this many steps; then nobody passes it until it runs",
    "seed": "seeds the sampling of requests that bring no seed of their own",
    "adapter_dir": "directory where uploaded LoRA adapters persist across restarts (default: a temporary one)",
    "adapter_roots": "comma-separated directories and object-store URLs inside which LoRAX requests may name an "
                     "adapter by its location (adapter_source 'local' with a path, 's3' with an s3:// URL); it is "
                     "copied in and checked like an upload, again when its files change (default: none, adapters "
                     "are uploaded)",
    "adapter_store": "an object store that several servers (replicas) share for adapters, as an fsspec URL "
                     "(s3://bucket/adapters, gs://..., file:///mnt/adapters; s3fs or gcsfs installed for those): "
                     "uploads are written there, each server reads what it serves into --adapter-dir, and new "
                     "versions and deletes reach every server",
    "shared_adapter_dir": "other servers (replicas) use --adapter-dir too, as on a ReadWriteMany volume: each "
                          "request takes up the newest version any of them placed, a delete reaches all, and none "
                          "tidies away what another may still use",
    "replicas": "engine replicas: more than one run on a local Ray cluster (pip install 'loraserve[ray]') behind "
                "this address, each request sent to a replica that holds its adapter (Ray Serve's model "
                "multiplexing); they share --adapter-dir",
    "replica_routing": "with --replicas: 'adapter' sends each request to a replica that holds its adapter (the "
                       "least busy one otherwise); 'load' sends every request to the least busy replica, so every "
                       "replica loads every adapter (for comparison)",
    "max_loras": "adapters resident at once (each takes as many pages of --adapter-memory as its rank); others "
                 "are loaded as requests need them",
    "adapter_memory": "memory for resident adapters' weights: bytes, or a size such as 4GiB (one page per rank "
                      "component; --max-loras bounds the count too)",
    "max_cpu_loras": "adapters kept loaded in CPU memory, least recently used evicted first",
    "max_lora_rank": "largest LoRA rank accepted",
    "max_adapter_bytes": "largest adapter upload accepted: bytes, or a size such as 256MiB",
    "max_request_bytes": "largest request body accepted (adapter uploads have their own limit); larger ones get "
                         "413 before they are read",
    "spec_tokens": "speculative decoding: tokens proposed per step and verified in one forward pass (0: off)",
    "spec_adaptive": "speculative decoding: verify only the drafts expected to pay for the rows they add, from how "
                     "often each request's drafts held and what a row costs in recent steps; --no-spec-adaptive "
                     "verifies every draft",
    "spec_ngram_min": "prompt lookup: shortest suffix of the output matched against the prompt and output",
    "spec_ngram_max": "prompt lookup: longest suffix matched (longer matches are tried first)",
    "draft_model": "propose with this smaller model (Hugging Face directory or .gguf, same tokenizer) instead of "
                   "prompt lookup; needs --spec-tokens",
    "medusa_heads": "propose with Medusa heads trained for the model (a directory of config.json and "
                    "medusa_lm_head.safetensors, as Medusa and LoRAX save them) instead of prompt lookup; needs "
                    "--spec-tokens, at most one per head",
    "shutdown_timeout": "seconds running requests get to finish after SIGTERM before they are stopped; new "
                        "requests get 503 meanwhile",
}
CHOICES = {"device": ("auto", "cpu", "cuda"), "dtype": ("auto", "float32", "bfloat16", "float16"),
           "quantization": ("auto", "none", "int4", "int8"), "replica_routing": ("adapter", "load")}
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30,
              "t": 2**40, "tib": 2**40}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
FINAL_EVENTS_GRACE_S = 5.0
EXIT_ENGINE_DEAD = 3  # the exit status after the engine failed for good (2 is argparse's usage error)
logger = logging.getLogger("loraserve")


def parse_size(text: str) -> int:
    """A byte count from '1073741824', '512MiB', '2GiB' or '1.5g' (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB, 2GiB or a number of bytes)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


PARSERS: dict[str, Callable[[str], object]] = {"kv_cache_memory": parse_size, "max_adapter_bytes": parse_size,
                                               "max_request_bytes": parse_size, "adapter_memory": parse_size}


def flag_type(field: dataclasses.Field) -> Callable[[str], object]:
    """The parser of a config field's flag: its own if it has one, else its type without `| None`."""
    if field.name in PARSERS:
        return PARSERS[field.name]
    types = [kind for kind in typing.get_args(field.type) if kind is not type(None)]
    return types[0] if types else field.type


def flag_options(field: dataclasses.Field) -> dict[str, object]:
    """`add_argument` settings of a config field's flag; a boolean gets a `--no-` form to turn it off."""
    shown_default = "" if field.default is None else " (default: %(default)s)"
    options: dict[str, object] = {"default": field.default, "help": HELP[field.name] + shown_default}
    if field.type is bool:
        return options | {"action": argparse.BooleanOptionalAction}
    return options | {"type": flag_type(field), "choices": CHOICES.get(field.name)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve", description="Serve a Llama-family model and many LoRA adapters over "
        "OpenAI-compatible (/v1/completions, /v1/chat/completions) and LoRAX-compatible (/generate) HTTP APIs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve", help="load the model and serve HTTP until interrupted",
        description="Load the model, then serve HTTP; prints 'loraserve ready: http://HOST:PORT' once it accepts "
        "connections.")
    for field in dataclasses.fields(ServerConfig):
        serve_parser.add_argument("--" + field.name.replace("_", "-"), **flag_options(field))
    serve_parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                              help="logging verbosity (default: %(default)s)")
    serve_parser.set_defaults(run=serve)
    return parser


def config_from(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(ServerConfig)})


class DrainingServer(uvicorn.Server):
    """uvicorn, except that on SIGTERM the engine drains before uvicorn closes connections: uvicorn would cancel
    streams mid-write once its own timeout passed, while a drained engine ends each one with an error event."""

    def __init__(self, config: uvicorn.Config, engine: "AsyncEngine", shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: list | None = None) -> None:
        await self.engine.drain(self.shutdown_timeout)
        await super().shutdown(sockets)

    def stop_engine_dead(self) -> None:
        """The engine stopped for good: shut down as on SIGTERM, and `serve` exits non-zero so a supervisor
        restarts the process (/health answers 503 meanwhile)."""
        logger.critical("the engine stopped after an unrecoverable error; exiting so the server is restarted")
        self.should_exit = True


async def serve_until_stopped(server: uvicorn.Server, host: str) -> None:
    """Run uvicorn; announce the address on stdout once it accepts connections."""
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"loraserve ready: http://{host}:{port}", flush=True)
    await serving


def serve(args: argparse.Namespace) -> None:
    # Imported here so `loraserve --help` answers without loading torch.
    from loraserve.api.app import create_app
    from loraserve.api.auth import ADMIN_KEY_VARIABLE, admin_key_from_environment
    from loraserve.engine.async_engine import AsyncEngine
    from loraserve.metrics import Metrics

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from(args)
    admin_key = admin_key_from_environment()
    if admin_key is None:
        logger.warning("%s is not set: anyone who can reach the server may upload, load and delete adapters",
                       ADMIN_KEY_VARIABLE)
    if config.replicas > 1:
        from loraserve.scaleout.local import serve_replicas
        return serve_replicas(config, admin_key)
    metrics = Metrics()
    engine = AsyncEngine.from_config(config, metrics)
    app = create_app(engine, metrics, config, admin_key)
    # log_config=None: uvicorn logs through the root logger to stderr; stdout carries only the ready line.
    # After the drain only final events are left to send; the grace bound covers a client that stops reading.
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                                           log_config=None, timeout_graceful_shutdown=FINAL_EVENTS_GRACE_S),
                            engine, config.shutdown_timeout)
    engine.on_dead = server.stop_engine_dead
    asyncio.run(serve_until_stopped(server, config.host))
    if not engine.healthy:
        raise SystemExit(EXIT_ENGINE_DEAD)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
