"""AutoencoderKL (the Stable Diffusion VAE) in Flax NNX, with diffusers' module names.

Images and latents are NHWC. ``encode`` returns the diagonal Gaussian posterior over the
*unscaled* latent; ``decode`` takes an unscaled latent. The pipeline multiplies by
``config.scaling_factor`` (and subtracts ``shift_factor`` where set) itself.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxforget.errors import ConfigError
from jaxforget.models.layers import ACTIVATIONS, Conv2d, GroupNorm, Linear, attention, get_activation

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
RESNET_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code eps 1e-6 for every GroupNorm


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config (defaults are diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("VAE config: block_out_channels is empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"VAE config: {n} block_out_channels but {len(self.down_block_types)} down_block_types "
                f"and {len(self.up_block_types)} up_block_types"
            )
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ConfigError(f"VAE config: unsupported down block type {t!r} (supported: {DOWN_BLOCK_TYPES})")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ConfigError(f"VAE config: unsupported up block type {t!r} (supported: {UP_BLOCK_TYPES})")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"VAE config: block_out_channels {c} is not divisible by norm_num_groups {self.norm_num_groups}"
                )
        if self.act_fn not in ACTIVATIONS:
            raise ConfigError(f"VAE config: unsupported act_fn {self.act_fn!r}")
        if self.layers_per_block < 1:
            raise ConfigError(f"VAE config: layers_per_block must be >= 1, got {self.layers_per_block}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """Read an AutoencoderKL ``config.json`` dict. Keys starting with "_" and keys that do not
        change the computation (force_upcast, ...) are ignored."""
        kwargs: dict[str, Any] = {}
        try:
            for f in fields(cls):
                if f.name not in d or d[f.name] is None:
                    continue
                v = d[f.name]
                if f.name in ("block_out_channels",):
                    kwargs[f.name] = tuple(int(x) for x in v)
                elif f.name in ("down_block_types", "up_block_types"):
                    kwargs[f.name] = tuple(str(x) for x in v)
                elif f.name in ("latents_mean", "latents_std"):
                    kwargs[f.name] = tuple(float(x) for x in v)
                elif f.name == "sample_size":
                    kwargs[f.name] = tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else int(v)
                elif f.name in ("scaling_factor", "shift_factor"):
                    kwargs[f.name] = float(v)
                elif f.name == "act_fn":
                    kwargs[f.name] = str(v)
                elif f.name in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
                    kwargs[f.name] = bool(v)
                else:
                    kwargs[f.name] = int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"VAE config: bad value for {f.name}: {d[f.name]!r}") from None
        # diffusers' defaults are one-block tuples; repeat them when only the channels are given
        n = len(kwargs.get("block_out_channels", cls.block_out_channels))
        kwargs.setdefault("down_block_types", ("DownEncoderBlock2D",) * n)
        kwargs.setdefault("up_block_types", ("UpDecoderBlock2D",) * n)
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """A ``config.json`` dict that diffusers' ``AutoencoderKL.from_config`` reads back."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# ----------------------------------------------------------------------------- posterior
class DiagonalGaussian(NamedTuple):
    """The encoder's posterior q(z|x); logvar is already clipped to [-30, 20] like diffusers."""

    mean: jax.Array  # [B, h, w, latent_channels]
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example, summed over latent dims (as diffusers)."""
        m, lv = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        return 0.5 * jnp.sum(jnp.square(m) + jnp.exp(lv) - 1.0 - lv, axis=(1, 2, 3))


def sample_posterior(posterior: DiagonalGaussian, key: jax.Array) -> jax.Array:
    return posterior.sample(key)


# ----------------------------------------------------------------------------- blocks
class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D without a time embedding (the VAE's only resnet kind)."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, act_fn: str,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(groups, in_channels, eps=RESNET_EPS, param_dtype=param_dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, **kw)
        self.norm2 = GroupNorm(groups, out_channels, eps=RESNET_EPS, param_dtype=param_dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, **kw)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, padding=0, **kw) if in_channels != out_channels else None
        )
        self.act_fn = act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.act_fn)
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut.astype(h.dtype) + h


class VAEAttention(nnx.Module):
    """diffusers Attention as used in the VAE mid block: group norm, q/k/v/out with biases,
    residual connection; heads = channels // head_dim (one head in every diffusers VAE)."""

    def __init__(self, channels: int, *, groups: int, head_dim: int | None = None,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = GroupNorm(groups, channels, eps=RESNET_EPS, param_dtype=param_dtype)
        self.to_q = Linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_k = Linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_v = Linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_out = nnx.List([Linear(channels, channels, axes=("heads", "embed"), **kw)])
        self.num_heads = channels // (head_dim or channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        hs = self.group_norm(x).reshape(b, h * w, c)
        out, _ = attention(self.to_q(hs), self.to_k(hs), self.to_v(hs), self.num_heads)
        out = self.to_out[0](out).reshape(b, h, w, c)
        return out + x.astype(out.dtype)


class Downsample2D(nnx.Module):
    def __init__(self, channels: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # diffusers pads (0,1,0,1) before a stride-2 3x3 conv with no padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)),
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
        return self.conv(x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_downsample: bool,
                 groups: int, act_fn: str, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(groups=groups, act_fn=act_fn, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **kw) for i in range(num_layers)
        ])
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)])
            if add_downsample else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_upsample: bool,
                 groups: int, act_fn: str, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(groups=groups, act_fn=act_fn, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **kw) for i in range(num_layers)
        ])
        self.upsamplers = (
            nnx.List([Upsample2D(out_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)])
            if add_upsample else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nnx.Module):
    """resnet, (attention, resnet): diffusers' UNetMidBlock2D with num_layers=1 and no temb."""

    def __init__(self, channels: int, *, groups: int, act_fn: str, add_attention: bool,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups=groups, act_fn=act_fn, **kw)
                                 for _ in range(2)])
        # diffusers keeps a None placeholder when attention is off: no parameters either way
        self.attentions = nnx.List(
            [VAEAttention(channels, groups=groups, head_dim=channels, **kw)] if add_attention else []
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    def __init__(self, config: VAEConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, boc[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(boc[max(i - 1, 0)], boc[i], num_layers=config.layers_per_block,
                               add_downsample=i < len(boc) - 1, groups=groups, act_fn=config.act_fn, **kw)
            for i in range(len(boc))
        ])
        self.mid_block = UNetMidBlock2D(boc[-1], groups=groups, act_fn=config.act_fn,
                                        add_attention=config.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(groups, boc[-1], eps=RESNET_EPS, param_dtype=param_dtype)
        self.conv_out = Conv2d(boc[-1], 2 * config.latent_channels, 3, **kw)
        self.act_fn = config.act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(get_activation(self.act_fn)(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, config: VAEConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, rev[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(rev[0], groups=groups, act_fn=config.act_fn,
                                        add_attention=config.mid_block_add_attention, **kw)
        # each up block has one resnet more than the matching down block
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], num_layers=config.layers_per_block + 1,
                             add_upsample=i < len(rev) - 1, groups=groups, act_fn=config.act_fn, **kw)
            for i in range(len(rev))
        ])
        self.conv_norm_out = GroupNorm(groups, rev[-1], eps=RESNET_EPS, param_dtype=param_dtype)
        self.conv_out = Conv2d(rev[-1], config.out_channels, 3, **kw)
        self.act_fn = config.act_fn

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(get_activation(self.act_fn)(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    def __init__(self, config: VAEConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        lat = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = Conv2d(2 * lat, 2 * lat, 1, padding=0, **kw) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(lat, lat, 1, padding=0, **kw) if config.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x: [B, H, W, in_channels] in [-1, 1] -> posterior over [B, H/f, W/f, latent_channels]."""
        f = self.config.downsample_factor
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"encode expects NHWC images with {self.config.in_channels} channels and H, W divisible "
                f"by {f}; got shape {x.shape}"
            )
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """z: unscaled latent [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels]."""
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(
                f"decode expects NHWC latents with {self.config.latent_channels} channels; got shape {z.shape}"
            )
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """Reconstruct: decode the posterior sample (with ``key``) or its mean (without)."""
        posterior = self.encode(x)
        z = posterior.sample(key) if key is not None else posterior.mode()
        return self.decode(z)
