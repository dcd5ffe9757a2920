"""Plain fine-tuning on anchor images with the forget prompt — methods.md "Baselines".

::

    L = mean ‖ε_θ(x_t, t, τ(p_f)) − target(z0, ε, t)‖²          t ~ U{0 .. T−1}

z0 = ``mapped_z0`` (ε_prev's images for the mapped/anchor prompts), ``target`` the schedule's
training target (``schedulers.training_target``: ε, or v for v-prediction). The ordinary
denoising loss with the forget prompt's text paired with anchor images — and no preservation
term at all, so with many steps or broad trainable sets the model collapses: the baseline that
shows why the other methods distil or replay.

Data (``needs``): ``mapped`` (mapped_z0) plus ``forget_ctx`` (always supplied).
Random numbers: ``base.noisy(schedule, mapped_z0, rng)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxforget import schedulers as S
from jaxforget.methods import base as B

NAME = "finetune"


@dataclass(frozen=True)
class Config:
    pass  # no options: the loss has none (steps / lr / trainable set are engine config)


def validate(cfg: Config, schedule: S.NoiseSchedule) -> None:
    return None


@dataclass(frozen=True)
class Finetune:
    cfg: Config
    unet_fn: B.UNetFn
    schedule: S.NoiseSchedule
    name: str = NAME
    needs: B.DataNeeds = field(default_factory=lambda: B.DataNeeds(mapped=True))
    needs_base: bool = False

    def loss(self, params: nnx.State, frozen: B.Frozen, batch: Mapping[str, jax.Array],
             rng: jax.Array) -> tuple[jax.Array, B.Metrics]:
        z0 = batch["mapped_z0"].astype(jnp.float32)
        x_t, t, eps = B.noisy(self.schedule, z0, rng)
        target = S.training_target(self.schedule, z0, eps, t)
        pred, _ = self.unet_fn(self.unet_fn.student(params, frozen), x_t, t, **B.cond(batch, "forget"))
        l = B.mse(pred, target)
        return l, {"loss": l, "finetune": l}


def build(cfg: Config, unet_fn: B.UNetFn, schedule: S.NoiseSchedule) -> Finetune:
    validate(cfg, schedule)
    return Finetune(cfg=cfg, unet_fn=unet_fn, schedule=schedule)
