"""Distill-Forget-Repeat (George et al., arXiv 2512.02657; released code v1) — methods.md.

One backward pass on ::

    L = λ_u·L_unlearn + λ_p·L_preserve + λ_r·L_reg

- ``L_unlearn = mean ‖ε_θ(x_t, t, τ(p_f)) − sg[ε_prev(x_t, t, τ(p_m))]‖²`` — trajectory
  re-steering: x_t from ε_prev's images for the *forget* prompts (``forget_z0``), t ~ U{0..700};
  the target is what θ_{k-1} predicts on the same x_t for the aligned *mapped* prompt.
- ``L_preserve = mean ‖ε_θ(x_t, t, τ(p_r)) − sg[ε_teacher(x_t, t, τ(p_r))]‖²`` — generative
  replay with distillation on ``retain_z0``, t ~ U{0..999}; teacher = ε_prev (release) or ε_base.
  ``preserve_mode="replay"`` (ablation) regresses onto the training target instead
  (``schedulers.training_target``: the noise, or v for v-prediction schedules).
- ``L_rm`` (jaxforget's continual extension, ``lambda_rm`` > 0; off by default, as in the
  release): ``base.removed_distill`` on ε_prev's images of the earlier targets' prompts. The
  replay set never mentions an earlier target, so nothing else holds an earlier removal when a
  later request shares its anchor (toy world, attn2: the circle came back to 54 % when the
  triangle was removed, NOTES.md).
- ``L_reg = Σ (θ − θ_{k-1})²`` over all trainable elements (a sum, not a mean). It is computed on
  the *materialized* student against ``frozen.prev`` over every floating leaf: leaves that are not
  trained are equal to θ_{k-1} and contribute zero (and are skipped when ``materialize`` passed
  them through from ``frozen.rest``), and for LoRA this penalizes the effective weight change
  W + BA − W_{k-1}.

Every "ε" is the model's own output, so v-prediction schedules work unchanged (outputs are
compared with outputs).

Data sets read (``needs``): ``forget`` (forget_ctx, forget_z0), ``retain`` (retain_ctx,
retain_z0), ``removed`` (removed_ctx, removed_z0, removed_w; only with lambda_rm > 0), and
``mapped_ctx``: DFR needs the mapped *prompts* only, never ε_prev's images for them, so
``needs.mapped`` is False — the engine supplies ``mapped_ctx`` beside ``forget_ctx`` for every
request (p_m is aligned one to one with p_f). ``frozen.base`` is read only with ``teacher="base"``
(``Method.needs_base``). Note the continual rule: distilling from ε_base on prompts that mention an
earlier target can revive it; ``teacher="prev"`` is the safe default.

Random numbers: ``k_u, k_p = jax.random.split(rng)``; ``base.noisy(schedule, forget_z0, k_u,
t_max=unlearn_t_max)`` and ``base.noisy(schedule, retain_z0, k_p)`` — independent per term.

Also here: ``auto_anchor`` (the method's v2) picks the candidate anchor whose ε_prev prediction is
closest to the forget prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxforget import schedulers as S
from jaxforget.errors import ConfigError
from jaxforget.methods import base as B

NAME = "dfr"


@dataclass(frozen=True)
class Config:
    lambda_u: float = 1.0  # weight of L_unlearn
    lambda_p: float = 10.0  # weight of L_preserve
    lambda_r: float = 1e-4  # weight of L_reg (a sum over trainable elements)
    unlearn_t_max: int = 700  # t ~ U{0..unlearn_t_max} for L_unlearn
    teacher: str = "prev"  # "prev" | "base": whose prediction L_preserve distils
    preserve_mode: str = "distill"  # "distill" | "replay" (target = noise / v)
    lambda_rm: float = 0.0  # weight of L_rm (keep earlier removals; 0 = off, the release)


TEACHERS = ("prev", "base")
PRESERVE_MODES = ("distill", "replay")


def validate(cfg: Config, schedule: S.NoiseSchedule) -> None:
    if cfg.teacher not in TEACHERS:
        raise ConfigError(f"dfr.teacher={cfg.teacher!r} is not supported (use one of {', '.join(TEACHERS)})")
    if cfg.preserve_mode not in PRESERVE_MODES:
        raise ConfigError(f"dfr.preserve_mode={cfg.preserve_mode!r} is not supported "
                          f"(use one of {', '.join(PRESERVE_MODES)})")
    if cfg.lambda_rm < 0:
        raise ConfigError(f"dfr.lambda_rm={cfg.lambda_rm} must be >= 0")
    if not 0 <= cfg.unlearn_t_max < schedule.num_train_timesteps:
        raise ConfigError(f"dfr.unlearn_t_max={cfg.unlearn_t_max} must lie in "
                          f"[0, {schedule.num_train_timesteps - 1}]")


def _flat(state: nnx.State) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def param_sq_dist(a: nnx.State, b: nnx.State, untrained: nnx.State | None = None) -> jax.Array:
    """Σ (a − b)² over the floating leaves of ``a``, paired with ``b`` by tree path (fp32).

    ``untrained``: the student's non-trainable variables (``frozen.rest``). A leaf of ``a`` that
    *is* (same traced object) the leaf of ``untrained`` at its path was passed through by
    ``materialize`` untouched; it equals θ_{k-1} by the definition of ``Frozen`` and adds 0, so it
    is skipped instead of read twice (for attn2-only training that avoids a pass over the
    whole UNet each step). Pairing by path keeps this right when the states carry different
    metadata; a leaf of ``a`` missing from ``b`` is a programming error and raises."""
    lb = _flat(b)
    skip = {} if untrained is None else _flat(untrained)
    total = jnp.zeros((), jnp.float32)
    for key, x in _flat(a).items():
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating) or skip.get(key) is x:
            continue
        if key not in lb:
            raise ValueError(f"param_sq_dist: {key} is missing from the reference state")
        total = total + jnp.sum(jnp.square(x.astype(jnp.float32) - lb[key].astype(jnp.float32)))
    return total


@dataclass(frozen=True)
class DFR:
    cfg: Config
    unet_fn: B.UNetFn
    schedule: S.NoiseSchedule
    name: str = NAME
    needs: B.DataNeeds = field(default_factory=lambda: B.DataNeeds(forget=True, retain=True))

    @property
    def needs_base(self) -> bool:
        """Whether ``frozen.base`` (θ_0) must be given."""
        return self.cfg.teacher == "base"

    def terms(self, params: nnx.State, frozen: B.Frozen, batch: Mapping[str, jax.Array],
              rng: jax.Array) -> dict[str, jax.Array]:
        """The unweighted terms (fp32 scalars): unlearn, preserve, reg (+ removed when lambda_rm > 0)."""
        cfg, f = self.cfg, self.unet_fn
        k_u, k_p = jax.random.split(rng)
        student = f.student(params, frozen)
        # teachers are constants of this request: no gradient may reach them through any term
        prev = jax.lax.stop_gradient(frozen.prev)

        # trajectory re-steering: forget images, forget prompt -> prev's mapped-prompt prediction
        x_t, t, _ = B.noisy(self.schedule, batch["forget_z0"], k_u, t_max=cfg.unlearn_t_max)
        pred, _ = f(student, x_t, t, **B.cond(batch, "forget"))
        target, _ = f(prev, x_t, t, **B.cond(batch, "mapped"))
        l_unlearn = B.mse(pred, jax.lax.stop_gradient(target))

        # generative replay (+ distillation) on the retain set
        z0 = batch["retain_z0"]
        x_t, t, eps = B.noisy(self.schedule, z0, k_p)
        pred, _ = f(student, x_t, t, **B.cond(batch, "retain"))
        if cfg.preserve_mode == "replay":
            target = S.training_target(self.schedule, z0.astype(jnp.float32), eps, t)
        else:
            if cfg.teacher == "base":
                if frozen.base is None:
                    raise ValueError("dfr: teacher='base' needs frozen.base (θ_0)")
                teacher = jax.lax.stop_gradient(frozen.base)
            else:
                teacher = prev
            target, _ = f(teacher, x_t, t, **B.cond(batch, "retain"))
        l_preserve = B.mse(pred, jax.lax.stop_gradient(target))

        l_reg = param_sq_dist(student, prev, frozen.rest)
        terms = {"unlearn": l_unlearn, "preserve": l_preserve, "reg": l_reg}
        if cfg.lambda_rm > 0:  # its own key, so the other terms' draws do not change
            terms["removed"] = B.removed_distill(f, self.schedule, student, prev, batch,
                                                 jax.random.fold_in(rng, 2))
        return terms

    def loss(self, params: nnx.State, frozen: B.Frozen, batch: Mapping[str, jax.Array],
             rng: jax.Array) -> tuple[jax.Array, B.Metrics]:
        m = self.terms(params, frozen, batch, rng)
        c = self.cfg
        total = c.lambda_u * m["unlearn"] + c.lambda_p * m["preserve"] + c.lambda_r * m["reg"]
        if "removed" in m:
            total = total + c.lambda_rm * m["removed"]
        return total, {"loss": total.astype(jnp.float32), **m}


def build(cfg: Config, unet_fn: B.UNetFn, schedule: S.NoiseSchedule) -> DFR:
    validate(cfg, schedule)
    needs = B.DataNeeds(forget=True, retain=True, removed=cfg.lambda_rm > 0)
    return DFR(cfg=cfg, unet_fn=unet_fn, schedule=schedule, needs=needs)


# ----------------------------------------------------------------------------- automatic anchor
def _rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Rows ``idx`` of x (a single row is broadcast)."""
    if x.shape[0] == 1:
        return jnp.broadcast_to(x, (idx.shape[0],) + x.shape[1:])
    return jnp.take(x, idx, axis=0)


def auto_anchor(
    unet_fn: B.UNetFn,
    prev_state: nnx.State,
    schedule: S.NoiseSchedule,
    forget_cond: Mapping[str, jax.Array | None],
    candidate_conds: Mapping[str, jax.Array | None],
    z0: jax.Array,
    rng: jax.Array,
    n: int = 32,
    t_max: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Choose the candidate anchor whose ε_prev prediction is closest to the forget prompt's.

    forget_cond: ``base.cond``-style kwargs for F forget prompts: ctx [F,S,D], optional pooled
    [F,P] and time_ids [F or 1, 6]. candidate_conds: the same templates filled with each of C
    candidates: ctx [C,F,S,D] (or [C,S,D] when F = 1), pooled [C,F,P] / [C,P]; time_ids are taken
    from ``forget_cond``. z0 [N,h,w,c]: latents to noise (e.g. ε_prev's forget images).

    n random draws (latent row, prompt row, t ~ U{0..t_max}, ε) shared by all candidates;
    distance_c = mean ‖ε_prev(x_t, t, cand_c) − ε_prev(x_t, t, forget)‖² over all n draws.
    Returns (argmin index int32, distances [C] fp32). Pure and jit-able (static: unet_fn,
    schedule, n, t_max); candidates are evaluated one after another (lax.map) to bound memory.
    """
    hi = schedule.num_train_timesteps - 1 if t_max is None else int(t_max)
    k_i, k_p, k_t, k_n = jax.random.split(rng, 4)
    n_prompts = forget_cond["ctx"].shape[0]
    zi = jax.random.randint(k_i, (n,), 0, z0.shape[0])
    pi = jax.random.randint(k_p, (n,), 0, n_prompts)
    t = jax.random.randint(k_t, (n,), 0, hi + 1, dtype=jnp.int32)
    eps = jax.random.normal(k_n, (n,) + z0.shape[1:], jnp.float32)
    x_t = S.add_noise(schedule, jnp.take(z0, zi, axis=0).astype(jnp.float32), eps, t)
    state = jax.lax.stop_gradient(prev_state)

    time_ids = forget_cond.get("time_ids")
    time_ids = None if time_ids is None else _rows(time_ids, pi)

    def apply(ctx: jax.Array, pooled: jax.Array | None) -> jax.Array:
        out, _ = unet_fn(state, x_t, t, _rows(ctx, pi),
                         pooled=None if pooled is None else _rows(pooled, pi), time_ids=time_ids)
        return out

    ref = apply(forget_cond["ctx"], forget_cond.get("pooled"))
    cand = {"ctx": candidate_conds["ctx"]}
    if candidate_conds["ctx"].ndim == forget_cond["ctx"].ndim:  # [C,S,D]: one template
        cand["ctx"] = cand["ctx"][:, None]
    if candidate_conds.get("pooled") is not None:
        p = candidate_conds["pooled"]
        cand["pooled"] = p[:, None] if p.ndim == 2 else p

    def dist(c: dict[str, jax.Array]) -> jax.Array:
        return B.mse(apply(c["ctx"], c.get("pooled")), ref)

    d = jax.lax.map(dist, cand)
    return jnp.argmin(d).astype(jnp.int32), d.astype(jnp.float32)
