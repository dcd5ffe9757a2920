"""The toy world's judge: a small CNN with an object, a style and a colour head.

It is the benchmark's accuracy metric (UnlearnCanvas's classifiers play this role for SD) and
its penultimate features feed the FID proxy. The object head has one extra class, "none"
(background only), so that an unlearned model that draws nothing is read as "no object"
instead of being forced onto some shape. The colour head is meaningless when the object head
says "none" (it is trained only on images with an object).

Training draws fresh scenes every step (seeds below ``EVAL_SEED_BASE``) and mildly corrupts
part of each batch (blur, noise, brightness/contrast), so the judge also reads the slightly
soft images a small diffusion model + VAE produces; accuracy is measured on clean renders with
held-out seeds (>= ``EVAL_SEED_BASE``).

Files: ``model.safetensors`` (PyTorch-style keys through ``jaxforget.io.weights``) and
``config.json`` (architecture, class names, training record).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxforget.errors import CheckpointFormatError
from jaxforget.io.weights import KeyTable, load_module_weights, module_to_tensors, save_tensors
from jaxforget.models.layers import Conv2d, GroupNorm, Linear
from jaxforget.toyworld.render import (
    COLOUR_NAMES,
    DEFAULT_SIZE,
    EVAL_SEED_BASE,
    OBJECTS,
    STYLES,
    RenderSpec,
    random_specs,
    render_batch,
)

NONE_OBJECT = "none"
HEADS = ("object", "style", "colour")
JUDGE_TABLE = KeyTable(name="toyworld judge")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_JUDGE_DIR = Path(__file__).resolve().parent.parent / "assets" / "toyworld" / "judge"


@dataclass(frozen=True)
class JudgeConfig:
    image_size: int = DEFAULT_SIZE
    # stem conv at full resolution, then per entry: a stride-2 conv and a conv (32 -> 4 px)
    stem_channels: int = 16
    channels: tuple[int, ...] = (32, 48, 64)
    feature_dim: int = 128
    # GroupNorm costs ~4x the convs on XLA:CPU for this net; without it He-scaled init and Adam
    # train the 7-layer net just as well, so it is off by default.
    norm: bool = False
    groups: int = 8
    objects: tuple[str, ...] = OBJECTS + (NONE_OBJECT,)
    styles: tuple[str, ...] = STYLES
    colours: tuple[str, ...] = COLOUR_NAMES

    def classes(self, head: str) -> tuple[str, ...]:
        return {"object": self.objects, "style": self.styles, "colour": self.colours}[head]

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, raw: Mapping) -> "JudgeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown judge config keys: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


# ----------------------------------------------------------------------------- model
class ConvBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, config: JudgeConfig, *, stride: int = 1, rngs: nnx.Rngs):
        self.conv = Conv2d(cin, cout, 3, stride=stride, padding=1, rngs=rngs)
        self.norm = GroupNorm(config.groups, cout) if config.norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        return jax.nn.silu(self.norm(x) if self.norm is not None else x)


class Judge(nnx.Module):
    """Small all-convolutional classifier; strided convs keep it cheap on CPU."""

    def __init__(self, config: JudgeConfig, *, rngs: nnx.Rngs):
        self.config = config
        blocks = [ConvBlock(3, config.stem_channels, config, rngs=rngs)]
        cin = config.stem_channels
        for c in config.channels:
            blocks += [ConvBlock(cin, c, config, stride=2, rngs=rngs), ConvBlock(c, c, config, rngs=rngs)]
            cin = c
        self.blocks = nnx.List(blocks)
        self.proj = Linear(4 * cin, config.feature_dim, rngs=rngs)
        self.object_head = Linear(config.feature_dim, len(config.objects), rngs=rngs)
        self.style_head = Linear(config.feature_dim, len(config.styles), rngs=rngs)
        self.colour_head = Linear(config.feature_dim, len(config.colours), rngs=rngs)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """images: float [N, H, W, 3] in [0, 1]. Returns logits per head and features."""
        x = (images.astype(jnp.float32) - 0.5) * 4.0
        for block in self.blocks:
            x = block(x)
        # Mean over each quadrant (2x2 cells), not one global mean: keeps the coarse layout
        # that tells a gradient from a plain background, at 4x the (tiny) projection cost.
        n, h, w, c = x.shape
        x = x.reshape(n, 2, h // 2, 2, w // 2, c).mean(axis=(2, 4)).reshape(n, 4 * c)
        feats = jax.nn.silu(self.proj(x))
        return {
            "object_logits": self.object_head(feats),
            "style_logits": self.style_head(feats),
            "colour_logits": self.colour_head(feats),
            "features": feats,
        }


def init_judge(config: JudgeConfig | None = None, seed: int = 0) -> Judge:
    config = config or JudgeConfig()
    model = Judge(config, rngs=nnx.Rngs(params=seed))
    if not config.norm:
        # The shared layers use PyTorch's default init (variance 1/(3 fan_in)); without
        # normalization, activations would shrink layer by layer, so rescale conv kernels to
        # He-uniform (variance 2/fan_in).
        for block in model.blocks:
            block.conv.kernel[...] = block.conv.kernel[...] * np.sqrt(6.0)
    return model


# ----------------------------------------------------------------------------- inference
@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


def to_unit_float(images: np.ndarray | jax.Array, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """uint8 images -> float32 in [0, 1]; float images are mapped from ``value_range``."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    lo, hi = value_range
    return np.clip((arr.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def judge_predict(
    model: Judge,
    images: np.ndarray | jax.Array,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 512,
) -> dict[str, np.ndarray]:
    """Classify images [N, H, W, 3] (uint8, or float in ``value_range``).

    Returns numpy arrays: ``{head}_logits`` and ``{head}_probs`` for object / style / colour,
    and ``features`` [N, feature_dim] (for the FID proxy).
    """
    x = to_unit_float(images, value_range)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {x.shape}")
    graphdef, state = nnx.split(model)
    chunks = []
    for start in range(0, len(x), batch_size):
        part = x[start:start + batch_size]
        pad = (-len(part)) % batch_size if len(x) > batch_size else 0  # one compiled shape
        if pad:
            part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
        out = jax.device_get(_apply(graphdef, state, jnp.asarray(part)))
        chunks.append({k: v[: len(v) - pad] for k, v in out.items()})
    result = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    for head in HEADS:
        result[f"{head}_probs"] = np.asarray(jax.nn.softmax(result[f"{head}_logits"], axis=-1))
    return result


def predicted_names(model_or_config: Judge | JudgeConfig, pred: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """Argmax class names per head."""
    cfg = model_or_config.config if isinstance(model_or_config, Judge) else model_or_config
    return {h: [cfg.classes(h)[i] for i in np.argmax(pred[f"{h}_logits"], -1)] for h in HEADS}


# ----------------------------------------------------------------------------- data
def spec_targets(specs: Sequence[RenderSpec], config: JudgeConfig) -> dict[str, np.ndarray]:
    """Integer class targets per head; colour is -1 where there is no object (masked)."""
    obj = np.array([config.objects.index(s.obj or NONE_OBJECT) for s in specs], np.int32)
    sty = np.array([config.styles.index(s.style) for s in specs], np.int32)
    col = np.array([config.colours.index(s.colour) if s.obj else -1 for s in specs], np.int32)
    return {"object": obj, "style": sty, "colour": col}


def make_batch(rng: np.random.Generator, n: int, config: JudgeConfig, *, p_empty: float, seed_low: int = 0,
               seed_high: int = EVAL_SEED_BASE) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    specs = random_specs(rng, n, p_empty=p_empty, seed_low=seed_low, seed_high=seed_high,
                         objects=[o for o in config.objects if o != NONE_OBJECT],
                         styles=config.styles, colours=config.colours)
    return render_batch(specs, config.image_size), spec_targets(specs, config)


def augment(x: jax.Array, key: jax.Array, p: float = 0.7) -> jax.Array:
    """Mild corruptions on a fraction p of a float [N,H,W,3] batch in [0, 1]."""
    n = x.shape[0]
    k_on, k_blur, k_noise, k_sig, k_c, k_b = jax.random.split(key, 6)
    on = (jax.random.uniform(k_on, (n, 1, 1, 1)) < p).astype(x.dtype)
    # variable-strength blur: mix with a [1,2,1]/4 separable blur
    pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    bh = (pad[:, :, :-2] + 2 * pad[:, :, 1:-1] + pad[:, :, 2:]) / 4
    blur = (bh[:, :-2] + 2 * bh[:, 1:-1] + bh[:, 2:]) / 4
    a = jax.random.uniform(k_blur, (n, 1, 1, 1))
    y = (1 - a) * x + a * blur
    mean = y.mean(axis=(1, 2, 3), keepdims=True)
    y = (y - mean) * jax.random.uniform(k_c, (n, 1, 1, 1), minval=0.9, maxval=1.1) + mean
    y = y + jax.random.uniform(k_b, (n, 1, 1, 1), minval=-0.04, maxval=0.04)
    y = y + jax.random.uniform(k_sig, (n, 1, 1, 1), maxval=0.04) * jax.random.normal(k_noise, x.shape)
    return jnp.clip(on * y + (1 - on) * x, 0.0, 1.0)


def _losses(model: Judge, images: jax.Array, targets: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    out = model(images)
    metrics = {}
    total = 0.0
    for head in HEADS:
        t = targets[head]
        valid = (t >= 0).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(out[f"{head}_logits"], jnp.maximum(t, 0))
        loss = (ce * valid).sum() / jnp.maximum(valid.sum(), 1.0)
        acc = ((jnp.argmax(out[f"{head}_logits"], -1) == t) * valid).sum() / jnp.maximum(valid.sum(), 1.0)
        metrics[f"loss_{head}"] = loss
        metrics[f"acc_{head}"] = acc
        total = total + loss
    metrics["loss"] = total
    return total, metrics


# ----------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    model: Judge
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train_judge(
    steps: int = 1500,
    seed: int = 0,
    *,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    p_empty: float = 0.08,
    config: JudgeConfig | None = None,
    log_every: int = 50,
    callback: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train a judge on freshly rendered scenes (deterministic given ``seed``).

    ``callback(step, metrics)`` is called after every step (metrics are host floats every
    ``log_every`` steps and on the last one, else empty) so scripts can drive a progress bar.
    """
    config = config or JudgeConfig()
    model = init_judge(config, seed)
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10 + 1), steps, 0.02 * learning_rate)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step_fn(params, opt_state, images_u8, targets, key):
        x = augment(images_u8.astype(jnp.float32) / 255.0, key)

        def loss_fn(p):
            return _losses(nnx.merge(graphdef, p), x, targets)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    data_rng = np.random.default_rng([int(seed), 7])
    key = jax.random.key(int(seed))
    history: list[dict] = []
    t0 = time.perf_counter()
    # Render the next batch on a worker thread while XLA runs the current step (both release
    # the GIL for their heavy parts), so data costs little wall time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(make_batch, data_rng, batch_size, config, p_empty=p_empty)
        for step in range(1, steps + 1):
            images, targets = nxt.result()
            if step < steps:
                nxt = pool.submit(make_batch, data_rng, batch_size, config, p_empty=p_empty)
            params, opt_state, metrics = step_fn(params, opt_state, images, targets, jax.random.fold_in(key, step))
            logged: dict = {}
            if step % log_every == 0 or step == steps:
                logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
                logged["step"] = step
                history.append(logged)
            if callback is not None:
                callback(step, logged)
    model = nnx.merge(graphdef, params)
    return TrainResult(model, history, time.perf_counter() - t0)


def evaluate_judge(
    model: Judge,
    n: int = 2000,
    *,
    seed_base: int = EVAL_SEED_BASE,
    p_empty: float = 0.08,
) -> dict[str, float]:
    """Per-head accuracy on clean scenes rendered with held-out seeds (>= ``seed_base``)."""
    cfg = model.config
    rng = np.random.default_rng([int(seed_base), 8])
    images, targets = make_batch(rng, n, cfg, p_empty=p_empty, seed_low=seed_base, seed_high=seed_base + 2**30)
    pred = judge_predict(model, images)
    acc = {}
    for head in HEADS:
        t = targets[head]
        valid = t >= 0
        acc[head] = float((np.argmax(pred[f"{head}_logits"], -1)[valid] == t[valid]).mean())
    return acc


# ----------------------------------------------------------------------------- I/O
def write_judge_config(folder: Path, config: JudgeConfig, record: Mapping | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"_class_name": "ToyWorldJudge", **config.to_json()}
    if record:
        payload["training"] = dict(record)
    (folder / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def read_judge_config(folder: Path) -> tuple[JudgeConfig, dict]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointFormatError(f"{folder}: not a judge folder (missing {CONFIG_FILE})")
    try:
        raw = json.loads(path.read_text())
        record = raw.pop("training", {}) or {}
        raw.pop("_class_name", None)
        return JudgeConfig.from_json(raw), record
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointFormatError(f"{path}: invalid judge config ({str(err).splitlines()[0]})") from None


def save_judge(model: Judge, path: str | Path, record: Mapping | None = None, *, dtype=np.float16) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into folder ``path``.

    Weights are stored as float16 by default (the file ships in the repository: ~300 kB
    instead of ~600 kB; logits move by ~1e-3, accuracy does not) and load back as float32.
    """
    folder = Path(path)
    save_tensors(module_to_tensors(model, JUDGE_TABLE, dtype=dtype), folder / WEIGHTS_FILE)
    write_judge_config(folder, model.config, record)
    return folder


def load_judge(path: str | Path | None = None) -> Judge:
    """Load a judge folder (default: the one shipped in the package)."""
    folder = Path(path) if path is not None else DEFAULT_JUDGE_DIR
    config, _ = read_judge_config(folder)
    return load_module_weights(lambda: Judge(config, rngs=nnx.Rngs(0)), folder, JUDGE_TABLE)


def judge_record(path: str | Path | None = None) -> dict:
    """The training record stored beside a judge (steps, seed, accuracy, time)."""
    return read_judge_config(Path(path) if path is not None else DEFAULT_JUDGE_DIR)[1]
