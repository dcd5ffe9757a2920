"""Regularizers composable with any unlearning method (methods.md, "Regularizers usable with any
method" and DUGE's memory regularization R).

* ``penalty``: L1 / L2 distance to θ_{k-1} (``l1_prev`` / ``l2_prev``), L2 to θ_0 (``l2_base``) —
  per-element MEANs over the trained leaves — and online EWC (``ewc``):
  ``R = Σ_i F_i (θ_i − θ_{k-1,i})²`` (a sum, with F normalized to mean 1).
* ``fisher_diagonal`` / ``update_fisher``: the diagonal empirical Fisher of the denoising loss on
  retain data, accumulated over requests as ``F_k = γ·F_{k-1} + F_new`` and normalized to mean 1.
* ``projection_matrix`` / ``project_gradients`` / ``project_updates``: gradient projection for
  the cross-attention K/V kernels, so that the keys / values of protected text embeddings do not
  move.
* ``ties_merge``: TIES merging of per-request deltas, the alternative to sequential chaining.

All Fisher / penalty states are ``nnx.State`` keyed by full UNet paths (the same paths as the
UNet state), holding only the leaves they concern.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxforget import schedulers as S
from jaxforget.errors import ConfigError
from jaxforget.methods.base import Frozen, Metrics, UNetFn

KINDS = ("none", "l1_prev", "l2_prev", "l2_base", "ewc")
Path = tuple


@dataclass(frozen=True)
class Config:
    """Regularizer options (reference weights in methods.md: L1 50, L2 25 000).

    kind: none | l1_prev | l2_prev | l2_base | ewc.
    weight: multiplier of the penalty in the loss.
    ewc_gamma: online-EWC decay, F_k = γ·F_{k-1} + F_new.
    ewc_samples: (example, t, ε) draws per Fisher estimate.
    grad_projection: project attn2 to_k / to_v updates away from protected text embeddings.
    projection_eps: ε in P = I − C (CᵀC + εI)⁻¹ Cᵀ.
    """

    kind: str = "none"
    weight: float = 0.0
    ewc_gamma: float = 1.0
    ewc_samples: int = 16
    grad_projection: bool = False
    projection_eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"regularizer.kind={self.kind!r} is not supported (use one of {', '.join(KINDS)})")
        if self.weight < 0:
            raise ConfigError(f"regularizer.weight must be >= 0, got {self.weight}")
        if self.ewc_gamma < 0:
            raise ConfigError(f"regularizer.ewc_gamma must be >= 0, got {self.ewc_gamma}")
        if self.ewc_samples < 1:
            raise ConfigError(f"regularizer.ewc_samples must be >= 1, got {self.ewc_samples}")
        if self.projection_eps <= 0:
            raise ConfigError(f"regularizer.projection_eps must be > 0, got {self.projection_eps}")


# ----------------------------------------------------------------------------- helpers
def _dotted(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _flat(state: nnx.State) -> dict[Path, Any]:
    return dict(nnx.to_flat_state(state))


def _value(leaf: Any) -> jax.Array:
    return leaf[...] if isinstance(leaf, nnx.Variable) else jnp.asarray(leaf)


def _rebuild(items: dict[Path, Any]) -> nnx.State:
    return nnx.from_flat_state(sorted(items.items(), key=lambda kv: kv[0]))


def _with_value(leaf: Any, value: jax.Array) -> Any:
    return leaf.replace(value) if isinstance(leaf, nnx.Variable) else value


def _select(state: nnx.State, paths: Sequence[str] | None) -> dict[Path, Any]:
    flat = _flat(state)
    if paths is None:
        return flat
    wanted = set(paths)
    chosen = {p: v for p, v in flat.items() if _dotted(p) in wanted}
    missing = wanted - {_dotted(p) for p in chosen}
    if missing:
        raise ConfigError(f"regularizer: {len(missing)} trainable path(s) are not in the state, "
                          f"e.g. {sorted(missing)[0]!r}")
    return chosen


# ----------------------------------------------------------------------------- penalties
def penalty(cfg: Config, student_state: nnx.State, frozen: Frozen,
            paths: Sequence[str] | None = None) -> tuple[jax.Array, Metrics]:
    """The weighted regularizer value and metrics {reg_raw, reg}. Pure (jit-able), fp32.

    ``student_state`` is either the full materialized UNet state with ``paths`` = the trainable
    paths (``Trainable.trainable_paths``), or just the trained leaves with ``paths=None``; each of
    its leaves is compared with the same path of ``frozen.prev`` (``frozen.base`` for l2_base).
    l1/l2: mean over all selected elements (one mean over the concatenation, not a mean of
    per-leaf means). ewc: Σ F (θ − θ_prev)² over the leaves of the Fisher ``frozen.reg`` that
    the student holds (restricted to ``paths`` when given); ``frozen.reg`` is the Fisher State.
    """
    zero = jnp.zeros((), jnp.float32)
    if cfg.kind == "none" or cfg.weight == 0.0:
        return zero, {"reg_raw": zero, "reg": zero}
    if cfg.kind == "ewc":
        if frozen.reg is None:
            raise ConfigError("regularizer.kind=ewc needs a Fisher state (frozen.reg is None)")
        student, prev = _flat(student_state), _flat(frozen.prev)
        wanted = None if paths is None else set(paths)
        # leaves the student does not hold (or does not train) equal θ_{k-1}: their term is 0
        fisher = {p: f for p, f in _flat(frozen.reg).items()
                  if p in student and (wanted is None or _dotted(p) in wanted)}
        raw = zero
        for p, f in fisher.items():
            d = _value(student[p]).astype(jnp.float32) - _value(prev[p]).astype(jnp.float32)
            raw = raw + jnp.sum(_value(f).astype(jnp.float32) * jnp.square(d))
    else:
        ref_state = frozen.base if cfg.kind == "l2_base" else frozen.prev
        if ref_state is None:
            raise ConfigError(f"regularizer.kind={cfg.kind} needs θ_0 (frozen.base is None)")
        student, ref = _select(student_state, paths), _flat(ref_state)
        total, count = zero, 0
        for p, v in student.items():
            d = _value(v).astype(jnp.float32) - _value(ref[p]).astype(jnp.float32)
            total = total + (jnp.sum(jnp.abs(d)) if cfg.kind == "l1_prev" else jnp.sum(jnp.square(d)))
            count += math.prod(d.shape)
        raw = total / max(count, 1)
    return cfg.weight * raw, {"reg_raw": raw, "reg": cfg.weight * raw}


# ----------------------------------------------------------------------------- EWC Fisher
def fisher_draws(schedule: S.NoiseSchedule, rng: jax.Array, n_samples: int, n_examples: int,
                 example_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The (example index, t, ε) of each Fisher draw: examples cycle in order (i mod B), t ~
    U{0..T-1}, ε ~ N(0, I). Exposed so a reference can reproduce the estimate exactly."""
    k_t, k_n = jax.random.split(rng)
    idx = jnp.arange(n_samples, dtype=jnp.int32) % n_examples
    t = jax.random.randint(k_t, (n_samples,), 0, schedule.num_train_timesteps, dtype=jnp.int32)
    eps = jax.random.normal(k_n, (n_samples,) + tuple(example_shape), jnp.float32)
    return idx, t, eps


def _fisher_impl(unet_fn: UNetFn, schedule: S.NoiseSchedule, paths: tuple[str, ...] | None,
                 state: nnx.State, z0: jax.Array, ctx: jax.Array, pooled: jax.Array | None,
                 time_ids: jax.Array | None, idx: jax.Array, t: jax.Array, eps: jax.Array) -> nnx.State:
    flat = _flat(state)
    wanted = None if paths is None else set(paths)
    wrt = {p: v for p, v in flat.items() if wanted is None or _dotted(p) in wanted}
    other = {p: v for p, v in flat.items() if p not in wrt}
    wrt_state = _rebuild(wrt)

    def example_loss(w: nnx.State, i, t_i, eps_i):
        full = _rebuild({**other, **_flat(w)})
        x0 = z0[i][None].astype(jnp.float32)
        t1 = t_i[None]
        x_t = S.add_noise(schedule, x0, eps_i[None], t1)
        target = S.training_target(schedule, x0, eps_i[None], t1)
        kw = {}
        if pooled is not None:
            kw = {"pooled": pooled[i][None], "time_ids": None if time_ids is None else time_ids[i][None]}
        pred, _ = unet_fn(full, x_t, t1, ctx[i][None], **kw)
        return jnp.mean(jnp.square(pred - target))

    grad_fn = jax.grad(example_loss)

    # one example at a time (lax.scan): memory stays at one gradient, whatever n_samples is
    def body(acc, draw):
        g = grad_fn(wrt_state, *draw)
        return jax.tree.map(lambda a, b: a + jnp.square(b.astype(jnp.float32)), acc, g), None

    acc0 = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), wrt_state)
    acc, _ = jax.lax.scan(body, acc0, (idx, t, eps))
    return jax.tree.map(lambda a: a / idx.shape[0], acc)


_fisher_jit = jax.jit(_fisher_impl, static_argnums=(0, 1, 2))


def fisher_diagonal(unet_fn: UNetFn, state: nnx.State, schedule: S.NoiseSchedule,
                    retain_z0: jax.Array, retain_ctx: jax.Array, rng: jax.Array, n_samples: int,
                    *, paths: Sequence[str] | None = None, retain_pooled: jax.Array | None = None,
                    time_ids: jax.Array | None = None) -> nnx.State:
    """Diagonal empirical Fisher of the denoising loss on retain data (jitted).

    F_i = mean over n_samples draws of (∂ℓ/∂θ_i)², ℓ = mean ‖ε_θ(x_t, t, ctx) − target‖² of ONE
    example (target = ε, or v / x0 per the schedule's prediction type); draws from
    ``fisher_draws``. ``state`` is the full UNet state; the Fisher is taken w.r.t. the leaves
    in ``paths`` (default: all) and returned as a State of those leaves (fp32, Param type kept).
    SDXL: pass ``retain_pooled`` [B, P] and ``time_ids`` [B, 6].
    """
    idx, t, eps = fisher_draws(schedule, rng, int(n_samples), retain_z0.shape[0], retain_z0.shape[1:])
    key = None if paths is None else tuple(sorted(paths))
    return _fisher_jit(unet_fn, schedule, key, state, retain_z0, retain_ctx, retain_pooled, time_ids,
                       idx, t, eps)


def _mean_one(flat: dict[Path, Any]) -> dict[Path, Any]:
    total = sum(jnp.sum(_value(v).astype(jnp.float32)) for v in flat.values())
    count = sum(math.prod(_value(v).shape) for v in flat.values())
    mean = jnp.maximum(total / max(count, 1), jnp.finfo(jnp.float32).tiny)
    return {p: _with_value(v, _value(v).astype(jnp.float32) / mean) for p, v in flat.items()}


def update_fisher(prev_f: nnx.State | None, new_f: nnx.State, gamma: float) -> nnx.State:
    """Online EWC accumulation F_k = γ·F_{k-1} + F_new, normalized to mean 1 over all elements.

    F_new is itself normalized to mean 1 first: F_{k-1} is stored normalized, so the raw scale
    of F_new (which depends on the loss magnitude) would otherwise decide the mix instead of γ.
    Paths present in only one of the two count as zero in the other (the trained set may change
    between requests).
    """
    new = _mean_one(_flat(new_f))
    if prev_f is None:
        return _rebuild(new)
    prev = _flat(prev_f)
    out: dict[Path, Any] = {}
    for p in set(prev) | set(new):
        a = gamma * _value(prev[p]).astype(jnp.float32) if p in prev else None
        b = _value(new[p]) if p in new else None
        value = b if a is None else (a if b is None else a + b)
        out[p] = _with_value(new[p] if p in new else prev[p], value)
    return _rebuild(_mean_one(out))


# ----------------------------------------------------------------------------- gradient projection
_KV_KERNEL = re.compile(r"(^|\.)attn2\.to_[kv]\.kernel$")
_KV_LORA = re.compile(r"(^|\.)attn2\.to_[kv]\.kernel\.lora_[ab]$")


def projection_matrix(c: jax.Array, eps: float = 1e-3) -> jax.Array:
    """P [D, D] = I − Cᵀ (C Cᵀ + εI)⁻¹ C for C [n, D] (rows = protected text embeddings).

    This is methods.md's ``P = I − C' (C'ᵀC' + εI)⁻¹ C'ᵀ`` with C' = Cᵀ [D, n] (columns =
    embeddings). Computed from the thin SVD C = U S Vᵀ as P = I − V diag(s²/(s²+ε)) Vᵀ — the same
    matrix, but without forming C Cᵀ, whose conditioning (correlated token embeddings) is beyond
    fp32 for a small ε. P is symmetric; P Cᵀ ≈ 0 (residual ε/(s²+ε) per direction).
    """
    c = jnp.asarray(c, jnp.float32)
    _, s, vt = jnp.linalg.svd(c, full_matrices=False)
    keep = jnp.square(s) / (jnp.square(s) + eps)
    return jnp.eye(c.shape[1], dtype=jnp.float32) - (vt.T * keep[None, :]) @ vt


def project_gradients(grads: nnx.State, p: jax.Array) -> nnx.State:
    """Project the gradients of the attn2 to_k / to_v kernels: G ← P @ G.

    Derivation: PyTorch stores W [out, D] and computes k = W e; methods.md's G ← G·P then gives
    ΔW C' = −lr·G P C' ≈ 0, i.e. the keys/values of the protected embeddings do not move.
    jaxforget stores kernel K = Wᵀ [D, out] and computes k = e K, so the kernel gradient is Gᵀ and
    the projected one is (G P)ᵀ = Pᵀ Gᵀ = P @ G_K (P symmetric). With C [n, D] (rows = protected
    embeddings e), C (P G_K) = (P Cᵀ)ᵀ G_K ≈ 0, so an SGD step ΔK = −lr·P G_K leaves every e·K
    (the keys / values of e) unchanged. Other leaves pass through unchanged.

    Exact for updates linear in the gradient (SGD, momentum); Adam rescales elementwise, so use
    ``project_updates`` (after the optimizer) when the invariant must hold exactly.
    Raises ConfigError when no attn2 to_k / to_v kernel is trained, or when they are LoRA factors
    (projecting a factor's gradient does not make the product's update orthogonal).
    """
    flat = _flat(grads)
    if any(_KV_LORA.search(_dotted(k)) for k in flat):
        raise ConfigError("regularizer.grad_projection needs the attn2 to_k/to_v kernels trained "
                          "directly (trainable.lora_rank=0), not LoRA factors")
    hits = [k for k in flat if _KV_KERNEL.search(_dotted(k))]
    if not hits:
        raise ConfigError("regularizer.grad_projection: no attn2 to_k/to_v kernel is trained "
                          "(use trainable.filter=attn2 or attn2_kv)")
    p = jnp.asarray(p, jnp.float32)
    for k in hits:
        g = _value(flat[k])
        if g.shape[0] != p.shape[0]:
            raise ConfigError(f"regularizer.grad_projection: {_dotted(k)} has input dim {g.shape[0]}, "
                              f"but the projection is {p.shape[0]}-dimensional (text embedding width)")
        flat[k] = _with_value(flat[k], (p @ g.astype(jnp.float32)).astype(g.dtype))
    return _rebuild(flat)


def project_updates(p: jax.Array) -> optax.GradientTransformation:
    """An optax transformation applying ``project_gradients`` to the *updates*; chain it last
    (``optax.chain(optax.adamw(...), project_updates(P))``) so the step is exactly orthogonal to
    the protected embeddings whatever the optimizer (Adam, weight decay) did."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return project_gradients(updates, p), state

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- TIES merging
def state_delta(tuned: nnx.State, base: nnx.State, paths: Sequence[str] | None = None) -> nnx.State:
    """τ = θ_tuned − θ_base over the leaves of ``tuned`` (restricted to ``paths``), fp32."""
    t, b = _select(tuned, paths), _flat(base)
    return _rebuild({p: _with_value(v, _value(v).astype(jnp.float32) - _value(b[p]).astype(jnp.float32))
                     for p, v in t.items()})


def ties_merge(base_state: nnx.State, deltas: Sequence[nnx.State], density: float = 0.2,
               scale: float = 1.0) -> nnx.State:
    """TIES merging (Yadav et al. 2023) of per-request deltas τ_t (e.g. from ``state_delta``).

    1. trim: in each τ_t keep the top ``density`` fraction of entries by magnitude, ranked over
       all of τ_t's leaves together (one task vector, as in TIES), zero the rest;
    2. elect: per element, sign γ = sign(Σ_t trimmed τ_t) (where that is 0, the majority sign
       over all elements; +1 if that is 0 too);
    3. disjoint mean: average the trimmed τ_t whose sign agrees with γ (nonzero ones only).
    Result: θ = base + scale · τ_merged; leaves no delta touches stay as they are. Deltas may
    hold different subsets of the base's paths (missing = 0). Host-side (not jit-able): the
    trim threshold is found with numpy's O(N) partition, not a device sort.
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"ties density must be in (0, 1], got {density}")
    if not deltas:
        return base_state
    base = _flat(base_state)
    trimmed: list[dict[Path, jax.Array]] = []
    for delta in deltas:
        flat = {p: _value(v).astype(jnp.float32) for p, v in _flat(delta).items()}
        unknown = [p for p in flat if p not in base]
        if unknown:
            raise ConfigError(f"ties_merge: delta path {_dotted(unknown[0])!r} is not in the base state")
        mags = np.concatenate([np.abs(np.asarray(jax.device_get(v))).ravel() for v in flat.values()])
        keep = max(1, int(mags.size * density))
        thresh = np.partition(mags, mags.size - keep)[mags.size - keep]
        trimmed.append({p: jnp.where(jnp.abs(v) >= thresh, v, 0.0) for p, v in flat.items()})

    paths = sorted({p for d in trimmed for p in d})
    elected: dict[Path, jax.Array] = {}
    for p in paths:
        total = sum(d[p] for d in trimmed if p in d)
        elected[p] = jnp.sign(total)
    majority = jnp.sign(sum(jnp.sum(e) for e in elected.values()))
    majority = jnp.where(majority == 0, 1.0, majority)

    out = dict(base)
    for p in paths:
        gamma = jnp.where(elected[p] == 0, majority, elected[p])
        stack = jnp.stack([d[p] if p in d else jnp.zeros(base[p].shape, jnp.float32) for d in trimmed])
        agree = (jnp.sign(stack) == gamma[None]) & (stack != 0)
        merged = jnp.sum(jnp.where(agree, stack, 0.0), 0) / jnp.maximum(jnp.sum(agree, 0), 1)
        w = _value(base[p])
        out[p] = _with_value(base[p], (w.astype(jnp.float32) + scale * merged).astype(w.dtype))
    return _rebuild(out)
