"""Erased Stable Diffusion (Gandikota et al., ICCV 2023) — methods.md "Baselines".

::

    target = ε_T(x_t, t, "") − η·[ε_T(x_t, t, c) − ε_T(x_t, t, "")]        η = 1
    L      = mean ‖ε_θ(x_t, t, c) − sg[target]‖²

i.e. the student is pulled toward *negative* classifier-free guidance away from the forget prompt
c (η multiplies the conditional direction with a minus sign: a larger η erases harder). ε_T is
the teacher, ``ε_base`` (θ_0) by default as in ESD — the erased direction is measured on the
original model; ``teacher="prev"`` uses θ_{k-1} instead (continual chaining). Every "ε" is the
model's own output (v-prediction works unchanged: outputs are compared with outputs).

x_t is not a noised image: it comes from a partial DDIM run (``ddim_steps`` steps, classifier-free
guidance ``guidance`` on c vs "", η_DDIM = 0) from pure N(0, I) noise, stopped after ``k`` steps,
k ~ U{0 .. ddim_steps − 1} (k = 0: the pure noise itself). The run samples with the student
(``sampler="student"``, the paper) or with the frozen θ_0 (``sampler="frozen"``, the later
rewrite); either way it happens inside the loss under ``stop_gradient`` (the sampler's state is
stop-gradiented *before* the loop, so reverse mode never meets the dynamic-length while loop).
One stop index is drawn per call and shared by the batch (the reference trains with batch 1);
the initial noise is per example.

Timestep: after k DDIM steps the latent sits at ``prev_timesteps[k−1]`` (at ``timesteps[0]``
for k = 0) — the timestep whose ᾱ the last DDIM update produced. Both the teacher and the student
are fed exactly that timestep (``latent_timesteps``). The original ESD script instead feeds a
DDPM timestep drawn at random from the 1000/n-wide interval it associates with the stop index,
which is about two DDIM steps noisier than the latent actually is (methods.md, "Known
pitfalls"); jaxforget deliberately does not reproduce that.

Trainable groups (chosen by the engine, ``jaxforget/methods/trainable.py`` presets):
ESD-x = all ``attn2`` projections (``attn2``); ESD-x-strict = ``attn2`` to_k / to_v only
(``attn2_kv``); ESD-u = everything except ``attn2``, the time embedding and the output layers
(``non_attn2``). Reference training: Adam lr 1e-5,
1000 iterations, batch 1 (``recommended_lr`` / ``recommended_steps``; the engine's config wins).

Data (``needs``): ``uncond`` (``uncond_ctx`` = τ(""), SDXL ``uncond_pooled``) and the forget
prompts' ``forget_ctx`` (SDXL: ``forget_pooled``, ``time_ids``). No images: ``needs.forget`` is
False because that flag asks for ε_prev's *images*; the engine supplies ``forget_ctx`` for every
request. ``frozen.base`` is read when ``teacher="base"`` or ``sampler="frozen"`` (``needs_base``).

Random numbers: ``k_stop, k_noise = jax.random.split(rng)`` (see ``draw``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxforget import schedulers as S
from jaxforget.errors import ConfigError
from jaxforget.methods import base as B

NAME = "esd"
SAMPLERS = ("student", "frozen")
TEACHERS = ("base", "prev")


@dataclass(frozen=True)
class Config:
    eta: float = 1.0  # negative-guidance strength η (target = ε_u − η (ε_c − ε_u))
    guidance: float = 3.0  # CFG scale of the partial DDIM run that produces x_t
    ddim_steps: int = 50  # DDIM steps of the full run; the stop index is drawn in [0, ddim_steps)
    sampler: str = "student"  # "student" (paper) | "frozen" (θ_0, the later rewrite)
    teacher: str = "base"  # "base" (θ_0, as ESD) | "prev" (θ_{k-1}): whose ε builds the target
    fixed_stop_index: int = -1  # >= 0: always stop after this many DDIM steps (tests, ablations)
    latent_size: tuple[int, ...] = ()  # (h, w) of the latents; () = the UNet's config.sample_size
    recommended_lr: float = 1e-5  # reference (Adam); the engine's optimizer config decides
    recommended_steps: int = 1000  # reference iterations, batch 1


def validate(cfg: Config, schedule: S.NoiseSchedule) -> None:
    if cfg.sampler not in SAMPLERS:
        raise ConfigError(f"esd.sampler={cfg.sampler!r} is not supported (use one of {', '.join(SAMPLERS)})")
    if cfg.teacher not in TEACHERS:
        raise ConfigError(f"esd.teacher={cfg.teacher!r} is not supported (use one of {', '.join(TEACHERS)})")
    if not 1 <= cfg.ddim_steps <= schedule.num_train_timesteps:
        raise ConfigError(f"esd.ddim_steps={cfg.ddim_steps} must lie in [1, {schedule.num_train_timesteps}]")
    if cfg.fixed_stop_index >= cfg.ddim_steps:
        raise ConfigError(f"esd.fixed_stop_index={cfg.fixed_stop_index} must be < ddim_steps={cfg.ddim_steps}")
    if cfg.latent_size and (len(cfg.latent_size) != 2 or min(cfg.latent_size) < 1):
        raise ConfigError(f"esd.latent_size={cfg.latent_size!r} must be () or (height, width)")


def latent_timesteps(schedule: S.NoiseSchedule, ddim_steps: int) -> np.ndarray:
    """[n] int32: the timestep of the latent after k DDIM steps from pure noise, k = 0..n−1.

    k = 0: ``timesteps[0]`` (the noise the run starts from); k >= 1: ``prev_timesteps[k−1]``,
    the timestep DDIM step k−1 moved the latent to (for "leading" spacing this equals
    ``timesteps[k]``; for "linspace" it can differ from the next list entry by one)."""
    ts = S.ddim_timesteps(schedule, ddim_steps)
    out = np.concatenate([ts.timesteps[:1], ts.prev_timesteps[:-1]]).astype(np.int32)
    if (out < 0).any():  # cannot happen for n <= T; guard the table the loss indexes
        raise ConfigError(f"esd: ddim_steps={ddim_steps} gives a negative latent timestep")
    return out


def _rows(x: jax.Array | None, b: int) -> jax.Array | None:
    # an embedding given once ([1, ...]) serves the whole batch
    if x is None or x.shape[0] == b:
        return x
    return jnp.broadcast_to(x, (b,) + x.shape[1:])


def _cat(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    return None if a is None else jnp.concatenate([a, b], axis=0)


@dataclass(frozen=True)
class ESD:
    cfg: Config
    unet_fn: B.UNetFn
    schedule: S.NoiseSchedule
    name: str = NAME
    needs: B.DataNeeds = field(default_factory=lambda: B.DataNeeds(uncond=True))

    @property
    def needs_base(self) -> bool:
        """Whether ``frozen.base`` (θ_0) must be given."""
        return self.cfg.teacher == "base" or self.cfg.sampler == "frozen"

    @property
    def latent_timesteps(self) -> np.ndarray:
        return latent_timesteps(self.schedule, self.cfg.ddim_steps)

    def draw(self, rng: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        """(stop index k int32 scalar, initial noise [B, h, w, C] fp32) from the loss's rng."""
        k_stop, k_noise = jax.random.split(rng)
        if self.cfg.fixed_stop_index >= 0:
            k = jnp.asarray(self.cfg.fixed_stop_index, jnp.int32)
        else:
            k = jax.random.randint(k_stop, (), 0, self.cfg.ddim_steps, dtype=jnp.int32)
        return k, jax.random.normal(k_noise, shape, jnp.float32)

    def _latent_shape(self, state: nnx.State, b: int) -> tuple[int, int, int, int]:
        # trace-time only: the UNet's static config lives in the graphdef
        ucfg = nnx.merge(self.unet_fn.graphdef, state).config
        if self.cfg.latent_size:
            h, w = self.cfg.latent_size
        else:
            s = ucfg.sample_size
            if s is None:
                raise ConfigError("esd: the UNet config has no sample_size; set esd.latent_size")
            h, w = (s, s) if isinstance(s, int) else tuple(s)
        return b, int(h), int(w), int(ucfg.in_channels)

    def _pair(self, state: nnx.State, x: jax.Array, t: jax.Array, c: Mapping, u: Mapping
              ) -> tuple[jax.Array, jax.Array]:
        """(ε(x, t, ""), ε(x, t, c)) from one UNet call on the doubled batch."""
        b = x.shape[0]
        out, _ = self.unet_fn(
            state, jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0),
            jnp.concatenate([u["ctx"], c["ctx"]], axis=0),
            pooled=_cat(u["pooled"], c["pooled"]), time_ids=_cat(c["time_ids"], c["time_ids"]))
        return out[:b], out[b:]

    def partial_ddim(self, state: nnx.State, noise: jax.Array, k: jax.Array, c: Mapping, u: Mapping
                     ) -> jax.Array:
        """k guided DDIM steps (η_DDIM = 0) from ``noise``: the latent at ``latent_timesteps[k]``.
        A while loop with a traced trip count; no gradient flows through it."""
        ts = S.ddim_timesteps(self.schedule, self.cfg.ddim_steps)
        tab_t, tab_prev = jnp.asarray(ts.timesteps), jnp.asarray(ts.prev_timesteps)
        state = jax.lax.stop_gradient(state)
        b = noise.shape[0]
        g = float(self.cfg.guidance)

        def body(i, x):
            t = jnp.full((b,), tab_t[i], jnp.int32)
            if g > 1.0:
                e_u, e_c = self._pair(state, x, t, c, u)
                out = e_u + g * (e_c - e_u)
            else:  # guidance off: conditional branch only, as the pipeline does
                out, _ = self.unet_fn(state, x, t, c["ctx"], pooled=c["pooled"], time_ids=c["time_ids"])
            nxt, _ = S.ddim_step(self.schedule, out, tab_t[i], tab_prev[i], x)
            return nxt

        return jax.lax.stop_gradient(jax.lax.fori_loop(0, k, body, noise.astype(jnp.float32)))

    def loss(self, params: nnx.State, frozen: B.Frozen, batch: Mapping[str, jax.Array],
             rng: jax.Array) -> tuple[jax.Array, B.Metrics]:
        cfg, f = self.cfg, self.unet_fn
        if self.needs_base and frozen.base is None:
            raise ValueError(f"esd: teacher={cfg.teacher!r} / sampler={cfg.sampler!r} needs frozen.base (θ_0)")
        c = B.cond(batch, "forget")
        b = c["ctx"].shape[0]
        c["time_ids"] = _rows(c["time_ids"], b)
        u = B.cond(batch, "uncond")
        u = {"ctx": _rows(u["ctx"], b), "pooled": _rows(u["pooled"], b), "time_ids": c["time_ids"]}
        student = f.student(params, frozen)
        teacher = jax.lax.stop_gradient(frozen.base if cfg.teacher == "base" else frozen.prev)
        sampler = student if cfg.sampler == "student" else frozen.base

        k, noise = self.draw(rng, self._latent_shape(frozen.prev, b))
        x_t = self.partial_ddim(sampler, noise, k, c, u)
        # the latent's own timestep (not the original code's ~2-steps-noisier one, see docstring)
        t = jnp.full((b,), jnp.asarray(self.latent_timesteps)[k], jnp.int32)

        e_u, e_c = self._pair(teacher, x_t, t, c, u)
        target = jax.lax.stop_gradient(e_u - cfg.eta * (e_c - e_u))
        pred, _ = f(student, x_t, t, c["ctx"], pooled=c["pooled"], time_ids=c["time_ids"])
        l = B.mse(pred, target)
        return l, {"loss": l, "esd": l}


def build(cfg: Config, unet_fn: B.UNetFn, schedule: S.NoiseSchedule) -> ESD:
    validate(cfg, schedule)
    latent_timesteps(schedule, cfg.ddim_steps)  # fail at build time, not inside jit
    return ESD(cfg=cfg, unet_fn=unet_fn, schedule=schedule)
