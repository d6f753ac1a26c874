"""Progress of the long loops (``eval``, ``calibrate``, agreement with a teacher, a training epoch).

On a terminal: tqdm's bar, cleared when done. Anywhere else (a log file, ``nohup``, CI) tqdm on its own draws
nothing, so an hour-long ``aptvit calibrate`` in the background said nothing for an hour; there the same tqdm
status goes to stderr as whole lines, one per ``LOG_EVERY_S`` seconds once a loop has run that long (short runs
print nothing), and a last line when it ends. stdout, where results go, is never touched.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional

LOG_EVERY_S = 60.0  # seconds between progress lines when stderr is not a terminal (and before the first)


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines on stderr."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            sys.stderr.write(line + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def progress(
    iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, enabled: bool = True, **tqdm_args
):
    """A tqdm over ``iterable`` (or of ``total`` steps, advanced with ``update``): a bar on a terminal, timed lines
    on stderr elsewhere, nothing when not ``enabled``; ``tqdm_args`` (``unit=`` ...) are tqdm's."""
    from tqdm import tqdm

    if not enabled:
        return tqdm(iterable, total=total, disable=True, **tqdm_args)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, leave=False, **tqdm_args)
    every = LOG_EVERY_S
    timing = dict(delay=every, mininterval=every, maxinterval=max(every, 1.0))
    return tqdm(iterable, desc=desc, total=total, file=_Lines(), disable=False, **timing, **tqdm_args)
