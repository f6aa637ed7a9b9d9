"""Finding the requests behind a failed step, so that only they end and everyone else keeps being served.

When a batch raises, it is tried again in halves, in batch order, down to single requests: a request that fails
alone is a culprit; every group that succeeds is served as if nothing happened. A batch of n requests with one
culprit costs about 2 log2(n) extra attempts, once. Errors that leave the device unusable are not isolated:
they propagate, and the engine stops.
"""
import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from loraserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Raised by a CUDA (or other accelerator) error: the context may be corrupt, so no later step can be trusted.
DEVICE_ERRORS: tuple[type[BaseException], ...] = (torch.AcceleratorError,)


def is_device_fatal(error: BaseException) -> bool:
    """Whether `error` means the device itself failed (no request to blame, nothing to retry)."""
    return isinstance(error, DEVICE_ERRORS) or (isinstance(error, RuntimeError) and "CUDA error" in str(error))


def isolate(items: list[T], attempt: Callable[[list[T]], None], undo: Callable[[list[T]], None],
            on_culprit: Callable[[T, Exception], None]) -> int:
    """Call `attempt(items)`; if it raises, `undo(items)` and attempt each half in turn, down to single items.
    `on_culprit` gets each item that fails alone, before any later item is attempted. Returns how many attempts
    failed. Device errors propagate at once."""
    try:
        attempt(items)
        return 0
    except Exception as error:
        if is_device_fatal(error):
            raise
        undo(items)
        if len(items) == 1:
            on_culprit(items[0], error)
            return 1
        logger.warning("a group of %d requests failed (%s: %s); retrying it in halves", len(items),
                       type(error).__name__, error)
    middle = len(items) // 2
    return 1 + sum(isolate(half, attempt, undo, on_culprit) for half in (items[:middle], items[middle:]))


class GeneratorSnapshot:
    """The random state of sampled requests before an attempt: a failed attempt may have drawn from it, and a
    seeded request must draw the same tokens whether or not a neighbour failed."""

    def __init__(self, sequences: list[Sequence]) -> None:
        self.states = {id(sequence): sequence.generator.get_state() for sequence in sequences}

    def restore(self, sequences: Iterable[Sequence]) -> None:
        for sequence in sequences:
            if id(sequence) in self.states:
                sequence.generator.set_state(self.states[id(sequence)])
