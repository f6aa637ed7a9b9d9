"""Which adapters exist, which version a name means now, and in which tier each version's weights sit.

Tiers: disk (every adapter), a CPU cache of loaded weights (LRU, `max_cpu_loras`), and the SlotPool's device
slots (LRU). A request keeps the version it resolved to its end, through uploads and removals:
    ref = resolve(name)  pins the version; ensure_loaded(ref) then reads it into the CPU cache (blocking)
    hold(ref)            references its slot while the request is in the running batch, if the version is
                         resident; if not, the background loader is asked to bring it in. release(ref) after
    unpin(ref)           once per resolve (or pin), when the request is over: finished, aborted or refused
Uploading a new version or removing a name changes what `resolve` returns at once; the old version is freed
(files, CPU copy, slot) when its last pin and slot reference are gone. Callers come from the event loop, worker
threads and the engine's step thread, so all state sits behind one lock; disk reads happen outside it.
"""
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from loraserve.adapters import dora
from loraserve.adapters.errors import AdapterError, AdapterNameError, AdapterNotFoundError
from loraserve.adapters.adapter_info import AdapterInfo, BaseModelShape
from loraserve.adapters.format import Adapter, inspect_adapter, load_adapter
from loraserve.adapters.loader import AdapterLoader
from loraserve.adapters.records import AdapterRecord, AdapterRef
from loraserve.adapters.remote_store import RemoteStore
from loraserve.adapters.server_path import checked_source_files
from loraserve.adapters.slot_pool import SlotPool
from loraserve.adapters.store import AdapterStore, StoredAdapter, validate_name
from loraserve.adapters.tiers import AdapterEventListener, AdapterTiers
from loraserve.intra_op_threads import hold_helper_to_one_thread


@dataclass
class _Version:
    info: AdapterInfo
    directory: Path  # moves out of the name's directory when the version is replaced or removed
    created_at: float
    current: bool = True  # what `resolve` returns for its name
    pins: int = 0  # requests that resolved it and are not over
    references: int = 0  # acquires not yet released
    requests_served: int = 0


class AdapterRegistry:
    def __init__(self, adapter_dir: Path, base: BaseModelShape, pool: SlotPool, max_cpu_loras: int,
                 max_rank: int, listener: AdapterEventListener | None = None, max_bytes: int = 2**63,
                 on_change: Callable[[], None] = lambda: None, base_weights: dora.BaseWeights | None = None,
                 shared_store: bool = False, remote_store: str | None = None) -> None:
        """`on_change` is called, from the loader's thread, when an adapter became resident or failed to load;
        `base_weights` are what DoRA adapters are resolved against; `shared_store`: other replicas use the adapter
        directory too (see `sync`); `remote_store`: an fsspec URL of the store they share instead, of which the
        adapter directory keeps this server's copies."""
        remote = RemoteStore(remote_store) if remote_store else None
        self._store = AdapterStore(adapter_dir, shared_store, remote)
        self._on_change = on_change
        self._base, self._max_rank, self._max_bytes = base, max_rank, max_bytes
        self._base_weights = base_weights
        self._lock = threading.Lock()
        self._placing = threading.Lock()  # one placement at a time (the loader's, or a caller's), never the step's
        self._committing = threading.Lock()  # one upload given its version number and stored at a time
        self._versions: dict[AdapterRef, _Version] = {}  # current versions, and old ones still in use
        self._current: dict[str, AdapterRef] = {}
        self._last_version: dict[str, int] = {}  # never reuse a version number a request may still hold
        self._failures: dict[AdapterRef, AdapterError] = {}  # versions the loader could not load
        self._pages_for = pool.pages_for
        self._tiers = AdapterTiers(pool, max_cpu_loras, lambda ref: self._versions[ref].references > 0,
                                   lambda ref: self._versions[ref].pins > 0, listener)
        self._loader = AdapterLoader(self.make_resident, self._needed, self._record_failure)
        for stored in self._store.scan(base, max_rank):
            self._register(stored)

    def resolve(self, name: str) -> AdapterRef:
        """The version a new request of this name uses, pinned until `unpin`."""
        if self._store.shared:
            self.sync(name)
        with self._lock:
            ref = self._current_ref(name)
            self._versions[ref].pins += 1
            return ref

    def pin(self, ref: AdapterRef) -> None:
        """One more pin on a version the caller holds pinned, for another request that shares its resolve."""
        with self._lock:
            self._version(ref).pins += 1

    def unpin(self, ref: AdapterRef) -> None:
        with self._lock:
            entry = self._versions.get(ref)
            assert entry is not None and entry.pins > 0, f"unpin of {ref} without a matching resolve"
            entry.pins -= 1
            self._free_if_unused(ref)
        self._loader.wake()  # its slot may be the one a queued request's adapter can take now

    def sync(self, name: str) -> None:
        """Take up what another replica did to the name in a shared store: its newest version becomes the one new
        requests resolve (requests under way keep theirs), and a deleted name is gone. A few stat calls."""
        try:
            latest = max(self._store.versions(name), default=None)
        except AdapterNameError:
            return  # no adapter can have that name; resolving it says so
        with self._lock:
            current = self._current.get(name)
            if current is not None and latest is not None and current.version >= latest:
                return
            if latest is None:
                if current is not None:
                    del self._current[name]
                    self._retire(current)
                return
        try:
            stored = self._store.stored(name, latest, self._base, self._max_rank)
        except (AdapterError, OSError):
            return  # deleted meanwhile, or not valid: the name stays as this replica knows it
        with self._lock:
            current = self._current.get(name)
            if current is None or current.version < latest:
                self._register(stored)
                if current is not None:
                    self._retire(current)

    def sync_all(self) -> None:
        """`sync` every name in the shared store, and every name this replica knows."""
        for name in sorted(set(self._store.names()) | set(self._current)):
            self.sync(name)

    def records(self) -> list[AdapterRecord]:
        if self._store.shared:
            self.sync_all()
        with self._lock:
            return [self._record(ref) for _, ref in sorted(self._current.items())]

    def record(self, name: str) -> AdapterRecord:
        if self._store.shared:
            self.sync(name)
        with self._lock:
            return self._record(self._current_ref(name))

    def info(self, ref: AdapterRef) -> AdapterInfo:
        """What a pinned version is: its kind, and the virtual tokens it puts before a prompt."""
        with self._lock:
            return self._version(ref).info

    def count_request(self, ref: AdapterRef) -> None:
        with self._lock:
            if ref in self._versions:
                self._versions[ref].requests_served += 1

    def scratch(self) -> AbstractContextManager[Path]:
        """A new empty directory inside the adapter directory, for an upload to be written into before `add`."""
        return self._store.scratch()

    def add(self, name: str, source: Path) -> AdapterRecord:
        """Validate the adapter in `source` and place it as the name's next version; its files are moved out
        of `source` (an upload's scratch directory), and a failed add leaves nothing behind."""
        validate_name(name)
        return self._place(name, self._store.stage(source))

    def add_from_path(self, name: str, path: Path) -> AdapterRecord:
        """Like `add` for a directory elsewhere on this server, left as it was: checked where it lies (its files
        regular and inside it, their size, config and header) before anything is copied."""
        validate_name(name)
        files = checked_source_files(path, self._max_bytes)
        inspect_adapter(path, self._base, self._max_rank)
        return self._place(name, self._store.stage_copy(files, self._max_bytes))

    def remove(self, name: str) -> None:
        """New requests stop finding the name now; versions still in use are freed when they no longer are."""
        with self._lock:
            ref = self._current_ref(name)
            del self._current[name]
            self._retire(ref)
        self._store.delete(name)  # outside the lock: an object store's delete takes a while

    def ensure_loaded(self, ref: AdapterRef) -> None:
        """Bring the version into the CPU cache, reading disk if needed; blocks, so call it off the event loop.
        A version already in a slot counts as loaded."""
        with self._lock:
            self._version(ref)
            if self._tiers.slot(ref) is not None:
                return
        hold_helper_to_one_thread()  # a worker thread's tensor work, kept out of an OpenMP team of its own
        self._load(ref)

    def hold(self, ref: AdapterRef) -> int | None:
        """The version's slot, referenced once more, if the version is resident; else None, and the background
        loader is asked to bring it in. Never reads disk nor copies, so the engine step can call it. Raises the
        error of a load that failed, and AdapterNotFoundError for a version nobody pinned any more."""
        with self._lock:
            entry = self._version(ref)
            if ref in self._failures:
                raise self._failures[ref]
            slot = self._tiers.slot(ref)
            if slot is not None:
                entry.references += 1
                return slot
        self._loader.want(ref)
        return None

    def prefetch(self, ref: AdapterRef) -> None:
        """Ask the loader to bring the version in now, for a request just queued, so that it is resident by the
        time the scheduler reaches the request. Never blocks; a version whose load failed is left to `hold`."""
        with self._lock:
            if self._tiers.slot(ref) is not None or ref in self._failures:
                return
        self._loader.want(ref)

    def make_resident(self, ref: AdapterRef, evict_wanted: bool = True) -> bool:
        """Put the version in a slot and as many pages as its rank: reading disk if its CPU copy was evicted since
        `ensure_loaded`, then taking free ones, else evicting the least recently used adapters no running request
        holds (those no queued request wants; then, if `evict_wanted`, the others). False while held adapters
        leave too little room. Blocks: the loader thread calls it; the copy happens outside the lock, into pages
        nobody can reach until filled."""
        with self._placing:
            return self._make_resident(ref, evict_wanted)

    def _make_resident(self, ref: AdapterRef, evict_wanted: bool) -> bool:
        with self._lock:
            num_pages = self._pages_for(self._version(ref).info)
            if self._tiers.slot(ref) is not None:
                return True
            if not self._tiers.can_place(num_pages, evict_wanted):
                return False
        adapter = self._load(ref)
        with self._lock:
            self._version(ref)
            if self._tiers.slot(ref) is not None:
                return True
            placement = self._tiers.reserve(num_pages, evict_wanted)
        if placement is None:
            return False
        seconds = self._tiers.fill(*placement, adapter)
        with self._lock:
            if ref not in self._versions:  # freed while it was copied
                self._tiers.free(*placement)
                raise AdapterNotFoundError(f"adapter {ref.name!r} version {ref.version} was removed")
            self._tiers.occupy(ref, *placement, seconds)
        self._on_change()
        return True

    def release(self, ref: AdapterRef) -> None:
        with self._lock:
            entry = self._versions.get(ref)
            assert entry is not None and entry.references > 0, f"release of {ref} without a matching hold"
            entry.references -= 1
            self._free_if_unused(ref)
        self._loader.wake()

    def loading(self) -> bool:
        """Whether the loader has adapters to bring in (its thread is, or is about to be, busy)."""
        return bool(self._loader.pending())

    def activity(self) -> tuple[list[str], list[str]]:
        """Names of the adapters running requests hold, and of those requests wait for (queued, or being
        prepared), each sorted."""
        with self._lock:
            running = {ref.name for ref, entry in self._versions.items() if entry.references}
            waiting = {ref.name for ref, entry in self._versions.items() if entry.pins > entry.references}
        return sorted(running), sorted(waiting)

    def waiting_for_load(self) -> int:
        """Requests (queued, or being prepared) whose adapter version is not in a slot yet."""
        with self._lock:
            return sum(entry.pins for ref, entry in self._versions.items() if self._tiers.slot(ref) is None)

    def slots_held(self) -> int:
        """Slots that running requests hold (a warm slot nobody holds is not counted)."""
        with self._lock:
            return sum(1 for entry in self._versions.values() if entry.references)

    def slots_in_use(self) -> int:
        """Slots holding some adapter, referenced or kept warm."""
        with self._lock:
            return self._tiers.slots_in_use()

    def num_references(self) -> int:
        """Acquires not yet released: zero when no running request holds a slot."""
        with self._lock:
            return sum(entry.references for entry in self._versions.values())

    def num_pins(self) -> int:
        """Resolves not yet unpinned: zero when no request is under way."""
        with self._lock:
            return sum(entry.pins for entry in self._versions.values())

    def _place(self, name: str, staging: Path) -> AdapterRecord:
        """Load and validate a staged adapter, then rename it into place as the name's next version."""
        hold_helper_to_one_thread()  # a worker thread's tensor work, kept out of an OpenMP team of its own
        start = time.perf_counter()
        try:
            adapter = dora.resolve(load_adapter(staging, self._base, self._max_rank), self._base, self._base_weights)
            self._pages_for(adapter)  # refuses one that could never be resident
        except AdapterError:
            self._store.discard(staging)
            raise
        seconds = time.perf_counter() - start
        with self._committing:  # the store's listing and upload happen outside the lock requests and steps take
            with self._lock:
                last = self._last_version.get(name, 0)
            version = max([last, *self._store.versions(name, fresh=True)]) + 1
            stored = self._store.commit(staging, name, version, adapter.info())
        with self._lock:
            ref, current = AdapterRef(name, version), self._current.get(name)
            if current is None or current.version < version:
                self._register(stored)
                if current is not None:
                    self._retire(current)
                current = ref
            # else a request's `sync` took up this version first, or another replica's newer one
            if current == ref:
                self._tiers.keep_cpu_copy(ref, adapter, seconds)  # an upload is usually used next
            return self._record(current)

    def _register(self, stored: StoredAdapter) -> AdapterRef:
        ref = AdapterRef(stored.name, stored.version)
        self._versions[ref] = _Version(stored.info, stored.directory, stored.created_at)
        self._current[stored.name] = ref
        self._last_version[stored.name] = stored.version
        return ref

    def _current_ref(self, name: str) -> AdapterRef:
        if name not in self._current:
            raise AdapterNotFoundError(f"no adapter named {name!r}")
        return self._current[name]

    def _version(self, ref: AdapterRef) -> _Version:
        if ref not in self._versions:
            raise AdapterNotFoundError(f"adapter {ref.name!r} version {ref.version} was replaced or removed")
        return self._versions[ref]

    def _retire(self, ref: AdapterRef) -> None:
        entry = self._versions[ref]
        entry.current = False
        entry.directory = self._store.retire(entry.directory)
        self._free_if_unused(ref)

    def _free_if_unused(self, ref: AdapterRef) -> None:
        entry = self._versions[ref]
        if entry.current or entry.pins or entry.references:
            return
        self._tiers.drop(ref)
        del self._versions[ref]
        self._failures.pop(ref, None)
        self._store.release(entry.directory)

    def _needed(self, ref: AdapterRef) -> bool:
        """Whether some request still waits for the version (the loader skips those nobody needs any more)."""
        with self._lock:
            entry = self._versions.get(ref)
            return entry is not None and entry.pins > 0

    def _record_failure(self, ref: AdapterRef, error: AdapterError) -> None:
        with self._lock:
            if ref in self._versions:
                self._failures[ref] = error
        self._on_change()

    def _load(self, ref: AdapterRef) -> Adapter:
        """The CPU copy; when the cache has none, read from disk outside the lock (a slow load blocks no one)."""
        with self._lock:
            directory = self._version(ref).directory
            adapter = self._tiers.cpu_copy(ref)
        if adapter is not None:
            return adapter
        start = time.perf_counter()
        adapter = self._read(ref, directory)
        with self._lock:
            self._version(ref)
            self._tiers.keep_cpu_copy(ref, adapter, time.perf_counter() - start)
        return adapter

    def _read(self, ref: AdapterRef, directory: Path) -> Adapter:
        """A version retired while it was read has moved (it moves once), so read it again where it went."""
        try:
            adapter = load_adapter(directory, self._base, self._max_rank)
        except AdapterError:
            with self._lock:
                moved_to = self._version(ref).directory  # freed meanwhile: report that, not the files it lost
            if moved_to == directory:
                raise
            adapter = load_adapter(moved_to, self._base, self._max_rank)
        return dora.resolve(adapter, self._base, self._base_weights)

    def _record(self, ref: AdapterRef) -> AdapterRecord:
        entry = self._versions[ref]
        info = entry.info
        return AdapterRecord(ref.name, ref.version, info.rank, info.alpha, list(info.targets), info.size_bytes,
                             self._tiers.tier(ref), entry.requests_served, entry.created_at, info.kind,
                             info.num_virtual_tokens, info.num_medusa_heads)
