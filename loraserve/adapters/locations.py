"""Adapters a request names by where they are (LoRAX's adapter_source "local" with a path, or "s3" with an s3://
URL, as adapter_id), read only inside the roots the operator allowed (--adapter-roots: directories, or object-store
URLs read through fsspec). Each location becomes an adapter of the registry under a name of its own (`path-` and a
digest of the location): copied in and checked like an upload the first time, and again, as a new version, when
its files change (requests in flight keep the version they began with)."""
import hashlib
import threading
from pathlib import Path

import fsspec

from loraserve.adapters.config_checks import CONFIG_FILE, WEIGHTS_FILE
from loraserve.adapters.errors import AdapterLocationError, AdapterNotFoundError
from loraserve.adapters.format import adapter_files
from loraserve.adapters.records import AdapterRef
from loraserve.adapters.registry import AdapterRegistry

PREFIX = "path-"

Fingerprint = tuple[tuple[object, object], ...]  # each file's size and modification mark (a time, or an ETag)


class AdapterLocations:
    def __init__(self, registry: AdapterRegistry, roots: list[str]) -> None:
        self._registry = registry
        self._directories = [Path(root).resolve() for root in roots if "://" not in root]
        self._urls = [root.rstrip("/") + "/" for root in roots if "://" in root]
        self._lock = threading.Lock()  # one copy at a time; a location's second request waits for its first
        self._fingerprints: dict[str, Fingerprint] = {}

    def resolve(self, location: str) -> AdapterRef:
        """The location's adapter, pinned as `AdapterRegistry.resolve` pins it. Blocks (the first request of a
        location, or the first after it changed, copies and checks it), so call it off the event loop."""
        if not self._directories and not self._urls:
            raise AdapterLocationError("this server reads no adapters by location: start it with --adapter-roots "
                                       "to allow directories or store URLs, or upload the adapter (POST /v1/adapters)")
        url = "://" in location
        source = self._url_inside_a_root(location) if url else self._directory_inside_a_root(location)
        name = PREFIX + hashlib.sha256(str(source).encode()).hexdigest()[:24]
        fingerprint = _url_fingerprint(source) if url else _directory_fingerprint(source)
        with self._lock:
            if self._fingerprints.get(name) != fingerprint:
                if url:
                    self._copy_in(name, source)
                else:
                    self._registry.add_from_path(name, source)
                self._fingerprints[name] = fingerprint
            return self._registry.resolve(name)

    def _copy_in(self, name: str, url: str) -> None:
        filesystem, root = fsspec.core.url_to_fs(url)
        with self._registry.scratch() as scratch:
            for file in (CONFIG_FILE, WEIGHTS_FILE):
                filesystem.get_file(f"{root}/{file}", str(scratch / file))
            self._registry.add(name, scratch)

    def _directory_inside_a_root(self, location: str) -> Path:
        """The location with links resolved, if it lies inside an allowed directory."""
        if not location.startswith("/"):
            raise AdapterLocationError(f"adapter location {location!r} is not an absolute path")
        try:
            path = Path(location).resolve(strict=True)
        except (OSError, RuntimeError) as error:
            raise AdapterNotFoundError(f"no adapter directory at {location}") from error
        if not any(path.is_relative_to(root) for root in self._directories):
            raise _outside(location)
        return path

    def _url_inside_a_root(self, location: str) -> str:
        url = location.rstrip("/")
        path = url.partition("://")[2]
        if any(part in (".", "..") for part in path.split("/")) or not any(url.startswith(root)
                                                                            for root in self._urls):
            raise _outside(location)
        return url


def _outside(location: str) -> AdapterLocationError:
    return AdapterLocationError(f"adapter location {location!r} is outside the directories and stores this server "
                                f"may read adapters from (--adapter-roots)")


def _directory_fingerprint(path: Path) -> Fingerprint:
    return tuple((file.stat().st_size, file.stat().st_mtime_ns) for file in adapter_files(path))


def _url_fingerprint(url: str) -> Fingerprint:
    filesystem, root = fsspec.core.url_to_fs(url)
    try:
        details = [filesystem.info(f"{root}/{file}") for file in (CONFIG_FILE, WEIGHTS_FILE)]
    except FileNotFoundError as error:
        raise AdapterNotFoundError(f"no adapter at {url}: it needs {CONFIG_FILE} and {WEIGHTS_FILE}") from error
    return tuple((detail.get("size"), next((detail[key] for key in ("ETag", "mtime", "LastModified", "created")
                                            if key in detail), None)) for detail in details)
