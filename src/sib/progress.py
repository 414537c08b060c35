"""Progress bars on a terminal; elsewhere, one line per stage.

tqdm redraws its bar with carriage returns. Written to a file (a redirected `make demo`, a cluster job's output)
every redraw stays: about 1,600 of them, 137 KB, most of the demo's log. So the bars show only when stderr is a
terminal; otherwise the trainer's own line per epoch and `stage_done`'s line per evaluation stage are the log.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def interactive() -> bool:
    """Whether stderr, where the bars go, is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar(iterable: Iterable, desc: str, disable: bool = False, **options: Any) -> tqdm:
    """A tqdm bar over `iterable` on a terminal; a silent one (same iteration, `set_postfix` a no-op) elsewhere."""
    return tqdm(iterable, desc=desc, disable=disable or not interactive(), **options)


def stage_done(message: str) -> None:
    """One line for a finished stage, where no bar showed it (stderr is not a terminal)."""
    if not interactive():
        print(message, file=sys.stderr, flush=True)
