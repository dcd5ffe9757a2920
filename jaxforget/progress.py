"""Progress bars (tqdm), quiet enough for CI logs: redrawn at most every 2 s when not on a terminal."""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 initial: int = 0, **kw: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True,
                mininterval=0.2 if interactive else 2.0, leave=interactive, **kw)
