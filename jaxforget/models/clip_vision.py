"""CLIP vision tower and the full two-tower CLIP model in Flax NNX, plus CLIP's image preprocessing.

The module tree mirrors transformers' names, so a parameter path joined by "." is the key found in
Hugging Face CLIP checkpoints (``openai/clip-vit-*``):

    vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}
    vision_model.pre_layrnorm.*   (sic: transformers' spelling)
    vision_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}
    vision_model.post_layernorm.*  visual_projection.weight
    text_model.*  text_projection.weight  logit_scale          (CLIPModel only)

The encoder layers are ``jaxforget.models.clip``'s (the text and vision towers share the layer;
the vision one has no mask). Pixels are NHWC. ``preprocess_images`` is CLIPImageProcessor's
resize (shortest edge, bicubic) + center crop + mean/std normalization as a pure jnp function.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxforget.errors import ConfigError
from jaxforget.models.clip import CLIPEncoder, CLIPTextConfig, CLIPTextTransformer
from jaxforget.models.layers import ACTIVATIONS, Conv2d, Embed, LayerNorm, Linear, cast

VISION_ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
# OpenAI CLIP's normalization constants (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resampling codes (preprocessor_config.json "resample") -> jax.image.resize methods
RESAMPLE_METHODS = {0: "nearest", 1: "lanczos3", 2: "linear", 3: "bicubic"}


# ----------------------------------------------------------------------------- configs
def _square_size(value: Any, name: str) -> int:
    """transformers allows image_size / patch_size as an int or an [h, w] pair; CLIP uses squares."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or int(value[0]) != int(value[1]):
            raise ConfigError(f"CLIP vision config: {name} must be square, got {list(value)}")
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"CLIP vision config: bad value for {name}: {value!r}") from None


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' ``CLIPVisionConfig`` that change the computation (its defaults).

    Field names match ``CLIPTextConfig``'s where they mean the same thing, so the shared encoder
    layer of ``jaxforget.models.clip`` reads either config.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "image_size", "patch_size", "projection_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"CLIP vision config: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIP vision config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            # transformers floors the patch grid; a remainder would silently drop pixels
            raise ConfigError(
                f"CLIP vision config: image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"CLIP vision config: unsupported hidden_act {self.hidden_act!r} "
                f"(supported: {', '.join(sorted(ACTIVATIONS))})"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:  # patches + the class token
        return self.num_patches + 1

    @classmethod
    def from_transformers(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
        """Read a ``config.json`` of CLIPVisionModel(WithProjection) or a CLIPConfig's
        ``vision_config``. Unknown keys are ignored."""
        if isinstance(d.get("vision_config"), Mapping):
            d = d["vision_config"]
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d or d[f.name] is None:
                continue
            value = d[f.name]
            if f.name in ("image_size", "patch_size"):
                kwargs[f.name] = _square_size(value, f.name)
                continue
            try:
                if f.name == "hidden_act":
                    kwargs[f.name] = str(value)
                elif f.name == "layer_norm_eps":
                    kwargs[f.name] = float(value)
                else:
                    kwargs[f.name] = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"CLIP vision config: bad value for {f.name}: {value!r}") from None
        return cls(**kwargs)

    def to_transformers(self, architecture: str = "CLIPVisionModel") -> dict[str, Any]:
        if architecture not in VISION_ARCHITECTURES:
            raise ConfigError(
                f"CLIP vision config: unknown architecture {architecture!r} "
                f"(one of {', '.join(VISION_ARCHITECTURES)})"
            )
        return {"architectures": [architecture], **self._fields_json()}

    def _fields_json(self) -> dict[str, Any]:
        return {"model_type": "clip_vision_model", **asdict(self), "attention_dropout": 0.0,
                "initializer_factor": 1.0, "initializer_range": 0.02}


def _sub_config(d: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``text_config`` / ``vision_config`` of a CLIPConfig. Old hub configs also carry
    ``*_config_dict``, which transformers lets override the plain one."""
    base = d.get(name)
    out = dict(base) if isinstance(base, Mapping) else {}
    extra = d.get(f"{name}_dict")
    if isinstance(extra, Mapping):
        out.update(extra)
    return out


@dataclass(frozen=True)
class CLIPConfig:
    """transformers' ``CLIPConfig``: both towers, the shared projection size, the initial logit scale."""

    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    def __post_init__(self) -> None:
        if int(self.projection_dim) <= 0:
            raise ConfigError(f"CLIP config: projection_dim must be positive, got {self.projection_dim}")

    @classmethod
    def from_transformers(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        """Read a full CLIP ``config.json`` (``model_type: clip``)."""
        if d.get("model_type", "clip") != "clip":
            raise ConfigError(
                f"CLIP config: model_type {d.get('model_type')!r} is not a full CLIP model "
                "(expected 'clip' with text_config and vision_config)"
            )
        text, vision = _sub_config(d, "text_config"), _sub_config(d, "vision_config")
        if not text or not vision:
            raise ConfigError("CLIP config: needs both text_config and vision_config")
        try:
            projection_dim = int(d.get("projection_dim", 512))
            scale = float(d.get("logit_scale_init_value", 2.6592))
        except (TypeError, ValueError):
            raise ConfigError("CLIP config: bad projection_dim or logit_scale_init_value") from None
        return cls(CLIPTextConfig.from_transformers(text), CLIPVisionConfig.from_transformers(vision),
                   projection_dim, scale)

    def to_transformers(self) -> dict[str, Any]:
        text = self.text_config.to_transformers("CLIPTextModel")
        text.pop("architectures")
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "initializer_factor": 1.0,
            "text_config": text,
            "vision_config": self.vision_config._fields_json(),
        }


# ----------------------------------------------------------------------------- outputs
class CLIPVisionOutput(NamedTuple):
    last_hidden_state: jax.Array  # [N, 1 + patches, D], encoder output (no post layer norm)
    pooled_output: jax.Array  # [N, D], post_layernorm(class token)
    hidden_states: tuple[jax.Array, ...] | None  # pre_layrnorm(embeddings) + each layer output


class CLIPVisionProjectionOutput(NamedTuple):
    image_embeds: jax.Array  # [N, projection_dim] = visual_projection(pooled_output)
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None


class CLIPOutput(NamedTuple):
    logits_per_image: jax.Array  # [N_images, N_texts] = exp(logit_scale) * cos
    logits_per_text: jax.Array  # [N_texts, N_images]
    text_embeds: jax.Array  # [N_texts, P], L2-normalized
    image_embeds: jax.Array  # [N_images, P], L2-normalized


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ‖x‖ in fp32 (a floor on the norm keeps an all-zero row finite)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- vision modules
class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d = config.hidden_size
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (d,), param_dtype), logical_axes=("embed",)
        )
        # a patch_size-strided conv without bias = one linear map per non-overlapping patch
        self.patch_embedding = Conv2d(
            config.num_channels, d, config.patch_size, stride=config.patch_size, padding=0, use_bias=False,
            axes=(None, None, None, "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.position_embedding = Embed(
            config.num_positions, d, axes=("positions", "embed"), param_dtype=param_dtype, rngs=rngs
        )
        self.image_size = config.image_size
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        n, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            # transformers raises too unless asked to interpolate the position embeddings
            raise ValueError(f"input image size ({h}*{w}) doesn't match model ({self.image_size}*{self.image_size})")
        patches = self.patch_embedding(pixel_values)  # [N, h/p, w/p, D]
        patches = patches.reshape(n, -1, patches.shape[-1])  # row-major grid = torch's flatten(2)
        cls = jnp.broadcast_to(cast(self.class_embedding[...], patches.dtype), (n, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return cast(x + cast(self.position_embedding.embedding[...], x.dtype)[None], self.dtype)


class CLIPVisionTransformer(nnx.Module):
    """transformers' ``vision_model``: embeddings, pre-LN, encoder, post-LN of the class token."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        d, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(d, eps=eps, param_dtype=param_dtype)
        # the text tower's encoder: it reads only the fields both configs share
        self.encoder = CLIPEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # type: ignore[arg-type]
        self.post_layernorm = LayerNorm(d, eps=eps, param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be [N, H, W, {self.config.num_channels}] (NHWC), got shape {pixel_values.shape}"
            )
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        hidden: list[jax.Array] = [x]
        for layer in self.encoder.layers:
            x = layer(x, None)  # bidirectional: no mask
            hidden.append(x)
        pooled = self.post_layernorm(x[:, 0])
        return CLIPVisionOutput(x, pooled, tuple(hidden) if output_hidden_states else None)


class CLIPVisionModel(nnx.Module):
    """transformers' ``CLIPVisionModel`` (pooled output, no projection)."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        return self.vision_model(pixel_values, output_hidden_states=output_hidden_states)


class CLIPVisionModelWithProjection(nnx.Module):
    """transformers' ``CLIPVisionModelWithProjection``: ``image_embeds = visual_projection(pooled)``."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.visual_projection = Linear(
            config.hidden_size, config.projection_dim, use_bias=False, axes=("embed", None),
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(
        self, pixel_values: jax.Array, *, output_hidden_states: bool = False
    ) -> CLIPVisionProjectionOutput:
        out = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        return CLIPVisionProjectionOutput(
            self.visual_projection(out.pooled_output), out.last_hidden_state, out.hidden_states
        )


# ----------------------------------------------------------------------------- two towers
class CLIPModel(nnx.Module):
    """transformers' ``CLIPModel``: text tower, vision tower, both projections, ``logit_scale``."""

    def __init__(self, config: CLIPConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        tc, vc, p = config.text_config, config.vision_config, config.projection_dim
        self.text_model = CLIPTextTransformer(tc, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_model = CLIPVisionTransformer(vc, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # output side left replicated: "embed" may not name the same mesh axis twice
        kw = dict(use_bias=False, axes=("embed", None), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_projection = Linear(tc.hidden_size, p, **kw)
        self.visual_projection = Linear(vc.hidden_size, p, **kw)
        # stored as log(1/temperature); a scalar parameter (key "logit_scale")
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype), logical_axes=())

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """[B, S] token ids -> [B, projection_dim] (not normalized), as transformers'."""
        return self.text_projection(self.text_model(input_ids).pooled_output)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[N, H, W, C] preprocessed pixels -> [N, projection_dim] (not normalized)."""
        return self.visual_projection(self.vision_model(pixel_values).pooled_output)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array) -> CLIPOutput:
        text = l2_normalize(self.get_text_features(input_ids))
        image = l2_normalize(self.get_image_features(pixel_values))
        logits_per_text = jnp.exp(self.logit_scale[...].astype(jnp.float32)) * (text @ image.T)
        return CLIPOutput(logits_per_text.T, logits_per_text, text, image)


# ----------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class ImagePreprocess:
    """CLIPImageProcessor's settings. ``size``: an int resizes the shortest edge to it (aspect
    kept, the long edge floored as transformers does); an (h, w) pair resizes to exactly that.
    Hashable, so it can be a static argument of a jitted function."""

    size: int | tuple[int, int] = 224
    crop_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: str = "bicubic"
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE_METHODS.values():
            raise ConfigError(f"image preprocessing: unsupported resample {self.resample!r}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError("image preprocessing: image_mean / image_std must match in length, std > 0")

    @classmethod
    def for_image_size(cls, image_size: int) -> "ImagePreprocess":
        """The processor hub CLIP folders ship: shortest edge and center crop = the model's size."""
        return cls(size=image_size, crop_size=(image_size, image_size))

    @classmethod
    def from_transformers(cls, d: Mapping[str, Any], image_size: int) -> "ImagePreprocess":
        """Read a ``preprocessor_config.json`` (old int or new dict forms of size / crop_size)."""
        def pair(v: Any, name: str) -> tuple[int, int]:
            if isinstance(v, Mapping):
                if "height" in v and "width" in v:
                    return int(v["height"]), int(v["width"])
                if "shortest_edge" in v:
                    return int(v["shortest_edge"]), int(v["shortest_edge"])
            elif isinstance(v, (int, float)):
                return int(v), int(v)
            elif isinstance(v, (list, tuple)) and len(v) == 2:
                return int(v[0]), int(v[1])
            raise ConfigError(f"image preprocessing: bad {name} {v!r}")

        size_raw = d.get("size", image_size)
        if isinstance(size_raw, Mapping) and "shortest_edge" in size_raw:
            size: int | tuple[int, int] = int(size_raw["shortest_edge"])
        elif isinstance(size_raw, (int, float)):
            size = int(size_raw)  # old configs: an int is the shortest edge (default_to_square False)
        else:
            size = pair(size_raw, "size")
        code = d.get("resample", 3)
        if code not in RESAMPLE_METHODS:
            raise ConfigError(f"image preprocessing: unsupported resample code {code!r}")
        return cls(
            size=size,
            crop_size=pair(d.get("crop_size", image_size), "crop_size"),
            mean=tuple(float(x) for x in d.get("image_mean", CLIP_MEAN)),
            std=tuple(float(x) for x in d.get("image_std", CLIP_STD)),
            resample=RESAMPLE_METHODS[code],
            do_resize=bool(d.get("do_resize", True)),
            do_center_crop=bool(d.get("do_center_crop", True)),
            do_normalize=bool(d.get("do_normalize", True)),
        )


def resize_output_size(height: int, width: int, size: int | Sequence[int]) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``."""
    if not isinstance(size, int):
        return int(size[0]), int(size[1])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def to_unit_range(images: jax.Array, value_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """uint8 images -> fp32 in [0, 1]; float images mapped from ``value_range`` and clipped.
    [N, H, W] or 1-channel images become RGB; a 4th (alpha) channel is dropped (PIL's RGB convert)."""
    x = jnp.asarray(images)
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    else:
        lo, hi = value_range
        x = jnp.clip((x.astype(jnp.float32) - lo) / (hi - lo), 0.0, 1.0)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected images [N, H, W, 3] (or 1 / 4 channels), got shape {tuple(jnp.shape(images))}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return x[..., :3]


def center_crop(x: jax.Array, crop: tuple[int, int]) -> jax.Array:
    """transformers' ``center_crop`` on NHWC: offset (size - crop) // 2; zero-pads (ceil half
    before) a side shorter than the crop."""
    _, h, w, _ = x.shape
    ch, cw = crop
    pads = [(0, 0), (0, 0), (0, 0), (0, 0)]
    for axis, (n, c) in ((1, (h, ch)), (2, (w, cw))):
        if c > n:
            before = math.ceil((c - n) / 2)
            pads[axis] = (before, c - n - before)
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, pads)
        _, h, w, _ = x.shape
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[:, top:top + ch, left:left + cw]


def preprocess_images(
    images: jax.Array,
    prep: ImagePreprocess = ImagePreprocess(),
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> jax.Array:
    """Images [N, H, W, 3] (uint8, or float in ``value_range``) -> normalized fp32 pixels
    [N, crop_h, crop_w, 3] for ``CLIPModel.get_image_features``. Pure jnp (jit-able; shapes static).

    Matches CLIPImageProcessor (PIL backend) up to PIL's uint8 rounding (about one grey level
    at most): ``jax.image.resize`` with antialiasing uses the same Keys a=-0.5 cubic, widened
    when downsampling, with weights renormalized at the borders; like PIL, it resizes the width
    first, then the height, clipping to [0, 1] after each pass (PIL's intermediate image is
    8-bit, so cubic overshoot is cut between the passes, not only at the end).
    """
    x = to_unit_range(images, value_range)
    n, h, w, c = x.shape
    if prep.do_resize:
        oh, ow = resize_output_size(h, w, prep.size)
        if ow != w:
            x = jnp.clip(jax.image.resize(x, (n, h, ow, c), method=prep.resample, antialias=True), 0.0, 1.0)
        if oh != h:
            x = jnp.clip(jax.image.resize(x, (n, oh, ow, c), method=prep.resample, antialias=True), 0.0, 1.0)
    if prep.do_center_crop:
        x = center_crop(x, tuple(prep.crop_size))
    if prep.do_normalize:
        x = (x - jnp.asarray(prep.mean, jnp.float32)) / jnp.asarray(prep.std, jnp.float32)
    return x


__all__ = [
    "CLIP_MEAN", "CLIP_STD", "CLIPVisionConfig", "CLIPConfig", "CLIPVisionOutput", "CLIPVisionProjectionOutput",
    "CLIPOutput", "CLIPVisionEmbeddings", "CLIPVisionTransformer", "CLIPVisionModel",
    "CLIPVisionModelWithProjection", "CLIPModel", "ImagePreprocess", "preprocess_images", "resize_output_size",
    "center_crop", "to_unit_range", "l2_normalize",
]
