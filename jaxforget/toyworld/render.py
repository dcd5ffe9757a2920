"""Deterministic renderer of the toy world: one coloured object drawn over a styled background.

Why these choices (see docs in ``jaxforget/toyworld/__init__.py``):
- 32x32 RGB: every shape and texture below stays recognizable (texture periods >= 4 px, objects
  18-25 px across), the SD-style VAE (4x downsampling) gives 8x8x4 latents, and the UNet can
  learn the world on two CPU cores. 64x64 would cost ~4x per step for no new concept.
- Everything is drawn at 4x and box-filtered down, so edges are anti-aliased like a real image
  and not a pixel-exact template a model could memorize.
- Visibility by construction: objects are saturated and bright (HSV s >= 0.75, v >= 0.8);
  backgrounds are muted (s <= 0.3) two-tone palettes whose hue keeps away from the object's hue
  unless they are nearly grey. A red circle on a "plain" reddish background therefore still
  stands out by saturation, and a dark/light texture never hides the shape.
- Randomness comes only from ``seed``, in independent streams for background, object geometry
  and object shade, so the same seed gives the same background for different objects/colours
  (handy for paired comparisons) and the same bytes on every run and machine.
"""

from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

OBJECTS: tuple[str, ...] = (
    "circle", "ring", "ellipse", "square", "diamond", "triangle", "star", "cross", "heart", "arrow",
)
STYLES: tuple[str, ...] = (
    "plain", "gradient", "noise", "dots", "checker", "grid", "waves", "bricks",
    "horizontal stripes", "vertical stripes",
)
# Base hues in degrees; shades vary a little per seed (hue +-4 deg, s, v) but never cross over.
COLOURS: dict[str, float] = {
    "red": 0.0, "orange": 28.0, "yellow": 54.0, "green": 125.0, "blue": 220.0, "purple": 282.0,
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

DEFAULT_SIZE = 32
SUPERSAMPLE = 4
# Seeds >= EVAL_SEED_BASE are reserved for held-out evaluation; training code draws below it.
EVAL_SEED_BASE = 2**31


@dataclass(frozen=True)
class RenderSpec:
    """Everything that determines one image. ``obj`` None = background only."""

    obj: str | None
    style: str
    colour: str | None
    seed: int


# ----------------------------------------------------------------------------- colours
def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), np.float32)


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def object_rgb(colour: str, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A saturated, bright shade of a named colour (RGB in [0, 1]) and its hue."""
    hue = COLOURS[colour] + rng.uniform(-4.0, 4.0)
    return _hsv(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)), hue


def background_tones(rng: np.random.Generator, object_hue: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Two muted tones (dark, light). Their hue keeps >= 60 deg from the object's unless grey."""
    while True:  # rejection loop on its own stream: terminates quickly (>= 2/3 acceptance)
        hue = rng.uniform(0.0, 360.0)
        s_dark, s_light = rng.uniform(0.0, 0.3), rng.uniform(0.0, 0.3)
        coloured = max(s_dark, s_light) > 0.12
        if object_hue is None or not coloured or _hue_distance(hue, object_hue) >= 60.0:
            break
    hue2 = hue + rng.uniform(-25.0, 25.0)
    dark = _hsv(hue, s_dark, rng.uniform(0.12, 0.35))
    light = _hsv(hue2, s_light, rng.uniform(0.6, 0.88))
    return dark, light


# ----------------------------------------------------------------------------- textures
# Each texture returns a mix map m in [0, 1] on the supersampled grid; the background is
# dark * (1 - m) + light * m. x, y are pixel coordinates in *output* pixels (pixel centres).
Texture = Callable[[np.ndarray, np.ndarray, np.random.Generator, int], np.ndarray]


def _plain(x, y, rng, size):
    return np.full_like(x, rng.uniform(0.0, 1.0))


def _gradient(x, y, rng, size):
    # Full dark-to-light ramp along a random direction, stretched so that both ends saturate
    # over the outer ~10%: the ramp stays obvious around the object (never mistaken for plain).
    ang = rng.uniform(0.0, 2.0 * math.pi)
    p = (x - size / 2) * math.cos(ang) + (y - size / 2) * math.sin(ang)
    p = (p - p.min()) / (p.max() - p.min())
    return np.clip(1.25 * (p - 0.5) + 0.5, 0.0, 1.0)


def _noise(x, y, rng, size):
    # Per-output-pixel random levels: crisp "TV noise" (not smooth, unlike gradient/plain).
    cell = int(rng.choice([1, 1, 2]))
    n = -(-size // cell)
    levels = rng.uniform(0.0, 1.0, (n, n)).astype(np.float32)
    return levels[(y // cell).astype(int), (x // cell).astype(int)]


def _dots(x, y, rng, size):
    period = rng.uniform(6.0, 8.0)
    radius = rng.uniform(1.4, 2.0)
    ox, oy = rng.uniform(0.0, period, 2)
    stagger = rng.random() < 0.5  # square or staggered lattice
    row = np.floor((y + oy) / period)
    xs = x + ox + (row % 2) * period / 2 * stagger
    dx = (xs % period) - period / 2
    dy = ((y + oy) % period) - period / 2
    return (dx * dx + dy * dy <= radius * radius).astype(np.float32)


def _checker(x, y, rng, size):
    cell = rng.uniform(4.0, 6.0)
    ox, oy = rng.uniform(0.0, 2 * cell, 2)
    return ((np.floor((x + ox) / cell) + np.floor((y + oy) / cell)) % 2).astype(np.float32)


def _grid(x, y, rng, size):
    period = rng.uniform(6.0, 8.0)
    width = rng.uniform(1.0, 1.5)
    ox, oy = rng.uniform(0.0, period, 2)
    return (((x + ox) % period < width) | ((y + oy) % period < width)).astype(np.float32)


def _waves(x, y, rng, size):
    period = rng.uniform(6.0, 8.0)
    wavelength = rng.uniform(10.0, 15.0)
    amp = rng.uniform(1.6, 2.4)
    phase, oy = rng.uniform(0.0, 2 * math.pi), rng.uniform(0.0, period)
    yy = y + oy + amp * np.sin(2 * math.pi * x / wavelength + phase)
    return ((yy % period) < period / 2).astype(np.float32)


def _bricks(x, y, rng, size):
    height = rng.uniform(5.0, 6.5)
    width = height * rng.uniform(1.8, 2.3)
    ox, oy = rng.uniform(0.0, width), rng.uniform(0.0, height)
    row = np.floor((y + oy) / height)
    xs = x + ox + (row % 2) * width / 2
    mortar = ((y + oy) % height < 1.0) | (xs % width < 1.0)
    return mortar.astype(np.float32)


def _hstripes(x, y, rng, size):
    period = rng.uniform(5.0, 8.0)
    return (((y + rng.uniform(0.0, period)) % period) < period / 2).astype(np.float32)


def _vstripes(x, y, rng, size):
    period = rng.uniform(5.0, 8.0)
    return (((x + rng.uniform(0.0, period)) % period) < period / 2).astype(np.float32)


TEXTURES: dict[str, Texture] = {
    "plain": _plain, "gradient": _gradient, "noise": _noise, "dots": _dots, "checker": _checker,
    "grid": _grid, "waves": _waves, "bricks": _bricks,
    "horizontal stripes": _hstripes, "vertical stripes": _vstripes,
}
assert tuple(TEXTURES) == STYLES


# ----------------------------------------------------------------------------- shapes
# Shapes are polygons in unit coordinates (radius ~1, y down), rotated and scaled per seed.
def _regular(n: int, r: float = 1.0, start: float = -math.pi / 2) -> np.ndarray:
    a = start + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], -1)


def _ellipse_poly(a: float, b: float, n: int = 72) -> np.ndarray:
    t = np.arange(n) * 2 * math.pi / n
    return np.stack([a * np.cos(t), b * np.sin(t)], -1)


def _star() -> np.ndarray:
    outer = _regular(5, 1.0)
    inner = _regular(5, 0.42, start=-math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], 1).reshape(-1, 2)


def _cross() -> np.ndarray:
    w, l = 0.32, 0.95
    return np.array([(-w, -l), (w, -l), (w, -w), (l, -w), (l, w), (w, w), (w, l), (-w, l),
                     (-w, w), (-l, w), (-l, -w), (-w, -w)])


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], -1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def _arrow() -> np.ndarray:
    s, head, hw = 0.24, 0.05, 0.7  # shaft half-width, head start x, head half-height
    return np.array([(-1.0, -s), (head, -s), (head, -hw), (1.0, 0.0), (head, hw), (head, s), (-1.0, s)])


@dataclass(frozen=True)
class _Shape:
    polys: Callable[[np.random.Generator], list[tuple[np.ndarray, int]]]  # (polygon, fill 1/0)
    rotation: Callable[[np.random.Generator], float]  # radians


def _rot(deg: float) -> Callable[[np.random.Generator], float]:
    return lambda rng: math.radians(rng.uniform(-deg, deg))


SHAPES: dict[str, _Shape] = {
    "circle": _Shape(lambda r: [(_ellipse_poly(0.92, 0.92), 1)], _rot(0)),
    "ring": _Shape(lambda r: [(_ellipse_poly(0.95, 0.95), 1), (_ellipse_poly(0.52, 0.52), 0)], _rot(0)),
    # aspect <= 0.6 keeps ellipses clearly apart from circles at 32 px
    "ellipse": _Shape(lambda r: [(_ellipse_poly(1.0, r.uniform(0.45, 0.6)), 1)],
                      lambda r: r.uniform(0.0, math.pi)),
    "square": _Shape(lambda r: [(np.array([(-.8, -.8), (.8, -.8), (.8, .8), (-.8, .8)]), 1)], _rot(12)),
    # a rhombus taller than wide, upright: never confused with a tilted square
    "diamond": _Shape(lambda r: [(np.array([(0, -1.0), (.68, 0), (0, 1.0), (-.68, 0)]), 1)], _rot(12)),
    "triangle": _Shape(lambda r: [(_regular(3, 1.0) + np.array([0, 0.18]), 1)], _rot(15)),
    "star": _Shape(lambda r: [(_star(), 1)], _rot(36)),
    "cross": _Shape(lambda r: [(_cross(), 1)], _rot(12)),
    "heart": _Shape(lambda r: [(_heart(), 1)], _rot(12)),
    # arrows point right, down, left or up (+-12 deg)
    "arrow": _Shape(lambda r: [(_arrow(), 1)],
                    lambda r: math.radians(90.0 * r.integers(0, 4) + r.uniform(-12, 12))),
}
assert tuple(SHAPES) == OBJECTS


def object_mask(obj: str, rng: np.random.Generator, size: int, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Float mask [size*ss, size*ss] in {0, 1} of one object with seeded pose."""
    shape = SHAPES[obj]
    radius = size * rng.uniform(0.28, 0.38)
    slack = max(0.0, size / 2 - radius - 1.0)  # keep the whole object inside the frame
    jit = min(slack, size * 0.12)
    cx, cy = size / 2 + rng.uniform(-jit, jit, 2)
    ang = shape.rotation(rng)
    c, s = math.cos(ang), math.sin(ang)
    rot = np.array([[c, s], [-s, c]])
    img = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(img)
    for poly, fill in shape.polys(rng):
        pts = (poly @ rot) * radius
        pts = (pts + np.array([cx, cy])) * ss
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255 * fill)
    return np.asarray(img, np.float32) / 255.0


# ----------------------------------------------------------------------------- render
@functools.lru_cache(maxsize=8)
def _grid_coords(size: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
    x, y = np.meshgrid(coords, coords)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return tuple(np.random.default_rng([seed, k]) for k in (1, 2, 3))  # type: ignore[return-value]


def render(
    obj: str | None,
    style: str | None,
    color: str | None,
    seed: int,
    size: int = DEFAULT_SIZE,
) -> np.ndarray:
    """Render one image, uint8 [size, size, 3].

    ``obj`` None draws the background only. ``style`` / ``color`` None are drawn from the seed
    (so "a star" means a star of some colour on some background).
    """
    if obj is not None and obj not in SHAPES:
        raise ValueError(f"unknown object {obj!r}; known: {', '.join(OBJECTS)}")
    if style is not None and style not in TEXTURES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    if color is not None and color not in COLOURS:
        raise ValueError(f"unknown colour {color!r}; known: {', '.join(COLOUR_NAMES)}")
    bg_rng, obj_rng, col_rng = _streams(seed)
    # Unspecified attributes come from a fourth stream so that specifying them does not shift
    # the other streams (same seed and colour -> same background whatever the object, or none).
    pick = np.random.default_rng([int(seed), 4])
    style = style or STYLES[int(pick.integers(len(STYLES)))]
    color = color or COLOUR_NAMES[int(pick.integers(len(COLOUR_NAMES)))]

    ss = SUPERSAMPLE
    x, y = _grid_coords(size, ss)
    rgb, hue = object_rgb(color, col_rng)
    # the palette avoids the colour's hue even without an object, so that a scene and its
    # empty version (same seed and colour) share the exact same background
    dark, light = background_tones(bg_rng, hue)
    if bg_rng.random() < 0.5:  # light-on-dark or dark-on-light texture
        dark, light = light, dark
    m = TEXTURES[style](x, y, bg_rng, size)
    a = object_mask(obj, obj_rng, size, ss) if obj is not None else np.zeros_like(m)
    # Compositing is linear in the three weight maps, so box-filter them (anti-aliasing) first
    # and mix colours at output resolution: exact, and ~10x cheaper than filtering RGB.
    weights = np.stack([(1.0 - m) * (1.0 - a), m * (1.0 - a), a], -1)
    weights = weights.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    img = weights @ np.stack([dark, light, rgb])
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def render_spec(spec: RenderSpec, size: int = DEFAULT_SIZE) -> np.ndarray:
    return render(spec.obj, spec.style, spec.colour, spec.seed, size)


def render_batch(specs: Sequence[RenderSpec], size: int = DEFAULT_SIZE) -> np.ndarray:
    """uint8 [N, size, size, 3]."""
    out = np.empty((len(specs), size, size, 3), np.uint8)
    for i, spec in enumerate(specs):
        out[i] = render_spec(spec, size)
    return out


def random_specs(
    rng: np.random.Generator,
    n: int,
    *,
    p_empty: float = 0.0,
    seed_low: int = 0,
    seed_high: int = EVAL_SEED_BASE,
    objects: Iterable[str] = OBJECTS,
    styles: Iterable[str] = STYLES,
    colours: Iterable[str] = COLOUR_NAMES,
) -> list[RenderSpec]:
    """n fully specified scenes drawn uniformly; ``p_empty`` of them without an object.

    Seeds come from [seed_low, seed_high): training uses the default range, held-out evaluation
    passes ``seed_low=EVAL_SEED_BASE``.
    """
    objects, styles, colours = tuple(objects), tuple(styles), tuple(colours)
    specs = []
    for _ in range(n):
        empty = rng.random() < p_empty
        obj = None if empty else objects[int(rng.integers(len(objects)))]
        style = styles[int(rng.integers(len(styles)))]
        colour = None if empty else colours[int(rng.integers(len(colours)))]
        specs.append(RenderSpec(obj, style, colour, int(rng.integers(seed_low, seed_high))))
    return specs


def example_grid(
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    scale: int = 3,
    objects: Sequence[str] = OBJECTS,
    styles: Sequence[str] = STYLES,
) -> np.ndarray:
    """uint8 grid (rows: objects, columns: styles; colours cycle) upscaled ``scale``x, 2px gaps."""
    cell = size * scale + 2
    grid = np.full((len(objects) * cell, len(styles) * cell, 3), 255, np.uint8)
    for i, obj in enumerate(objects):
        for j, style in enumerate(styles):
            colour = COLOUR_NAMES[(i + j) % len(COLOUR_NAMES)]
            img = render(obj, style, colour, seed + i * len(styles) + j, size)
            img = np.repeat(np.repeat(img, scale, 0), scale, 1)
            grid[i * cell:i * cell + size * scale, j * cell:j * cell + size * scale] = img
    return grid


def save_example_grid(path: str | Path, seed: int = 0, scale: int = 3) -> Path:
    """Write the objects x styles example grid, labelled, as a PNG (docs/toyworld_examples.png)."""
    from PIL import ImageFont

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = Image.fromarray(example_grid(seed=seed, scale=scale))
    cell = DEFAULT_SIZE * scale + 2
    left, top = 64, 30
    canvas = Image.new("RGB", (grid.width + left, grid.height + top), (255, 255, 255))
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, style in enumerate(STYLES):
        draw.multiline_text((left + j * cell + 2, 2), style.replace(" ", "\n"), fill=(0, 0, 0), font=font)
    for i, obj in enumerate(OBJECTS):
        draw.text((4, top + i * cell + cell // 2 - 6), obj, fill=(0, 0, 0), font=font)
    canvas.save(path, optimize=True)
    return path
