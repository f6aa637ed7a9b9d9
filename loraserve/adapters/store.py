"""Adapters on disk: <root>/<name>/v<version>/{adapter_config.json, adapter_model.safetensors}.

A new version is staged in a temporary directory inside root and renamed into place in one step, so a failed
upload or a crash never leaves a half-written version where the start-up scan would find it. A replaced or
removed version still in use is renamed out of its name's directory the same way, so a restart cannot revive it.
Names become path components, so they are validated here, before anything touches the filesystem.

A shared store (one directory that several replicas use, a ReadWriteMany volume) is never tidied behind another
replica's back: versions stay where they are when replaced, a start-up leaves temporary directories alone (another
replica may be staging an upload), and a version is removed from disk only once two newer ones are committed
(until then a replica still serving it can read it again) or when its name is deleted.
"""
import contextlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loraserve.adapters.errors import AdapterError, AdapterFormatError, AdapterNameError
from loraserve.adapters.adapter_info import AdapterInfo, BaseModelShape
from loraserve.adapters.format import adapter_files, inspect_adapter
from loraserve.adapters.remote_store import RemoteStore
from loraserve.adapters.server_path import copy_regular_file

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
VERSION_DIRECTORY = re.compile(r"v([1-9][0-9]*)")
TEMPORARY_PREFIX = ".tmp-"  # staged or retired versions; names cannot start with ".", so never an adapter


def validate_name(name: str) -> str:
    """1..64 letters, digits, '-', '_', '.'; not starting with '.', no '..': safe as one path component."""
    if not isinstance(name, str) or not _is_safe_name(name):
        raise AdapterNameError(f"invalid adapter name {name!r}: use 1 to 64 letters, digits, '-', '_' or '.', "
                               f"not starting with '.' and without '..'")
    return name


def _is_safe_name(name: str) -> bool:
    return NAME.fullmatch(name) is not None and ".." not in name


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    version: int
    directory: Path
    info: AdapterInfo
    created_at: float  # unix time the version was placed


class AdapterStore:
    """With `remote` (an object store every replica shares), `root` is this server's copy of what it used: versions
    are listed, placed, pruned and deleted there, and read into `root` before they are validated."""

    def __init__(self, root: Path, shared: bool = False, remote: RemoteStore | None = None) -> None:
        self.root, self.shared, self.remote = root, shared or remote is not None, remote
        root.mkdir(parents=True, exist_ok=True)

    def scan(self, base: BaseModelShape, max_rank: int) -> list[StoredAdapter]:
        """The latest valid version of every adapter; removes temporary leftovers and superseded versions,
        and skips (with a warning) whatever else does not validate."""
        if self.remote is not None:
            return [stored for name in self.remote.names() if _is_safe_name(name)
                    if (stored := self._latest_valid(name, base, max_rank)) is not None]
        found = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(TEMPORARY_PREFIX):
                if not self.shared:
                    self.discard(child)
            elif not child.is_dir() or not _is_safe_name(child.name):
                logger.warning("ignoring %s: not an adapter directory", child)
            elif (stored := self._latest_valid(child.name, base, max_rank)) is not None:
                found.append(stored)
        return found

    def names(self) -> list[str]:
        if self.remote is not None:
            return [name for name in self.remote.names() if _is_safe_name(name)]
        return [child.name for child in self.root.iterdir() if child.is_dir() and _is_safe_name(child.name)]

    def versions(self, name: str, fresh: bool = False) -> list[int]:
        """The name's versions; `fresh`: an object store is listed now, not as it was a moment ago."""
        if self.remote is not None:
            return self.remote.versions(validate_name(name), fresh)
        directory = self.root / validate_name(name)
        if not directory.is_dir():
            return []
        return [int(match[1]) for child in directory.iterdir() if (match := VERSION_DIRECTORY.fullmatch(child.name))]

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A new empty directory inside root (an upload is written there), removed afterwards; one a crash leaves
        behind is removed by the next start-up's scan."""
        directory = self._new_temporary()
        try:
            yield directory
        finally:
            self.discard(directory)

    def stage(self, source: Path) -> Path:
        """Move the adapter's two files from `source` (a scratch directory) into a new temporary directory."""
        files = adapter_files(source)
        staging = self._new_temporary()
        try:
            for file in files:
                shutil.move(file, staging / file.name)
        except OSError:
            self.discard(staging)
            raise
        return staging

    def stage_copy(self, files: dict[str, Path], max_bytes: int) -> Path:
        """Copy the files `checked_source_files` approved (by name) into a new temporary directory, each read
        through a descriptor that follows no further link, at most `max_bytes` in all (they may have changed)."""
        staging = self._new_temporary()
        try:
            remaining = max_bytes
            for name, file in files.items():
                remaining -= copy_regular_file(file, staging / name, remaining)
        except OSError:
            self.discard(staging)
            raise AdapterFormatError("the adapter's files could not be read") from None
        except AdapterError:
            self.discard(staging)
            raise
        return staging

    def _new_temporary(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX, dir=self.root))

    def commit(self, staging: Path, name: str, version: int, info: AdapterInfo) -> StoredAdapter:
        """Rename a validated staging directory into place as the given version."""
        directory = self.root / validate_name(name) / f"v{version}"
        directory.parent.mkdir(exist_ok=True)
        try:
            os.rename(staging, directory)
        except OSError:
            self.discard(staging)
            with contextlib.suppress(OSError):
                directory.parent.rmdir()  # only if this add created it and it is still empty
            raise
        if self.remote is not None:
            try:
                self.remote.publish(name, version, directory)
            except OSError:
                self.discard(directory)
                raise
        if self.shared:
            for older in self.versions(name, fresh=True):
                if older < version - 1:
                    self._remove_version(name, older)
        return StoredAdapter(name, version, directory, info, directory.stat().st_mtime)

    def _remove_version(self, name: str, version: int) -> None:
        if self.remote is not None:
            self.remote.delete(name, version)
        self.discard(self.root / name / f"v{version}")

    def stored(self, name: str, version: int, base: BaseModelShape, max_rank: int) -> StoredAdapter:
        """A version in the store (another replica's, in a shared one), validated; raises AdapterError if it is
        not valid."""
        directory = self.root / validate_name(name) / f"v{version}"
        if self.remote is not None and not directory.exists():
            self._fetch(name, version, directory)
        return StoredAdapter(name, version, directory, inspect_adapter(directory, base, max_rank),
                             directory.stat().st_mtime)

    def _fetch(self, name: str, version: int, directory: Path) -> None:
        """Read a version from the object store into place here, whole or not at all."""
        staging = self._new_temporary()
        try:
            self.remote.fetch(name, version, staging / "version")
            directory.parent.mkdir(exist_ok=True)
            try:
                os.rename(staging / "version", directory)
            except OSError:
                if not directory.exists():
                    raise  # else a replica sharing this directory read it first
        finally:
            self.discard(staging)

    def retire(self, directory: Path) -> Path:
        """Move a version out of its name's directory (to be discarded once unused); returns where it went. In a
        shared store it stays (`commit` removes it later)."""
        if self.shared:
            return directory
        retired = self.root / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
        os.rename(directory, retired)
        return retired

    def release(self, directory: Path) -> None:
        """A retired version nobody uses any more: discarded, unless the store is shared."""
        if not self.shared:
            self.discard(directory)

    def delete(self, name: str) -> None:
        """The name's directory, with any version left in it (in the object store too)."""
        if self.remote is not None:
            self.remote.delete(validate_name(name))
        self.discard(self.root / validate_name(name))

    @staticmethod
    def discard(directory: Path) -> None:
        shutil.rmtree(directory, ignore_errors=True)

    def _latest_valid(self, name: str, base: BaseModelShape, max_rank: int) -> StoredAdapter | None:
        versions = sorted(self.versions(name), reverse=True)
        for index, version in enumerate(versions):
            try:
                stored = self.stored(name, version, base, max_rank)
            except (AdapterError, OSError) as error:
                logger.warning("skipping adapter %s version %d: %s", name, version, error)
                continue
            for older in versions[index + 1:] if not self.shared else []:
                self.discard(self.root / name / f"v{older}")
            return stored
        logger.warning("adapter directory %s holds no valid version", self.root / name)
        return None
