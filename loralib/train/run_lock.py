"""One run per output folder: an exclusive flock on the folder itself, held by the process that trains into it.

    with output_dir_lock("runs/mrpc"):      # loralib.train.train does this on rank 0
        ...
    hold_output_dir("runs/mrpc")            # an entry point, before it writes run_config.json: held to exit

A second process asking for the same folder gets OutputDirInUse (a ValueError: the entry points print it as
one line). The lock is the kernel's (flock(2) on the folder's descriptor), so it dies with its process: a
crashed or killed run never leaves the folder locked, and there is no lock file to clean up or to make the
folder look non-empty. Within one process the lock is re-entrant (the entry point and the loop both take it).
Where flock is not available (Windows, some network file systems) the run goes on unlocked, with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import os
import threading
import warnings
from pathlib import Path
from typing import Dict, List

from ..files import check_output_folder

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_held: Dict[str, List[int]] = {}  # real path -> [descriptor, holders]
_guard = threading.Lock()


class OutputDirInUse(ValueError):
    """Another process is training into this output folder."""


def _key(path: os.PathLike) -> str:
    return os.path.realpath(path)


def acquire(output_dir: os.PathLike) -> bool:
    """Create `output_dir` if needed and lock it for this process; True when locked (False: no flock here).
    Raises OutputDirInUse when another process holds it."""
    output_dir = Path(output_dir)
    check_output_folder(output_dir, "output folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    key = _key(output_dir)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return True
        if fcntl is None:
            return False
        fd = os.open(key, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # close-on-exec: children do not hold it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputDirInUse(
                    f"output folder {str(output_dir)!r} is in use by another run (it holds the folder's lock); "
                    "wait for it to finish or choose another output folder") from None
            warnings.warn(f"{output_dir}: cannot lock the output folder ({e.strerror}); two runs started into it "
                          "would not be told apart", stacklevel=3)
            return False
        _held[key] = [fd, 1]
        return True


def release(output_dir: os.PathLike) -> None:
    key = _key(output_dir)
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.close(entry[0])  # closing the last descriptor releases the flock


@contextlib.contextmanager
def output_dir_lock(output_dir: os.PathLike, enabled: bool = True):
    """Hold the folder's lock for the block (re-entrant; `enabled=False`: a no-op, for ranks other than 0)."""
    locked = enabled and acquire(output_dir)
    try:
        yield
    finally:
        if locked:
            release(output_dir)


def hold_output_dir(output_dir: os.PathLike) -> None:
    """Lock the folder until this process exits (an entry point, before its first write)."""
    acquire(output_dir)
