"""An adapter named by a path on this server (vLLM's /v1/load_lora_adapter), checked where it lies before a byte
of it is copied.

The path comes from a client, so how it fails must reveal nothing of what exists there: every way of not being an
adapter directory gets one message. Its files (two, and its Medusa heads' if present) must be regular files inside
it (a link may not lead out, say to /proc/self/mem), and together they count against the same size limit as an
upload.
"""
import os
import stat
from pathlib import Path

from loraserve.adapters.errors import AdapterFormatError, AdapterTooLargeError
from loraserve.adapters.config_checks import ADAPTER_FILES, CONFIG_FILE, OPTIONAL_FILES, WEIGHTS_FILE

NOT_AN_ADAPTER = (f"lora_path does not lead to an adapter this server can read: a directory holding {CONFIG_FILE} "
                  f"and {WEIGHTS_FILE} (pickled weights are refused) as regular files, no link leading out of it")
CHUNK_BYTES = 1 << 20


def checked_source_files(directory: Path, max_bytes: int) -> dict[str, Path]:
    """Each adapter file's name and the regular file inside `directory` it resolves to."""
    files, total = {}, 0
    try:
        root = directory.resolve(strict=True)
        present = [name for name in OPTIONAL_FILES if os.path.lexists(root / name)]
        for name in ADAPTER_FILES + tuple(present):
            target = (root / name).resolve(strict=True)
            status = target.stat()
            if not target.is_relative_to(root) or not stat.S_ISREG(status.st_mode):
                raise AdapterFormatError(NOT_AN_ADAPTER)
            files[name] = target
            total += status.st_size
    except (OSError, RuntimeError):  # missing, unreadable, not a directory, a loop of links
        raise AdapterFormatError(NOT_AN_ADAPTER) from None
    if total > max_bytes:
        raise AdapterTooLargeError(f"the adapter's files hold {total} bytes; this server accepts {max_bytes}")
    return files


def copy_regular_file(source: Path, destination: Path, max_bytes: int) -> int:
    """Copy `source`, which must still be a regular file reached without a link, refusing it past `max_bytes`;
    return the bytes copied."""
    descriptor = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(descriptor, "rb") as reader, open(destination, "wb") as writer:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise AdapterFormatError(NOT_AN_ADAPTER)
        copied = 0
        while chunk := reader.read(CHUNK_BYTES):
            copied += len(chunk)
            if copied > max_bytes:
                raise AdapterTooLargeError(f"the adapter's files exceed this server's limit of {max_bytes} bytes")
            writer.write(chunk)
    return copied
