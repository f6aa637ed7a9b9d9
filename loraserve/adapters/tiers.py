"""Where loaded adapter weights sit: a CPU cache and the device pool's slots and pages, each evicting least
recently used first.

Neither tier evicts an adapter that `in_use` says a running request holds. Not locked by itself: the registry
calls it under its lock.
"""
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

from loraserve.adapters.format import Adapter
from loraserve.adapters.slot_pool import SlotPool


class AdapterEventListener(Protocol):
    """Told of loads and capacity evictions (tier "cpu" or "gpu"); called under the registry's lock, so it must
    not call back into the registry."""

    def adapter_loaded(self, tier: str, seconds: float) -> None: ...

    def adapter_evicted(self, tier: str) -> None: ...


class _Unheard:
    def adapter_loaded(self, tier: str, seconds: float) -> None:
        pass

    def adapter_evicted(self, tier: str) -> None:
        pass


class AdapterTiers:
    """`in_use` says a running request holds the adapter (never evicted); `wanted` that a request is queued for it
    (evicted only when no slot is free of both)."""

    def __init__(self, pool: SlotPool, max_cpu_loras: int, in_use: Callable[[Hashable], bool],
                 wanted: Callable[[Hashable], bool], listener: AdapterEventListener | None) -> None:
        self._pool, self._max_cpu_loras, self._in_use, self._wanted = pool, max_cpu_loras, in_use, wanted
        self._listener = listener or _Unheard()
        self._cpu: OrderedDict[Hashable, Adapter] = OrderedDict()  # least recently used first
        self._slots: OrderedDict[Hashable, tuple[int, list[int]]] = OrderedDict()  # slot and pages, LRU first
        self._free_slots = list(range(pool.num_slots))

    def tier(self, key: Hashable) -> str:
        return "gpu" if key in self._slots else "cpu" if key in self._cpu else "disk"

    def cpu_copy(self, key: Hashable) -> Adapter | None:
        if key in self._cpu:
            self._cpu.move_to_end(key)
        return self._cpu.get(key)

    def keep_cpu_copy(self, key: Hashable, adapter: Adapter, seconds: float) -> None:
        """Cache a copy read in `seconds`, evicting least recently used ones beyond max_cpu_loras."""
        self._cpu[key] = adapter
        self._cpu.move_to_end(key)
        while len(self._cpu) > self._max_cpu_loras:
            victim = next((other for other in self._cpu if other != key and not self._in_use(other)), None)
            if victim is None:
                break  # over capacity only while adapters in use (at most num_slots) fill it
            del self._cpu[victim]
            self._listener.adapter_evicted("cpu")
        self._listener.adapter_loaded("cpu", seconds)

    def slot(self, key: Hashable) -> int | None:
        if key in self._slots:
            self._slots.move_to_end(key)
        return self._slots[key][0] if key in self._slots else None

    def can_place(self, num_pages: int, evict_wanted: bool) -> bool:
        """Whether a slot and `num_pages` pages are free, or can be freed from adapters no running request holds
        (and, unless `evict_wanted` is set, no queued request wants)."""
        return self._evictions_for(num_pages, evict_wanted) is not None

    def reserve(self, num_pages: int, evict_wanted: bool) -> tuple[int, list[int]] | None:
        """A free slot and `num_pages` free pages, evicting least recently used adapters no running request holds
        (first those no queued request wants; the others only if `evict_wanted`) until there are; None, evicting
        nothing, if the adapters it may not evict leave too little room. Fill them with `fill`, outside the caller's
        lock, then `occupy` or `free` them."""
        victims = self._evictions_for(num_pages, evict_wanted)
        if victims is None:
            return None
        for victim in victims:
            self.free(*self._slots.pop(victim))
            self._listener.adapter_evicted("gpu")
        return self._free_slots.pop(), self._pool.take_pages(num_pages)

    def fill(self, slot: int, pages: list[int], adapter: Adapter) -> float:
        """Copy the adapter into a reserved slot and pages; returns the seconds it took."""
        start = time.perf_counter()
        self._pool.write(slot, pages, adapter)
        return time.perf_counter() - start

    def occupy(self, key: Hashable, slot: int, pages: list[int], seconds: float) -> None:
        self._slots[key] = (slot, pages)
        self._listener.adapter_loaded("gpu", seconds)

    def free(self, slot: int, pages: list[int]) -> None:
        self._pool.clear(slot)
        self._pool.return_pages(pages)
        self._free_slots.append(slot)

    def drop(self, key: Hashable) -> None:
        """Forget the adapter in both tiers, freeing its slot and pages."""
        self._cpu.pop(key, None)
        if key in self._slots:
            self.free(*self._slots.pop(key))

    def slots_in_use(self) -> int:
        return len(self._slots)

    def _evictions_for(self, num_pages: int, evict_wanted: bool) -> list[Hashable] | None:
        """The adapters to evict, in order, to free a slot and `num_pages` pages; None if it cannot be done."""
        unheld = [key for key in self._slots if not self._in_use(key)]
        candidates = [key for key in unheld if not self._wanted(key)]
        if evict_wanted:
            candidates += [key for key in unheld if self._wanted(key)]
        victims, slots, pages = [], len(self._free_slots), self._pool.num_free_pages
        for key in candidates:
            if slots and pages >= num_pages:
                break
            victims.append(key)
            slots, pages = slots + 1, pages + len(self._slots[key][1])
        return victims if slots and pages >= num_pages else None
