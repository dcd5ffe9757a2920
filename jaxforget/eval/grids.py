"""Image grids (PNG) with optional row labels and marked rows (e.g. removed concepts)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] float in [0, 1] or uint8 -> uint8."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def make_grid(
    images: np.ndarray,
    rows: int,
    cols: int,
    *,
    scale: int = 1,
    pad: int = 2,
    row_labels: Sequence[str] | None = None,
    marked_rows: Sequence[int] = (),
    label_width: int = 0,
) -> Image.Image:
    """Tile ``rows * cols`` images (row-major); rows in ``marked_rows`` get a red frame."""
    imgs = to_uint8(images)
    n, h, w, _ = imgs.shape
    if n > rows * cols:
        raise ValueError(f"{n} images do not fit a {rows}x{cols} grid")
    h, w = h * scale, w * scale
    if row_labels is not None and not label_width:
        label_width = 7 * max((len(s) for s in row_labels), default=0) + 8
    canvas = Image.new("RGB", (label_width + cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(imgs[i]).resize((w, h), Image.NEAREST)
        canvas.paste(tile, (label_width + pad + c * (w + pad), pad + r * (h + pad)))
    for r in range(rows):
        y0 = pad + r * (h + pad)
        if row_labels is not None and r < len(row_labels):
            draw.text((4, y0 + h // 2 - 5), row_labels[r], fill="red" if r in marked_rows else "black")
        if r in marked_rows:
            draw.rectangle([label_width + 1, y0 - 1, canvas.width - 2, y0 + h], outline="red", width=2)
    return canvas


def save_grid(images: np.ndarray, path: str | Path, rows: int, cols: int, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, rows, cols, **kw).save(path)
    return path
