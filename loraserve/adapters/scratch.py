"""The adapter directory of a server started without --adapter-dir: a temporary one, removed when the server
exits, and, when a server was killed before it could remove its own, by the next server that starts.

Each holds an exclusive lock on a file inside it for as long as its server lives; the kernel drops the lock when
the process dies, however it dies, so a directory whose lock can be taken belongs to nobody.
"""
import fcntl
import logging
import shutil
import tempfile
import time
import weakref
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "loraserve-adapters-"
LOCK_FILE = "lock"
YOUNG_S = 60.0  # a directory without its lock file yet may be a server starting this moment


class ScratchAdapterDirectory:
    """`path` holds the adapters; everything is removed on `cleanup`, or when the object is collected."""

    def __init__(self, parent: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        self._lock = open(self.root / LOCK_FILE, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = self.root / "adapters"
        self.path.mkdir()
        self._finalizer = weakref.finalize(self, remove, self.root, self._lock)

    def cleanup(self) -> None:
        self._finalizer()


def remove(root: Path, lock: object) -> None:
    shutil.rmtree(root, ignore_errors=True)
    lock.close()


def remove_abandoned(parent: Path | None = None) -> int:
    """Remove the scratch directories of servers that died without removing them; return how many."""
    removed = 0
    for root in Path(parent or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        if root.is_dir() and is_abandoned(root):
            shutil.rmtree(root, ignore_errors=True)
            removed += 1
    if removed:
        logger.info("removed %d adapter directories left by servers that were killed", removed)
    return removed


def is_abandoned(root: Path) -> bool:
    try:
        with open(root / LOCK_FILE) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
            return True
    except BlockingIOError:
        return False  # its server lives
    except OSError:
        try:
            return time.time() - root.stat().st_mtime > YOUNG_S
        except OSError:
            return False
