"""Writing files a user cares about: through a temporary name in the same folder, then a rename."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_mode()


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the result to ``path``: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; a user's file gets the usual umask-based mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_many(files) -> None:
    """Several files that belong together: write every one to a temporary name, then rename them all.

    Args:
        files: (path, write) pairs as in ``atomic_write``. The renames come back to back, so a crash
            leaves either the old set or the new one, but for a window of microseconds rather than the
            seconds it takes to write a checkpoint.
    """
    staged = []
    try:
        for path, write in files:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
            os.chmod(tmp, _FILE_MODE)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
