"""Optional TensorBoard logs of a continual run (``tensorboard: true`` in the run config).

Under ``<run_dir>/tensorboard``: ``train/<term>`` scalars (loss, grad_norm and each method term)
every 10 steps, on a global step ``request_index * steps + step``; after each evaluated request,
``eval/<metric>`` scalars (UA, IRA, CRA, NRA, FID proxy, ...) and the request's image grid
``eval/grid`` on step k (the number of requests in the chain). A resumed run appends a new event
file to the same folder; TensorBoard merges them.

Event files are written by tensorboardX (pure Python, no TensorFlow or PyTorch):
``pip install 'jaxforget[tensorboard]'``. Host-side only: nothing here runs inside ``jax.jit``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxforget.errors import ConfigError

SUBDIR = "tensorboard"


class TensorBoardLog:
    """A tensorboardX writer with the run's tag layout."""

    def __init__(self, run_dir: str | Path):
        """Checks for tensorboardX at once (a run checks before it creates its directory); the
        event file is created on the first write."""
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard: true needs tensorboardX (pip install 'jaxforget[tensorboard]')") from None
        self.logdir = Path(run_dir) / SUBDIR
        self._writer_cls = SummaryWriter
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            self._writer = self._writer_cls(str(self.logdir))
        return self._writer

    def train(self, global_step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            if _finite(value):
                self.writer.add_scalar(f"train/{name}", float(value), global_step)

    def request(self, k: int, metrics: Mapping[str, Any], grid: str | Path | None = None) -> None:
        """Evaluation figures of the model after request k, and its image grid (a PNG file)."""
        for name, value in metrics.items():
            if _finite(value):
                self.writer.add_scalar(f"eval/{name}", float(value), k)
        if grid is not None and Path(grid).is_file():
            from PIL import Image

            with Image.open(grid) as im:
                pixels = np.asarray(im.convert("RGB"))
            self.writer.add_image("eval/grid", pixels, k, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _finite(value: Any) -> bool:
    # numbers only: report rows also carry strings (target, domain) and bools
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool) \
        and math.isfinite(float(value))
