"""Flax NNX UNet2DConditionModel (SD 1.x / 2.x / SDXL), mirroring diffusers' module tree.

Every module attribute is named like its diffusers counterpart, so a parameter path joined by
"." is the diffusers state-dict key (after kernel/scale -> weight): e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.kernel`` <->
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``.

Feature maps are NHWC. Each block is its own module whose ``__call__`` is a pure function of
its inputs (no state written), so each down / mid / up block can run under ``jax.checkpoint``
(rematerialization: ``remat="full"`` saves nothing inside a block and recomputes it in the
backward pass, ``"dots"`` saves only matmul outputs; see ``REMAT_POLICIES``).

Cross-attention maps: when ``probe_tokens`` (int [B, K]) is given, every ``attn2`` returns its
fp32 attention probabilities at those key positions, [B, heads, H*W, K], and the UNet returns
them keyed by the layer's dotted path (``UNetOutput.attn_probes``). ``probe_tokens`` may instead
be a ``layers.TargetMask`` (weights [B, Nk]): every ``attn2`` then returns the weighted row-sum of
its probabilities, [B, heads, H*W, 1], computed by the fused Pallas kernel where it applies
(DUGE's ``attention_kernel: pallas``), so no [B, heads, H*W, Nk] tensor is kept.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxforget.errors import ConfigError
from jaxforget.models.layers import (
    ACTIVATIONS,
    Conv2d,
    GroupNorm,
    LayerNorm,
    Linear,
    attention,
    get_activation,
)

# rematerialization policies (None = no jax.checkpoint at all). "full" / "dots" checkpoint each
# down / mid / up block; "dots" keeps matmul outputs (jax's dots_saveable: dot_general only,
# convolutions are recomputed). "layers" checkpoints every transformer layer and resnet on its own
# (nothing saved): the backward pass then holds one layer's recomputed activations at a time
# instead of a whole block's (SDXL's 64x64 up block has six transformer layers, each with
# 10 x 4096^2 fp32 attention probabilities per image).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "layers": jax.checkpoint_policies.nothing_saveable,
}
_LAYER_LISTS = ("transformer_blocks", "resnets")  # what "layers" checkpoints one by one

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers config fields for features this implementation does not have: they must keep the
# value that disables the feature, otherwise loading would silently compute something else.
_MUST_BE_DEFAULT: dict[str, Any] = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "dual_cross_attention": False,
    "attention_type": "default",
    "cross_attention_norm": None,
    "dropout": 0.0,
}
# Other diffusers fields are ignored, as diffusers ignores keys it does not know. Among them,
# resnet_out_scale_factor, mid_block_only_cross_attention and addition_embed_type_num_heads have
# no effect on the supported block types (they matter for SimpleCrossAttn / "text" embeddings).


def _per_block(name: str, value: Any, n: int, cast=int) -> tuple:
    if value is None:
        raise ConfigError(f"unet config: {name} is required")
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"unet config: {name} has {len(value)} entries, expected {n} (one per down block)")
        return tuple(cast(v) for v in value)
    return (cast(value),) * n


def _layers_spec(name: str, value: Any) -> int | tuple[int, ...]:
    # one transformer_layers_per_block entry: an int (every layer of the block) or a per-layer list
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise ConfigError(f"unet config: {name} entries must be ints or lists of ints, got {value!r}")


def _scalar_if_uniform(values: tuple) -> Any:
    return values[0] if len(set(values)) == 1 else list(values)


@dataclass(frozen=True)
class UNetConfig:
    """A diffusers ``UNet2DConditionModel`` config, normalized (per-block fields are tuples).

    Defaults are diffusers' constructor defaults. ``num_attention_heads`` is the real head count
    per down block (diffusers configs store it in ``attention_head_dim``; see from_diffusers).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: Any = 1  # int | per block (int | per-layer tuple)
    reverse_transformer_layers_per_block: Any = None  # None | per up block per-layer tuples
    num_attention_heads: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("down_block_types", tuple(self.down_block_types))
        set_("up_block_types", tuple(self.up_block_types))
        set_("block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for key in ("center_input_sample", "flip_sin_to_cos", "use_linear_projection", "upcast_attention"):
            set_(key, bool(getattr(self, key)))  # SDXL's config has "upcast_attention": null
        if isinstance(self.sample_size, (list, tuple)):
            set_("sample_size", tuple(int(s) for s in self.sample_size))
        n = len(self.down_block_types)
        if n == 0:
            raise ConfigError("unet config: down_block_types is empty")
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ConfigError(f"unet config: down_block_types: unsupported block type {t!r} "
                                  f"(supported: {', '.join(DOWN_BLOCK_TYPES)})")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ConfigError(f"unet config: up_block_types: unsupported block type {t!r} "
                                  f"(supported: {', '.join(UP_BLOCK_TYPES)})")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ConfigError(f"unet config: mid_block_type: unsupported block type {self.mid_block_type!r} "
                              "(supported: UNetMidBlock2DCrossAttn or null)")
        if len(self.up_block_types) != n:
            raise ConfigError(f"unet config: up_block_types has {len(self.up_block_types)} entries, expected {n}")
        if len(self.block_out_channels) != n:
            raise ConfigError(
                f"unet config: block_out_channels has {len(self.block_out_channels)} entries, expected {n}")
        set_("layers_per_block", _per_block("layers_per_block", self.layers_per_block, n))
        set_("cross_attention_dim", _per_block("cross_attention_dim", self.cross_attention_dim, n))
        set_("num_attention_heads", _per_block("num_attention_heads", self.num_attention_heads, n))
        tl = self.transformer_layers_per_block
        tl = tuple(_layers_spec("transformer_layers_per_block", v) for v in
                   (tl if isinstance(tl, (list, tuple)) else (tl,) * n))
        if len(tl) != n:
            raise ConfigError(f"unet config: transformer_layers_per_block has {len(tl)} entries, expected {n}")
        set_("transformer_layers_per_block", tl)
        rev = self.reverse_transformer_layers_per_block
        if rev is not None:
            rev = tuple(_layers_spec("reverse_transformer_layers_per_block", v) for v in rev)
            if len(rev) != n:
                raise ConfigError(
                    f"unet config: reverse_transformer_layers_per_block has {len(rev)} entries, expected {n}")
            set_("reverse_transformer_layers_per_block", rev)
        elif any(isinstance(v, tuple) for v in tl):
            raise ConfigError("unet config: reverse_transformer_layers_per_block is required when "
                              "transformer_layers_per_block lists per-layer counts")
        for i in range(n):  # per-layer lists must cover every layer of their block
            if len(self.down_transformer_layers(i)) < self.layers_per_block[i]:
                raise ConfigError(f"unet config: transformer_layers_per_block[{i}] lists fewer layers than "
                                  f"layers_per_block ({self.layers_per_block[i]})")
            if len(self.up_transformer_layers(i)) < self.layers_per_block[::-1][i] + 1:
                raise ConfigError(f"unet config: reverse_transformer_layers_per_block[{i}] lists fewer layers "
                                  f"than the up block has ({self.layers_per_block[::-1][i] + 1})")
        if self.act_fn not in ACTIVATIONS:
            raise ConfigError(f"unet config: act_fn: unsupported activation {self.act_fn!r}")
        if self.norm_num_groups is None or int(self.norm_num_groups) <= 0:
            raise ConfigError("unet config: norm_num_groups must be a positive int (null is not supported)")
        for i, c in enumerate(self.block_out_channels):
            if c % self.norm_num_groups:
                raise ConfigError(f"unet config: block_out_channels[{i}]={c} is not divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")
            has_attn = self.down_block_types[i].startswith("CrossAttn") or (
                self.up_block_types[n - 1 - i].startswith("CrossAttn")
                or (i == n - 1 and self.mid_block_type is not None))
            if has_attn and c % self.num_attention_heads[i]:
                raise ConfigError(f"unet config: block_out_channels[{i}]={c} is not divisible by the "
                                  f"head count {self.num_attention_heads[i]} (attention_head_dim)")
        if self.addition_embed_type not in (None, "text_time"):
            raise ConfigError(f"unet config: addition_embed_type: unsupported value {self.addition_embed_type!r} "
                              "(supported: null, 'text_time')")
        if self.addition_embed_type == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if getattr(self, key) is None:
                    raise ConfigError(f"unet config: {key} is required with addition_embed_type 'text_time'")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if int(getattr(self, key)) % 2 != 1:
                raise ConfigError(f"unet config: {key} must be odd")

    # ------------------------------------------------------------------ derived values
    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def down_transformer_layers(self, i: int) -> tuple[int, ...]:
        """Transformer depth of each attention of down block i (diffusers' broadcasting rules)."""
        spec = self.transformer_layers_per_block[i]
        n = self.layers_per_block[i]
        return spec[:n] if isinstance(spec, tuple) else (spec,) * n

    def mid_transformer_layers(self) -> int:
        spec = self.transformer_layers_per_block[-1]
        return spec[0] if isinstance(spec, tuple) else spec

    def up_transformer_layers(self, i: int) -> tuple[int, ...]:
        if self.reverse_transformer_layers_per_block is not None:
            spec = self.reverse_transformer_layers_per_block[i]
        else:
            spec = self.transformer_layers_per_block[::-1][i]
        n = self.layers_per_block[::-1][i] + 1
        return spec[:n] if isinstance(spec, tuple) else (spec,) * n

    # ------------------------------------------------------------------ diffusers config.json
    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Read a diffusers UNet2DConditionModel config.json dict; reject features we lack."""
        name = d.get("_class_name", "UNet2DConditionModel")
        if name != "UNet2DConditionModel":
            raise ConfigError(f"unet config: _class_name: expected UNet2DConditionModel, got {name!r}")
        for key, default in _MUST_BE_DEFAULT.items():
            if key in d and d[key] != default:
                raise ConfigError(f"unet config: {key}={d[key]!r} is not supported (only {default!r})")
        oca = d.get("only_cross_attention", False)
        if any(oca) if isinstance(oca, (list, tuple)) else oca:
            raise ConfigError(f"unet config: only_cross_attention={oca!r} is not supported (only false)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields and k != "num_attention_heads"}
        # diffusers' naming quirk: SD configs store the head COUNT in attention_head_dim;
        # num_attention_heads, when present, wins (UNet2DConditionModel.__init__ does the same).
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        if heads is None:
            raise ConfigError("unet config: attention_head_dim (the head count) is required")
        kwargs["num_attention_heads"] = heads
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                    "reverse_transformer_layers_per_block", "down_block_types", "up_block_types",
                    "block_out_channels"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(tuple(v) if isinstance(v, list) else v for v in kwargs[key])
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"unet config: invalid value ({err})") from None

    def to_diffusers(self) -> dict[str, Any]:
        """A config.json dict that diffusers' UNet2DConditionModel accepts (same architecture)."""
        tl = self.transformer_layers_per_block
        tl_out = (tl[0] if len(set(tl)) == 1 and isinstance(tl[0], int)
                  else [list(v) if isinstance(v, tuple) else v for v in tl])
        rev = self.reverse_transformer_layers_per_block
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": self.center_input_sample,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "down_block_types": list(self.down_block_types),
            "mid_block_type": self.mid_block_type,
            "up_block_types": list(self.up_block_types),
            "only_cross_attention": False,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": _scalar_if_uniform(self.layers_per_block),
            "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "act_fn": self.act_fn,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "cross_attention_dim": _scalar_if_uniform(self.cross_attention_dim),
            "transformer_layers_per_block": tl_out,
            "reverse_transformer_layers_per_block": None if rev is None else [
                list(v) if isinstance(v, tuple) else v for v in rev],
            # diffusers refuses num_attention_heads != None; the head count goes in attention_head_dim
            "attention_head_dim": _scalar_if_uniform(self.num_attention_heads),
            "num_attention_heads": None,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "addition_embed_type": self.addition_embed_type,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "time_embedding_dim": self.time_embedding_dim,
            "conv_in_kernel": self.conv_in_kernel,
            "conv_out_kernel": self.conv_out_kernel,
            **{k: v for k, v in _MUST_BE_DEFAULT.items()},
        }


class UNetOutput(NamedTuple):
    sample: jax.Array  # NHWC
    attn_probes: dict[str, jax.Array]  # attn2 path -> [B, heads, H*W, K] fp32


# ============================================================================ building blocks
def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: int = 10000
) -> jax.Array:
    """Sinusoidal embedding [N] -> [N, dim] fp32, as diffusers.get_timestep_embedding."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nnx.Module):
    """Parameter-free sinusoidal projection (diffusers ``time_proj`` / ``add_time_proj``)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, freq_shift: float):
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_dim: int, time_embed_dim: int, *, act_fn: str = "silu", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_dim, time_embed_dim, axes=("time", "embed"), dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim, axes=("embed", "time"), dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.act_fn = act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(get_activation(self.act_fn)(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, groups: int, eps: float,
                 act_fn: str, output_scale_factor: float = 1.0, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, param_dtype=param_dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, **kw)
        # the time embedding is added per output channel, hence "conv_out" on its output side
        self.time_emb_proj = Linear(temb_channels, out_channels, axes=("time", "conv_out"), **kw)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, param_dtype=param_dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, **kw)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, padding=0, **kw) if in_channels != out_channels else None
        )
        self.act_fn = act_fn
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        act = get_activation(self.act_fn)
        h = self.conv1(act(self.norm1(x)))
        h = h + self.time_emb_proj(act(temb))[:, None, None, :].astype(h.dtype)
        h = self.conv2(act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Attention(nnx.Module):
    """diffusers Attention (to_q/to_k/to_v without bias, to_out.0 with bias); fp32 softmax."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, *, cross_attention_dim: int | None = None,
                 upcast_attention: bool = False, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.to_q = Linear(query_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_k = Linear(kv_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_v = Linear(kv_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_out = nnx.List([Linear(inner, query_dim, axes=("heads", "embed"), **kw)])
        self.heads = heads
        # scores and softmax are always fp32 here, which is what upcast_attention asks for
        self.upcast_attention = upcast_attention
        self.query_chunk: int | None = None  # memory-efficient attention (set by the UNet's attention_chunk)

    def __call__(self, x: jax.Array, context: jax.Array | None = None,
                 probe_tokens: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        out, probes = attention(q, k, v, self.heads, probe_tokens=probe_tokens, query_chunk=self.query_chunk)
        return self.to_out[0](out), probes


class GEGLU(nnx.Module):
    def __init__(self, dim_in: int, dim_out: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = Linear(dim_in, 2 * dim_out, axes=("embed", "mlp"), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    def __init__(self, dim: int, *, mult: int = 4, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        # net.1 is diffusers' Dropout (no parameters): a None slot keeps net.2 named as in torch
        self.net = nnx.List([
            GEGLU(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
            None,
            Linear(inner, dim, axes=("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, *,
                 upcast_attention: bool = False, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, eps=1e-5, param_dtype=param_dtype)
        self.attn1 = Attention(dim, heads, dim_head, upcast_attention=upcast_attention, **kw)
        self.norm2 = LayerNorm(dim, eps=1e-5, param_dtype=param_dtype)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim,
                               upcast_attention=upcast_attention, **kw)
        self.norm3 = LayerNorm(dim, eps=1e-5, param_dtype=param_dtype)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array,
                 probe_tokens: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        x = x + self.attn1(self.norm1(x))[0]
        h, probes = self.attn2(self.norm2(x), context, probe_tokens)
        x = x + h
        x = x + self.ff(self.norm3(x))
        return x, probes


class Transformer2DModel(nnx.Module):
    def __init__(self, heads: int, dim_head: int, in_channels: int, *, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, use_linear_projection: bool, upcast_attention: bool, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * dim_head
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6, param_dtype=param_dtype)
        if use_linear_projection:  # SD2 / SDXL
            self.proj_in = Linear(in_channels, inner, axes=("embed", "mlp"), **kw)
            self.proj_out = Linear(inner, in_channels, axes=("mlp", "embed"), **kw)
        else:  # SD1: 1x1 convolutions
            self.proj_in = Conv2d(in_channels, inner, 1, padding=0, **kw)
            self.proj_out = Conv2d(inner, in_channels, 1, padding=0, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim,
                                  upcast_attention=upcast_attention, **kw)
            for _ in range(num_layers)
        ])
        self.use_linear_projection = use_linear_projection
        self.inner_dim = inner

    def __call__(self, x: jax.Array, context: jax.Array,
                 probe_tokens: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        b, hh, ww, c = x.shape
        residual = x
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.reshape(b, hh * ww, c))
        else:
            h = self.proj_in(h).reshape(b, hh * ww, self.inner_dim)
        probes: dict[str, jax.Array] = {}
        for i, block in enumerate(self.transformer_blocks):
            h, p = block(h, context, probe_tokens)
            if p is not None:
                probes[f"transformer_blocks.{i}.attn2"] = p
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(b, hh, ww, c)
        else:
            h = self.proj_out(h.reshape(b, hh, ww, self.inner_dim))
        return h + residual, probes


class Downsample2D(nnx.Module):
    def __init__(self, channels: int, *, padding: int = 1, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # diffusers pads (0, 1) on the bottom/right when padding == 0
        pad = ((0, 1), (0, 1)) if padding == 0 else ((padding, padding), (padding, padding))
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=pad, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def _nearest_resize(x: jax.Array, size: tuple[int, int] | None) -> jax.Array:
    """torch F.interpolate(mode="nearest") on NHWC; size None = scale 2."""
    h, w = x.shape[1], x.shape[2]
    if size is None or tuple(size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    oh, ow = int(size[0]), int(size[1])

    def idx(n_in: int, n_out: int) -> np.ndarray:  # torch: floor(dst * (in / out)) in fp32
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

    return jnp.take(jnp.take(x, idx(h, oh), axis=1), idx(w, ow), axis=2)


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        return self.conv(_nearest_resize(x, output_size))


def _prefixed(prefix: str, probes: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {f"{prefix}.{k}": v for k, v in probes.items()}


# ============================================================================ UNet blocks
class CrossAttnDownBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int,
                 transformer_layers: Sequence[int], heads: int, cross_attention_dim: int, groups: int,
                 eps: float, act_fn: str, add_downsample: bool, downsample_padding: int,
                 use_linear_projection: bool, upcast_attention: bool, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          groups=groups, eps=eps, act_fn=act_fn, **kw)
            for i in range(num_layers)
        ])
        self.attentions = nnx.List([
            Transformer2DModel(heads, out_channels // heads, out_channels, num_layers=transformer_layers[i],
                               cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                               use_linear_projection=use_linear_projection,
                               upcast_attention=upcast_attention, **kw)
            for i in range(num_layers)
        ])
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, **kw)]) if add_downsample else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array,
                 probe_tokens: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...], dict]:
        skips: list[jax.Array] = []
        probes: dict[str, jax.Array] = {}
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            x = resnet(x, temb)
            x, p = attn(x, context, probe_tokens)
            probes.update(_prefixed(f"attentions.{i}", p))
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips), probes


class DownBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int, groups: int,
                 eps: float, act_fn: str, add_downsample: bool, downsample_padding: int, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          groups=groups, eps=eps, act_fn=act_fn, **kw)
            for i in range(num_layers)
        ])
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, **kw)]) if add_downsample else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None,
                 probe_tokens: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...], dict]:
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips), {}


class UNetMidBlock2DCrossAttn(nnx.Module):
    def __init__(self, channels: int, temb_channels: int, *, transformer_layers: int, heads: int,
                 cross_attention_dim: int, groups: int, eps: float, act_fn: str, output_scale_factor: float,
                 use_linear_projection: bool, upcast_attention: bool, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        res = dict(groups=groups, eps=eps, act_fn=act_fn, output_scale_factor=output_scale_factor, **kw)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, temb_channels, **res) for _ in range(2)])
        self.attentions = nnx.List([
            Transformer2DModel(heads, channels // heads, channels, num_layers=transformer_layers,
                               cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                               use_linear_projection=use_linear_projection,
                               upcast_attention=upcast_attention, **kw)
        ])

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array,
                 probe_tokens: jax.Array | None = None) -> tuple[jax.Array, dict]:
        x = self.resnets[0](x, temb)
        probes: dict[str, jax.Array] = {}
        for i, (attn, resnet) in enumerate(zip(self.attentions, list(self.resnets)[1:])):
            x, p = attn(x, context, probe_tokens)
            probes.update(_prefixed(f"attentions.{i}", p))
            x = resnet(x, temb)
        return x, probes


class CrossAttnUpBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int, *,
                 num_layers: int, transformer_layers: Sequence[int], heads: int, cross_attention_dim: int,
                 groups: int, eps: float, act_fn: str, add_upsample: bool, use_linear_projection: bool,
                 upcast_attention: bool, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(
                (prev_output_channel if i == 0 else out_channels)
                + (in_channels if i == num_layers - 1 else out_channels),
                out_channels, temb_channels, groups=groups, eps=eps, act_fn=act_fn, **kw)
            for i in range(num_layers)
        ])
        self.attentions = nnx.List([
            Transformer2DModel(heads, out_channels // heads, out_channels, num_layers=transformer_layers[i],
                               cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                               use_linear_projection=use_linear_projection,
                               upcast_attention=upcast_attention, **kw)
            for i in range(num_layers)
        ])
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array, context: jax.Array,
                 probe_tokens: jax.Array | None = None,
                 upsample_size: tuple[int, int] | None = None) -> tuple[jax.Array, dict]:
        probes: dict[str, jax.Array] = {}
        skips = tuple(skips)
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            x = jnp.concatenate([x, skips[-1].astype(x.dtype)], axis=-1)
            skips = skips[:-1]
            x = resnet(x, temb)
            x, p = attn(x, context, probe_tokens)
            probes.update(_prefixed(f"attentions.{i}", p))
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x, probes


class UpBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int, *,
                 num_layers: int, groups: int, eps: float, act_fn: str, add_upsample: bool, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(
                (prev_output_channel if i == 0 else out_channels)
                + (in_channels if i == num_layers - 1 else out_channels),
                out_channels, temb_channels, groups=groups, eps=eps, act_fn=act_fn, **kw)
            for i in range(num_layers)
        ])
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
                 context: jax.Array | None = None, probe_tokens: jax.Array | None = None,
                 upsample_size: tuple[int, int] | None = None) -> tuple[jax.Array, dict]:
        skips = tuple(skips)
        for resnet in self.resnets:
            x = jnp.concatenate([x, skips[-1].astype(x.dtype)], axis=-1)
            skips = skips[:-1]
            x = resnet(x, temb)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x, {}


# ============================================================================ the UNet
class UNet2DConditionModel(nnx.Module):
    """diffusers' UNet2DConditionModel in NNX (NHWC). See the module docstring."""

    def __init__(self, config: UNetConfig, *, dtype=None, param_dtype=jnp.float32, remat: str = "none",
                 attention_chunk: int | None = None, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc = c.block_out_channels
        n = len(boc)
        ted = c.time_embed_dim
        self.config = c
        self.dtype = dtype
        self.remat = check_remat(remat)  # default policy of __call__ (a call may override it)

        self.conv_in = Conv2d(c.in_channels, boc[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2, **kw)
        self.time_proj = Timesteps(boc[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(boc[0], ted, act_fn=c.act_fn, **kw)
        if c.addition_embed_type == "text_time":  # SDXL: pooled text embeds + micro-conditioning
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            # diffusers builds this TimestepEmbedding with its default act ("silu"), not act_fn
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, ted, **kw)
        else:
            self.add_time_proj = None
            self.add_embedding = None

        common = dict(groups=c.norm_num_groups, eps=c.norm_eps, act_fn=c.act_fn, **kw)
        attn_common = dict(use_linear_projection=c.use_linear_projection, upcast_attention=c.upcast_attention)
        down = []
        out_ch = boc[0]
        for i, kind in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            args = dict(num_layers=c.layers_per_block[i], add_downsample=i < n - 1,
                        downsample_padding=c.downsample_padding, **common)
            if kind == "CrossAttnDownBlock2D":
                down.append(CrossAttnDownBlock2D(
                    in_ch, out_ch, ted, transformer_layers=c.down_transformer_layers(i),
                    heads=c.num_attention_heads[i], cross_attention_dim=c.cross_attention_dim[i],
                    **attn_common, **args))
            else:
                down.append(DownBlock2D(in_ch, out_ch, ted, **args))
        self.down_blocks = nnx.List(down)

        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(
                boc[-1], ted, transformer_layers=c.mid_transformer_layers(), heads=c.num_attention_heads[-1],
                cross_attention_dim=c.cross_attention_dim[-1], output_scale_factor=c.mid_block_scale_factor,
                **attn_common, **common)
        else:
            self.mid_block = None

        up = []
        rboc = boc[::-1]
        rheads = c.num_attention_heads[::-1]
        rcross = c.cross_attention_dim[::-1]
        rlayers = c.layers_per_block[::-1]
        out_ch = rboc[0]
        for i, kind in enumerate(c.up_block_types):
            prev_ch, out_ch = out_ch, rboc[i]
            in_ch = rboc[min(i + 1, n - 1)]
            args = dict(num_layers=rlayers[i] + 1, add_upsample=i < n - 1, **common)
            if kind == "CrossAttnUpBlock2D":
                up.append(CrossAttnUpBlock2D(
                    in_ch, out_ch, prev_ch, ted, transformer_layers=c.up_transformer_layers(i),
                    heads=rheads[i], cross_attention_dim=rcross[i], **attn_common, **args))
            else:
                up.append(UpBlock2D(in_ch, out_ch, prev_ch, ted, **args))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = GroupNorm(c.norm_num_groups, boc[0], eps=c.norm_eps, param_dtype=param_dtype)
        self.conv_out = Conv2d(boc[0], c.out_channels, c.conv_out_kernel, padding=(c.conv_out_kernel - 1) // 2, **kw)
        set_attention_chunk(self, attention_chunk)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        *,
        added_cond: Mapping[str, jax.Array] | None = None,
        probe_tokens: jax.Array | None = None,
        remat: str | None = None,
    ) -> UNetOutput:
        """sample [B,H,W,C] NHWC; timesteps scalar or [B]; encoder_hidden_states [B,S,D];
        added_cond {"text_embeds": [B,P], "time_ids": [B,6]} (SDXL); probe_tokens int [B,K];
        remat: none | full | dots | layers (see REMAT_POLICIES; None: the module's ``remat``).
        Remat changes memory and time of the backward pass only, never the values."""
        c = self.config
        policy = check_remat(self.remat if remat is None else remat)
        dtype = self.dtype or sample.dtype
        b = sample.shape[0]
        x = sample.astype(dtype)
        if c.center_input_sample:
            x = 2 * x - 1.0

        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (b,))
        emb = self.time_embedding(self.time_proj(t).astype(dtype))
        if self.add_embedding is not None:
            if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError("this UNet (addition_embed_type 'text_time') needs "
                                 "added_cond={'text_embeds': [B,P], 'time_ids': [B,6]}")
            text_embeds = jnp.asarray(added_cond["text_embeds"])
            time_ids = jnp.asarray(added_cond["time_ids"])
            time_embeds = self.add_time_proj(time_ids.reshape(-1)).reshape(text_embeds.shape[0], -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
            emb = emb + self.add_embedding(add.astype(emb.dtype))
        context = encoder_hidden_states.astype(dtype)

        probes: dict[str, jax.Array] = {}
        x = self.conv_in(x)
        skips: list[jax.Array] = [x]
        for i, block in enumerate(self.down_blocks):
            x, res, p = _call_block(block, policy, x, emb, context, probe_tokens)
            skips.extend(res)
            probes.update(_prefixed(f"down_blocks.{i}", p))

        if self.mid_block is not None:
            x, p = _call_block(self.mid_block, policy, x, emb, context, probe_tokens)
            probes.update(_prefixed("mid_block", p))

        # like diffusers: pass explicit upsample sizes only when H or W is not a multiple of 2**n_up
        n_up = len(self.up_blocks) - 1
        forward_size = any(d % (2 ** n_up) for d in sample.shape[1:3])
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            res, skips = tuple(skips[-k:]), skips[:-k]
            size = tuple(skips[-1].shape[1:3]) if forward_size and i < n_up else None
            x, p = _call_block(block, policy, x, res, emb, context, probe_tokens, upsample_size=size)
            probes.update(_prefixed(f"up_blocks.{i}", p))

        x = get_activation(c.act_fn)(self.conv_norm_out(x))
        x = self.conv_out(x)
        return UNetOutput(sample=x, attn_probes=probes)


def set_attention_chunk(unet: "UNet2DConditionModel", attention_chunk: int | None) -> None:
    """Switch every attention layer of ``unet`` to memory-efficient attention with that many
    queries per chunk (None / 0: whole-sequence attention). Values are unchanged up to fp32
    rounding; memory of the scores drops from [B, H, Lq, Lk] to [B, H, chunk, Lk] per layer."""
    unet.attention_chunk = check_attention_chunk(attention_chunk)
    for _, module in nnx.iter_modules(unet):
        if isinstance(module, Attention):
            module.query_chunk = unet.attention_chunk


def check_attention_chunk(attention_chunk: int | None) -> int | None:
    """Validate ``attention_chunk`` (queries per chunk of memory-efficient attention; None or 0:
    whole-sequence attention)."""
    if attention_chunk is None or attention_chunk == 0:
        return None
    if isinstance(attention_chunk, bool) or not isinstance(attention_chunk, int) or attention_chunk < 0:
        raise ConfigError(f"attention_chunk must be a non-negative integer (0: off), got {attention_chunk!r}")
    return attention_chunk


def check_remat(remat: str) -> str:
    """Validate a remat policy name (none | full | dots | layers)."""
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    return remat


def _checkpointed(module: nnx.Module, policy: Any, *args: Any, **static: Any) -> Any:
    """``module(*args, **static)`` under jax.checkpoint(policy). The module goes in as (graphdef,
    state) so jax.checkpoint sees its parameters as inputs (their gradients flow through the
    rematerialized computation); ``static`` (Python values such as the up blocks' upsample size)
    stays out of the traced arguments."""
    graphdef, state = nnx.split(module)

    def run(state: nnx.State, *args: Any) -> Any:
        return nnx.merge(graphdef, state)(*args, **static)

    return jax.checkpoint(run, policy=policy)(state, *args)


class _CheckpointedLayer(nnx.Module):
    """A transformer layer / resnet that runs under jax.checkpoint (nothing saved)."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _checkpointed(self.inner, REMAT_POLICIES["layers"], *args, **kwargs)


def _call_block(block: nnx.Module, remat: str, *args: Any, **static: Any) -> Any:
    """``block(*args, **static)`` under the named remat policy ("none": as it is)."""
    if remat == "none":
        return block(*args, **static)
    if remat == "layers":
        # a throwaway copy of the block (same arrays) whose layers are wrapped: the caller's
        # module, and so its parameter paths, stay as they are
        copy = nnx.merge(*nnx.split(block))
        for _, module in list(copy.iter_modules()):
            for name in _LAYER_LISTS:
                layers = getattr(module, name, None)
                if isinstance(layers, nnx.List):
                    for i in range(len(layers)):
                        layers[i] = _CheckpointedLayer(layers[i])
        return copy(*args, **static)
    return _checkpointed(block, REMAT_POLICIES[remat], *args, **static)
