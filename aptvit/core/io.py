"""The file boundary: user errors, reading and writing files with one clear message, and the size limit.

Writing goes through a temporary name in the same folder, then a rename. Missing folders on the way to a file
are created, for the command line and the Python API alike, and each one is reported (INFO on the "aptvit"
logger, which the command line prints), so that a typo in a folder name shows at once. Failures are mapped to messages by
where they happen (reading a file, writing a file), not by exception type: ``reading(path)`` and
``writing(path)`` turn whatever a read or a write raises into a ``UserError`` that names the file and says what
to do. The command line shows a ``UserError`` as one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Union

# The largest image side (pixels) that aptvit reads, resizes to or builds a model for: a guard against a typo
# (--size 100000) or a hostile checkpoint allocating tens of gigabytes. Detection at 1536 px is far below it.
MAX_SIDE = 8192

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A failure of the user's input, files or machine rather than of aptvit: its message is shown as is."""


class InputError(UserError, ValueError):
    """A bad argument or a file whose content cannot be used (a ``ValueError`` for API callers)."""


class UserTypeError(UserError, TypeError):
    """An argument of the wrong kind, e.g. a model aptvit does not support (a ``TypeError`` for API callers)."""


class MissingDependency(UserError, ImportError):
    """An optional package that a feature needs is not installed (an ``ImportError`` for API callers)."""


@functools.lru_cache(maxsize=None)
def _user_os_error_type(kind: type) -> type:
    """``UserError`` combined with an ``OSError`` subclass, so that API callers still catch what they did."""
    return type(f"User{kind.__name__}", (UserError, kind), {"__module__": __name__})


def user_os_error(original: OSError, message: str) -> UserError:
    """A ``UserError`` that is also an ``original``-type ``OSError`` (e.g. ``FileNotFoundError``), with ``message``."""
    return _user_os_error_type(type(original))(message)


_REASONS = {
    errno.ENOENT: "does not exist",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "is not a folder (a part of the path is a file)",
    errno.ELOOP: "is a symbolic link loop",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in _REASONS:
        return _REASONS[e.errno]
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return _first_line(e)


@contextmanager
def reading(path: Union[str, os.PathLike], what: str = "file", hint: str = ""):
    """Turn any failure inside the block (an ``OSError``, a parser's error) into one line naming ``path``.

    Keep the block to the read and the parse of that one file, so that what fails there is the file.

    Args:
        what: what the file is to the user ("image", "checkpoint", "run settings").
        hint: what to do about it, appended after a semicolon.
    """
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        where = f"{what} {str(path)!r}"
        if e.errno in (errno.ENOENT, errno.EISDIR, errno.ELOOP, errno.ENOTDIR):
            message = f"{where} {_reason(e)}"
        else:
            message = f"cannot read {where}: {_reason(e)}"
        raise user_os_error(e, message + (f"; {hint}" if hint else "")) from e
    except Exception as e:  # the file's content: whatever its parser raises (SafetensorError, JSON, PIL, unpickling)
        raise InputError(f"cannot read {what} {str(path)!r}: {_first_line(e)}" + (f"; {hint}" if hint else "")) from e


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(_existing_ancestor(folder)).free < 1 << 20
    except OSError:
        return False


def _write_message(path: Path, e: BaseException) -> str:
    reason = _REASONS[errno.ENOSPC] if not isinstance(e, OSError) and _disk_full(path.parent) else _reason(e)
    hint = {
        "no space left on device": "free some space or write elsewhere",
        "read-only file system": "choose a writable folder",
        "permission denied": "choose a writable folder",
    }.get(reason)
    return f"cannot write {str(path)!r}: {reason}" + (f"; {hint}" if hint else "")


@contextmanager
def writing(path: Union[str, os.PathLike]):
    """Turn a failed write inside the block (full or read-only disk, permissions, a folder) into one line naming ``path``.

    torch.save and safetensors report a failed write as their own errors ("enforce fail at inline_container.cc");
    those count when they say so or the disk is full. Any other error inside the block is a bug and passes.
    """
    path = Path(path)
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        raise user_os_error(e, _write_message(path, e)) from e
    except Exception as e:
        if not isinstance(e, RuntimeError) and type(e).__name__ != "SafetensorError":
            raise
        if "write" not in str(e).lower() and not _disk_full(path.parent):
            raise
        raise user_os_error(OSError(), _write_message(path, e)) from e


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Union[str, os.PathLike], folder: bool = False) -> Path:
    """Fail now, before any work, if ``path`` (a file, or with ``folder`` a folder) cannot be written.

    Writes and removes one byte in the nearest existing folder on the way; creates nothing else.
    """
    path = Path(path)
    with writing(path):
        if path.exists() and path.is_dir() != folder:
            code = errno.EISDIR if path.is_dir() else errno.ENOTDIR
            raise OSError(code, os.strerror(code), str(path))
        where = _existing_ancestor(path if folder else path.parent)
        if not where.is_dir():
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(where))
        fd, probe = tempfile.mkstemp(prefix=".aptvit-probe.", suffix=".tmp", dir=where)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    return path


def remove_temporaries(folder: Union[str, os.PathLike], names: Iterable[str]) -> int:
    """Delete the temporaries that a killed ``atomic_write`` of ``names`` left in ``folder``; returns how many."""
    count = 0
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            count += 1
    return count


def check_side(value, name: str = "--size") -> int:
    """``value`` as an image side in pixels: a positive int up to ``MAX_SIDE``, or an ``InputError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} {value} must be a positive number of pixels")
    if value > MAX_SIDE:
        raise InputError(
            f"{name} {value} is above the limit of {MAX_SIDE} pixels per side (aptvit.core.io.MAX_SIDE); "
            "use a smaller size"
        )
    return value


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_mode()


def make_folder(folder: Union[str, os.PathLike], purpose: str = "") -> Path:
    """Create ``folder`` and any missing folders above it, reporting the highest one created ("created folder
    'runs/new' for 'runs/new/m.safetensors'"); nothing is said when it exists. ``purpose``: what it is for."""
    folder = Path(folder)
    if not folder.is_dir():
        top = folder
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        folder.mkdir(parents=True, exist_ok=True)
        logger.info(f"created folder {str(top)!r}" + (f" for {purpose}" if purpose else " (it did not exist)"))
    return folder


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the result to ``path``: a crash never leaves a half-written file.
    Missing folders above ``path`` are created (``make_folder``, which reports them).

    Raises:
        UserError (also an OSError) naming ``path`` when the write fails (full or read-only disk, ...).
    """
    atomic_write_many([(path, write)])
    return Path(path)


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
            with writing(path):
                make_folder(path.parent, repr(str(path)))
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                os.close(fd)
                staged.append((tmp, path))
                write(tmp)
                os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; a user's file gets the usual umask-based mode
        for tmp, path in staged:
            with writing(path):
                os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
