"""Progress of the long loops (``eval``, ``calibrate``, ``bench``, agreement with a teacher).

On a terminal: tqdm's bar, cleared when done. Anywhere else (a log file, ``nohup``, CI) tqdm on its own draws
nothing, so an hour-long ``aptvit calibrate`` in the background said nothing for an hour; there the same tqdm
status goes to stderr as whole lines, one per ``LOG_EVERY_S`` seconds once a loop has run that long (short runs
print nothing), and a last line when it ends. stdout, where results go, is never touched. (``finetune`` logs a
metrics line every ``--log-every`` steps instead.)
"""

from __future__ import annotations

import re
import sys
from typing import Iterable, Optional

LOG_EVERY_S = 60.0  # seconds between progress lines when stderr is not a terminal (and before the first)

_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's cursor moves between stacked bars: meaningless in a log


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines on stderr, each once."""

    def __init__(self):
        self.last = None

    def write(self, text: str) -> None:
        line = _CURSOR.sub("", text).replace("\r", "").rstrip()
        count = line.split(" [")[0]  # "desc: 100%|###| 4/4", without the times and rate that follow
        if line and count != self.last:  # close() redraws the count the last step may have drawn already
            sys.stderr.write(line + "\n")
            self.last = count

    def flush(self) -> None:
        sys.stderr.flush()


def _terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)  # stderr may be None (pythonw) or a stream without isatty
    return bool(isatty and isatty())


def progress(
    iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, enabled: bool = True, **tqdm_args
):
    """A tqdm over ``iterable`` (or of ``total`` steps, advanced with ``update``): a bar on a terminal, timed lines
    on stderr elsewhere, nothing when not ``enabled``; ``tqdm_args`` (``unit=`` ...) are tqdm's."""
    from tqdm import tqdm

    if not enabled or sys.stderr is None:
        return tqdm(iterable, total=total, disable=True, **tqdm_args)
    if _terminal():
        return tqdm(iterable, desc=desc, total=total, leave=False, **tqdm_args)
    every = LOG_EVERY_S
    # miniters=1: the time is checked at every step, so tqdm's monitor thread never redraws a stale count
    timing = dict(delay=every, mininterval=every, maxinterval=max(every, 1.0), miniters=1)
    return tqdm(iterable, desc=desc, total=total, file=_Lines(), disable=False, **timing, **tqdm_args)
