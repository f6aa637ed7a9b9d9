"""Where loaded adapter weights sit: a CPU cache and the device slots, each evicting least recently used first.

Neither tier evicts an adapter that `in_use` says a running request holds. Not locked by itself: the registry
calls it under its lock.
"""
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

from adapters.format import LoraAdapter
from adapters.slot_pool import SlotPool


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
        self._cpu: OrderedDict[Hashable, LoraAdapter] = OrderedDict()  # least recently used first
        self._slots: OrderedDict[Hashable, int] = OrderedDict()  # least recently used first
        self._free_slots = list(range(pool.num_slots))

    def tier(self, key: Hashable) -> str:
        return "gpu" if key in self._slots else "cpu" if key in self._cpu else "disk"

    def cpu_copy(self, key: Hashable) -> LoraAdapter | None:
        if key in self._cpu:
            self._cpu.move_to_end(key)
        return self._cpu.get(key)

    def keep_cpu_copy(self, key: Hashable, adapter: LoraAdapter, seconds: float) -> None:
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
        return self._slots.get(key)

    def can_place(self) -> bool:
        return bool(self._free_slots) or self._evictable_slot_owner() is not None

    def reserve_slot(self) -> int | None:
        """A free slot, else the least recently used one that no running request holds (preferring one no queued
        request wants), taken from its adapter; None if every slot is held. Fill it with `fill`, outside the
        caller's lock, then `occupy` or `free` it."""
        if self._free_slots:
            return self._free_slots.pop()
        victim = self._evictable_slot_owner()
        if victim is None:
            return None
        self._listener.adapter_evicted("gpu")
        return self._slots.pop(victim)

    def fill(self, slot: int, adapter: LoraAdapter) -> float:
        """Copy the adapter into a reserved slot; returns the seconds it took."""
        start = time.perf_counter()
        self._pool.write(slot, adapter)
        return time.perf_counter() - start

    def occupy(self, key: Hashable, slot: int, seconds: float) -> None:
        self._slots[key] = slot
        self._listener.adapter_loaded("gpu", seconds)

    def free(self, slot: int) -> None:
        self._pool.clear(slot)
        self._free_slots.append(slot)

    def drop(self, key: Hashable) -> None:
        """Forget the adapter in both tiers, zeroing its slot: a removed adapter leaves no weights behind."""
        self._cpu.pop(key, None)
        slot = self._slots.pop(key, None)
        if slot is not None:
            self.free(slot)

    def slots_in_use(self) -> int:
        return len(self._slots)

    def _evictable_slot_owner(self) -> Hashable | None:
        unheld = [key for key in self._slots if not self._in_use(key)]
        return next((key for key in unheld if not self._wanted(key)), unheld[0] if unheld else None)
