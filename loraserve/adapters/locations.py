"""Adapters a request names by where they are (LoRAX's adapter_source "local" with a path as adapter_id), read only
inside directories the operator allowed (--adapter-roots). Each location becomes an adapter of the registry under
a name of its own (`path-` and a digest of the resolved path): copied in and checked like an upload the first time,
and again, as a new version, when its files change (requests in flight keep the version they began with)."""
import hashlib
import threading
from pathlib import Path

from loraserve.adapters.errors import AdapterLocationError, AdapterNotFoundError
from loraserve.adapters.format import adapter_files
from loraserve.adapters.records import AdapterRef
from loraserve.adapters.registry import AdapterRegistry

PREFIX = "path-"

Fingerprint = tuple[tuple[int, int], ...]  # (size, modification time) of each file


class AdapterLocations:
    def __init__(self, registry: AdapterRegistry, roots: list[Path]) -> None:
        self._registry, self._roots = registry, [root.resolve() for root in roots]
        self._lock = threading.Lock()  # one copy at a time; a location's second request waits for its first
        self._fingerprints: dict[str, Fingerprint] = {}

    def resolve(self, location: str) -> AdapterRef:
        """The location's adapter, pinned as `AdapterRegistry.resolve` pins it. Blocks (the first request of a
        location, or the first after it changed, copies and checks it), so call it off the event loop."""
        path = self._inside_a_root(location)
        name = PREFIX + hashlib.sha256(str(path).encode()).hexdigest()[:24]
        fingerprint = tuple((file.stat().st_size, file.stat().st_mtime_ns) for file in adapter_files(path))
        with self._lock:
            if self._fingerprints.get(name) != fingerprint:
                self._registry.add_from_path(name, path)
                self._fingerprints[name] = fingerprint
            return self._registry.resolve(name)

    def _inside_a_root(self, location: str) -> Path:
        """The location with links resolved, if it lies inside an allowed root."""
        if not self._roots:
            raise AdapterLocationError("this server reads no adapters by location: start it with --adapter-roots "
                                       "to allow directories, or upload the adapter (POST /v1/adapters)")
        if not location.startswith("/"):
            raise AdapterLocationError(f"adapter location {location!r} is not an absolute path")
        try:
            path = Path(location).resolve(strict=True)
        except (OSError, RuntimeError) as error:
            raise AdapterNotFoundError(f"no adapter directory at {location}") from error
        if not any(path.is_relative_to(root) for root in self._roots):
            raise AdapterLocationError(f"adapter location {location!r} is outside the directories this server may "
                                       f"read adapters from (--adapter-roots)")
        return path
