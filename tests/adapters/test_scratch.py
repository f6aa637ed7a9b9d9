"""A server without --adapter-dir keeps adapters in a temporary directory; a killed server's is removed by the
next one that starts, a living server's never is."""
import os
import subprocess
import sys
import time
from pathlib import Path

from loraserve.adapters.scratch import PREFIX, ScratchAdapterDirectory, remove_abandoned

HOLD = """
import sys, time
from pathlib import Path
from loraserve.adapters.scratch import ScratchAdapterDirectory
scratch = ScratchAdapterDirectory(Path(sys.argv[1]))
print(scratch.root, flush=True)
time.sleep(60)
"""


def test_a_killed_servers_directory_is_removed_and_a_living_ones_kept(tmp_path: Path) -> None:
    living = ScratchAdapterDirectory(tmp_path)
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parents[2])
    killed = Path(process.stdout.readline().strip())
    (killed / "adapters" / "tuned").mkdir()
    assert remove_abandoned(tmp_path) == 0  # its process still holds the lock
    process.kill()
    process.wait()
    assert remove_abandoned(tmp_path) == 1
    assert not killed.exists() and living.path.is_dir()
    living.cleanup()
    assert not living.root.exists()


def test_a_directory_without_a_lock_is_removed_only_once_it_is_old(tmp_path: Path) -> None:
    starting = tmp_path / f"{PREFIX}starting"
    starting.mkdir()
    assert remove_abandoned(tmp_path) == 0
    old = time.time() - 3600
    os.utime(starting, (old, old))
    assert remove_abandoned(tmp_path) == 1
