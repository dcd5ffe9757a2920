"""Forget-Me-Not attention re-steering (Zhang et al., 2023) — methods.md "Baselines".

::

    L = ‖ concat_ℓ A^θ_ℓ(x_t, t, τ(p_f))[..., T_f] ‖_F          t ~ U{0 .. T−1}

x_t is a noised image *of the target* (``forget_z0``: ε_prev's images for the forget prompts),
A^θ_ℓ the student's post-softmax cross-attention probabilities of layer ℓ ([B, heads, pixels,
77]) at the target's token positions T_f (``forget_pos``, masked by ``forget_pos_mask``: padded
positions contribute nothing). The Frobenius norm runs over everything concatenated — layers,
batch, heads, pixels and positions — as the reference's ``torch.cat(attn_probs).norm()``; its
scale therefore grows with √(batch · pixels). There is no target: driving the target tokens'
attention to zero re-steers it onto the other tokens.

Layers: ``layers`` is a regular expression searched (``re.search``) in each cross-attention
layer's dotted path (e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``); "" takes
every ``attn2`` layer. A pattern matching no layer is an error (at trace time).

Reference hyperparameters (the engine's optimizer config decides; mirrored in
``recommended_lr`` / ``recommended_steps``): AdamW lr 2e-6, 35 steps, batch 1. Which token
positions form T_f (with or without end-of-text positions) is the engine's choice when it builds
``forget_pos``; note methods.md's pitfall: "all end-of-text" is ~70 padding positions on SD 1.x
and 1 on SD 2.x / SDXL.

Data (``needs``): ``forget`` (forget_ctx, forget_z0) and ``token_positions`` (forget_pos,
forget_pos_mask). Random numbers: ``base.noisy(schedule, forget_z0, rng)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxforget import schedulers as S
from jaxforget.errors import ConfigError
from jaxforget.methods import base as B

NAME = "fmn"


@dataclass(frozen=True)
class Config:
    layers: str = ""  # regex over attn2 layer paths ("" = all attn2 layers)
    recommended_lr: float = 2e-6  # reference: AdamW
    recommended_steps: int = 35  # reference: batch 1


def validate(cfg: Config, schedule: S.NoiseSchedule) -> None:
    try:
        re.compile(cfg.layers)
    except re.error as e:
        raise ConfigError(f"fmn.layers={cfg.layers!r} is not a valid regular expression ({e})") from None


def select_layers(probes: Mapping[str, jax.Array], pattern: str) -> list[str]:
    """The probed attn2 layer paths whose name matches ``pattern`` ("" = all), sorted."""
    rx = re.compile(pattern)
    names = sorted(k for k in probes if rx.search(k))
    if not names:
        raise ConfigError(f"fmn.layers={pattern!r} matches no cross-attention layer "
                          f"(have e.g. {sorted(probes)[:3]})")
    return names


def _safe_sqrt(x: jax.Array) -> jax.Array:
    # sqrt with a zero (not NaN) gradient at 0, e.g. when every position is masked out
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


@dataclass(frozen=True)
class FMN:
    cfg: Config
    unet_fn: B.UNetFn
    schedule: S.NoiseSchedule
    name: str = NAME
    needs: B.DataNeeds = field(default_factory=lambda: B.DataNeeds(forget=True, token_positions=True))
    needs_base: bool = False

    def loss(self, params: nnx.State, frozen: B.Frozen, batch: Mapping[str, jax.Array],
             rng: jax.Array) -> tuple[jax.Array, B.Metrics]:
        x_t, t, _ = B.noisy(self.schedule, batch["forget_z0"], rng)
        student = self.unet_fn.student(params, frozen)
        pos = batch["forget_pos"].astype(jnp.int32)
        mask = batch["forget_pos_mask"].astype(jnp.float32)[:, None, None, :]  # [B,1,1,K]
        _, probes = self.unet_fn(student, x_t, t, **B.cond(batch, "forget"), probe_tokens=pos)
        sq = jnp.zeros((), jnp.float32)
        for name in select_layers(probes, self.cfg.layers):
            sq = sq + jnp.sum(jnp.square(probes[name].astype(jnp.float32) * mask))
        l = _safe_sqrt(sq)
        return l, {"loss": l, "fmn_attn": l}


def build(cfg: Config, unet_fn: B.UNetFn, schedule: S.NoiseSchedule) -> FMN:
    validate(cfg, schedule)
    return FMN(cfg=cfg, unet_fn=unet_fn, schedule=schedule)
