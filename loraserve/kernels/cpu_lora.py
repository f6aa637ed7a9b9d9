"""LoRA on the CPU in a bounded number of operations per projection, however many adapters a step uses.

Tokens of small groups (decodes: a token or a few per adapter, at small rank) are gathered: shrink h = x A^T and
expand y = h B^T are written as broadcasts over each token's own pages, which torch.compile (Inductor) turns into
loop nests that read every weight where it lies: one call per projection and rank bucket, no Python loop over slots, and no more
pages per token than the largest rank in its bucket. A large group (a prefill chunk, or a few tokens at a large
rank) is better served by plain matrix products, one group at a time.
"""
import logging
import threading
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

# A group with at least this many tokens times rank is multiplied as a matrix (a fixed ~200 us, then near the
# machine's peak), not gathered (~100 us a call, then a few GFLOP/s): 4 tokens at rank 64, 32 at rank 8.
GROUP_MATMUL_WORK = 256
RANK_BUCKETS = (16, 32, 64)  # gathered groups are split by rank, so few tokens run at a rank far above their own
RECOMPILE_LIMIT = 64
# The intra-op threads the steps use, read at start-up: the code Inductor generates is parallel for as many
# threads as the compiling thread is allowed, and helper threads (the adapter loader) are held to one.
STEP_THREADS = torch.get_num_threads()


def add_gathered(output: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                 lora_a: torch.Tensor, lora_b: torch.Tensor, slot_pages: torch.Tensor,
                 slice_bounds: list[tuple[int, int]], rank: int) -> None:
    """output[rows] += the deltas of tokens x[rows], token i using slot slots[i]: each token's first `rank` pages
    (the zero page past its own rank), gathered inside the loops rather than copied. lora_a [pages, slices, in],
    lora_b [pages, out]; accumulates in float32. One call per projection: each costs about 100 microseconds
    beyond its arithmetic, so shrink and expand share one."""
    pages = slot_pages[slots, :rank]  # [n, rank]
    shrunk = (x[rows][:, None, None, :].float() * lora_a[pages].float()).sum(-1)  # [n, rank, slices]
    weights = lora_b[pages].float()  # [n, rank, out]
    deltas = [(shrunk[:, :, index, None] * weights[:, :, start:end]).sum(1)
              for index, (start, end) in enumerate(slice_bounds)]
    output.index_add_(0, rows, torch.cat(deltas, 1).to(output.dtype))


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
            torch.set_num_threads(STEP_THREADS)
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
