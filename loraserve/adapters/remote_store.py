"""An object store (any fsspec URL: s3://, gs://, file://, ...) as the adapter store that every replica shares:
<url>/<name>/v<version>/{adapter_config.json, adapter_model.safetensors, COMMITTED}. Object stores have no atomic
rename, so a version exists once its COMMITTED marker, written after its files, does; a reader never sees half a
version. Each server reads versions into its own adapter directory (its cache) before validating them, as it reads
uploads. Listings are kept LISTING_TTL_S seconds, so a request does not wait on a list call."""
import time
from pathlib import Path

import fsspec

from loraserve.adapters.config_checks import ADAPTER_FILES, OPTIONAL_FILES

MARKER = "COMMITTED"
LISTING_TTL_S = 2.0


class RemoteStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.filesystem, self.root = fsspec.core.url_to_fs(url)
        self._listings: dict[str, tuple[float, list[int]]] = {}

    def names(self) -> list[str]:
        if not self.filesystem.exists(self.root):
            return []
        return sorted(Path(entry).name for entry in self.filesystem.ls(self.root, detail=False))

    def versions(self, name: str, fresh: bool = False) -> list[int]:
        """The committed versions of a name (as listed at most LISTING_TTL_S seconds ago, unless `fresh`)."""
        listed = self._listings.get(name)
        if fresh or listed is None or time.monotonic() - listed[0] > LISTING_TTL_S:
            listed = (time.monotonic(), self._list_versions(name))
            self._listings[name] = listed
        return listed[1]

    def publish(self, name: str, version: int, directory: Path) -> None:
        """Copy a validated version's files up, then its marker."""
        target = f"{self.root}/{name}/v{version}"
        if self.filesystem.exists(f"{target}/{MARKER}"):
            raise FileExistsError(f"version {version} of {name!r} is already in {self.url}")
        self.filesystem.makedirs(target, exist_ok=True)  # object stores have no directories: nothing to do there
        for file in ADAPTER_FILES + OPTIONAL_FILES:
            if (directory / file).is_file():
                self.filesystem.put_file(str(directory / file), f"{target}/{file}")
        self.filesystem.pipe_file(f"{target}/{MARKER}", b"")
        self._listings.pop(name, None)

    def fetch(self, name: str, version: int, into: Path) -> None:
        """A committed version's files, into `into` (a new directory)."""
        into.mkdir(parents=True)
        source = f"{self.root}/{name}/v{version}"
        present = {Path(entry).name for entry in self.filesystem.ls(source, detail=False)}
        for file in ADAPTER_FILES + tuple(file for file in OPTIONAL_FILES if file in present):
            self.filesystem.get_file(f"{source}/{file}", str(into / file))

    def delete(self, name: str, version: int | None = None) -> None:
        """A name, or one of its versions (the marker first, so no reader takes it half deleted)."""
        target = f"{self.root}/{name}" + (f"/v{version}" if version is not None else "")
        if version is not None:
            self.filesystem.rm_file(f"{target}/{MARKER}")
        if self.filesystem.exists(target):
            self.filesystem.rm(target, recursive=True)
        self._listings.pop(name, None)

    def _list_versions(self, name: str) -> list[int]:
        directory = f"{self.root}/{name}"
        if not self.filesystem.exists(directory):
            return []
        versions = []
        for entry in self.filesystem.ls(directory, detail=False):
            label = Path(entry).name
            if label.startswith("v") and label[1:].isdigit() and self.filesystem.exists(f"{entry}/{MARKER}"):
                versions.append(int(label[1:]))
        return versions
