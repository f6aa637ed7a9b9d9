"""Brings adapters into device slots on a background thread, so the engine step never waits for a disk read or a
copy: a queued request asks for its adapter (`want`), and becomes admissible once the adapter is resident.

Adapters are brought in in the order they were first asked for; many requests for one adapter load it once. When
every slot is held by running requests the loader sleeps until a slot is released (`wake`).
"""
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from loraserve.adapters.errors import AdapterError, AdapterNotFoundError
from loraserve.intra_op_threads import hold_helper_to_one_thread

logger = logging.getLogger(__name__)


class AdapterLoader:
    """`make_resident(key, evict_wanted)` loads and places one adapter (True, or False while no slot can be had,
    taking only slots of adapters no queued request wants unless `evict_wanted`); `needed(key)`
    says whether any request still waits for it; `failed(key, error)` records a load that cannot succeed."""

    def __init__(self, make_resident: Callable[[Hashable, bool], bool], needed: Callable[[Hashable], bool],
                 failed: Callable[[Hashable, AdapterError], None]) -> None:
        self._make_resident, self._needed, self._failed = make_resident, needed, failed
        self._wanted: OrderedDict[Hashable, None] = OrderedDict()  # first asked for first
        self._condition = threading.Condition()
        self._changed = False  # a want or a released slot since the last pass
        self._thread: threading.Thread | None = None

    def want(self, key: Hashable) -> None:
        with self._condition:
            if key not in self._wanted:
                self._wanted[key] = None
                self._changed = True
                self._condition.notify()
            if self._thread is None:  # started on first use: a server without adapters runs no thread
                self._thread = threading.Thread(target=self._run, name="loraserve-adapter-loader", daemon=True)
                self._thread.start()

    def wake(self) -> None:
        """A slot may have become free: try the adapters still wanted again."""
        with self._condition:
            self._changed = True
            self._condition.notify()

    def pending(self) -> list[Hashable]:
        with self._condition:
            return list(self._wanted)

    def _run(self) -> None:
        # Tensor work here (dtype conversion, copies into pages) stays on this one thread: a thread that runs a
        # parallel region keeps an OpenMP team for life, and with more teams than cores libgomp throttles the
        # step thread's (each decode step on 2 cores 1.65x slower).
        hold_helper_to_one_thread()
        while True:
            with self._condition:
                while not (self._changed and self._wanted):
                    self._condition.wait()
                self._changed = False
                keys = list(self._wanted)
            for index, key in enumerate(keys):
                if not self._bring_in(key, evict_wanted=index == 0):
                    break  # no slot for this want: none for the later ones either

    def _bring_in(self, key: Hashable, evict_wanted: bool) -> bool:
        """Load one wanted adapter; False when it must wait for a slot. Only the oldest want may take the slot of
        an adapter another queued request wants: with wants made as requests arrive, later ones doing so would
        evict, before their requests could run, adapters loaded for the requests ahead of them."""
        try:
            if self._needed(key) and not self._make_resident(key, evict_wanted):
                return False
        except AdapterNotFoundError:
            pass  # replaced or removed, and nobody holds it any more
        except AdapterError as error:
            logger.error("adapter %s could not be loaded: %s", key, error)
            self._failed(key, error)
        with self._condition:
            self._wanted.pop(key, None)
        return True
