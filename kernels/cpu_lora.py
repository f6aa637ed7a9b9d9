"""LoRA on the CPU in a fixed number of operations per projection, however many adapters a step uses.

Tokens of small groups (decodes: a token or a few per adapter) are gathered: shrink h = x A[slot]^T and expand
y = h B[slot]^T are written as broadcasts over each token's own slot, which torch.compile (Inductor) turns into
loop nests that read every weight where it lies: one call per projection, no Python loop over slots, and only the
first `rank` rows of each slice (the largest rank among the step's adapters), not the padding. A large group (a prefill chunk) is
better served by plain matrix products, one group at a time; a step has few of those.
"""
import logging
import threading
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

GROUP_MATMUL_ROWS = 16  # a group of at least this many tokens is multiplied as a matrix, not gathered
RECOMPILE_LIMIT = 64


def shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, num_slices: int, max_rank: int,
           rank: int) -> torch.Tensor:
    """x [n, in], lora_a [num_slots, slices * max_rank, in], slots [n] -> [n, slices, rank] in float32."""
    weights = lora_a[slots]  # fused into the reduction by the compiler, never stored
    return torch.stack([(x[:, None, :].float() * weights[:, index * max_rank:index * max_rank + rank].float()).sum(-1)
                        for index in range(num_slices)], 1)


def expand(shrunk: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, slice_bounds: list[tuple[int, int]],
           rank: int, scales: torch.Tensor) -> torch.Tensor:
    """shrunk [n, slices, rank], lora_b [num_slots, out, max_rank], slice_bounds: each slice's output columns
    -> the scaled delta [n, out] in float32."""
    weights = lora_b[slots]
    deltas = [(shrunk[:, index, None, :] * weights[:, start:end, :rank].float()).sum(-1)
              for index, (start, end) in enumerate(slice_bounds)]
    return torch.cat(deltas, 1) * scales[slots][:, None]


def add_gathered(output: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                 lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor, slice_bounds: list[tuple[int, int]],
                 max_rank: int, rank: int) -> None:
    """output[rows] += the deltas of tokens x[rows], token i using slot slots[i]: one compiled call per
    projection (each call costs about 100 microseconds beyond its arithmetic, so shrink and expand share one)."""
    shrunk = shrink(x[rows], lora_a, slots, len(slice_bounds), max_rank, rank)
    output.index_add_(0, rows, expand(shrunk, lora_b, slots, slice_bounds, rank, scales).to(output.dtype))


def allow_specializations() -> None:
    """One specialization per projection shape, token count one or more, and rank: a few dozen at most. The
    compiler's settings are per thread, so each thread that may compile sets it."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


class CompiledLora:
    """`add_gathered`, compiled on a background thread (tens of seconds the first time) while steps use matrix
    products; `get` returns it once ready. If the compiler is missing or fails, it never will."""

    def __init__(self) -> None:
        self.function: Callable[..., None] | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        self._thread_state = threading.local()

    def get(self) -> Callable[..., None] | None:
        """The compiled `add_gathered` if ready, else None; starts compiling on the first call."""
        if not self._started:
            self.start()
        if self.function is not None and not getattr(self._thread_state, "configured", False):
            allow_specializations()  # a new shape compiles on the calling thread
            self._thread_state.configured = True
        return self.function

    def start(self, warm_up: Callable[[Callable[..., None]], None] | None = None) -> None:
        """Compile in the background; `warm_up` then runs the function on the shapes that will come, so their
        specializations compile now rather than in a step."""
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._compile, args=(warm_up,), name="loraserve-lora-compile", daemon=True).start()

    def _compile(self, warm_up: Callable[[Callable[..., None]], None] | None) -> None:
        try:
            allow_specializations()
            function = torch.compile(add_gathered, dynamic=True)
            with torch.inference_mode():
                if warm_up is not None:
                    warm_up(function)
            self.function = function
        except Exception:  # noqa: BLE001 - whatever the compiler lacks, the matrix products still work
            logger.warning("compiling the CPU LoRA kernels failed; adapters use per-adapter matrix products",
                           exc_info=True)
        finally:
            self.done.set()


COMPILED = CompiledLora()
