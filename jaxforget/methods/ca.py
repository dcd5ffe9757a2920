"""Concept Ablation, model-based variant (Kumari et al., ICCV 2023) — methods.md "Baselines".

::

    L = mean ‖ε_θ(x_t, t, τ(p_f)) − sg[ε_θ(x_t, t, τ(p_m))]‖²          t ~ U{0 .. T−1}

x_t is a noised *anchor* image (``mapped_z0``: ε_prev's images for the mapped prompts p_m), and
the target is the student's own prediction for the aligned anchor prompt under stop-gradient:
the forget prompt is taught to behave like the anchor prompt on anchor images. The teacher
branch is evaluated on a stop-gradiented copy of the student state, so the backward pass only
runs through the forget-prompt branch. Every "ε" is the model's own output (v-prediction works
unchanged).

Reference: trains ``attn2`` to_k / to_v (trainable preset ``attn2_kv``), 100 steps
(``recommended_steps``; the engine's config decides).

Data (``needs``): ``mapped`` (mapped_ctx, mapped_z0) plus ``forget_ctx`` (always supplied).
Random numbers: ``base.noisy(schedule, mapped_z0, rng)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import jax
from flax import nnx

from jaxforget import schedulers as S
from jaxforget.methods import base as B

NAME = "ca"


@dataclass(frozen=True)
class Config:
    recommended_steps: int = 100  # reference; the engine's training config decides


def validate(cfg: Config, schedule: S.NoiseSchedule) -> None:
    return None  # nothing configurable affects the loss


@dataclass(frozen=True)
class CA:
    cfg: Config
    unet_fn: B.UNetFn
    schedule: S.NoiseSchedule
    name: str = NAME
    needs: B.DataNeeds = field(default_factory=lambda: B.DataNeeds(mapped=True))
    needs_base: bool = False

    def loss(self, params: nnx.State, frozen: B.Frozen, batch: Mapping[str, jax.Array],
             rng: jax.Array) -> tuple[jax.Array, B.Metrics]:
        f = self.unet_fn
        x_t, t, _ = B.noisy(self.schedule, batch["mapped_z0"], rng)
        student = f.student(params, frozen)
        pred, _ = f(student, x_t, t, **B.cond(batch, "forget"))
        # teacher = the current student itself, frozen for this step
        target, _ = f(jax.lax.stop_gradient(student), x_t, t, **B.cond(batch, "mapped"))
        l = B.mse(pred, jax.lax.stop_gradient(target))
        return l, {"loss": l, "ca": l}


def build(cfg: Config, unet_fn: B.UNetFn, schedule: S.NoiseSchedule) -> CA:
    validate(cfg, schedule)
    return CA(cfg=cfg, unet_fn=unet_fn, schedule=schedule)
