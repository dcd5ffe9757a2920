"""Fused cross-attention + target-token probability mass (the DUGE ``L_attn`` map).

The attention-map losses only need ``agg = Σ_{j∈T} softmax(q kᵀ·scale)_j`` per query, yet the
plain XLA path materialises the full fp32 probability tensor [B, heads, Nq, Nk] and keeps it
(plus a cast copy) alive as a backward residual in every cross-attention layer. Here one Pallas
kernel computes the attention output and that masked row-sum per block of queries; the
probabilities exist only as one [block_q, Nk] tile in on-chip memory. Cross-attention keys are
the text tokens (Nk = 77), so all keys fit in one block and only Nq is tiled.

Backward: a second Pallas kernel (not a jnp recompute). The forward saves only q, k, v and the
mask; the backward recomputes each [block_q, Nk] probability tile, so the full tensor is never
stored in either pass. The backward runs one program per (batch, head) and loops over query
blocks, accumulating dk/dv (and the mask gradient) in registers — no cross-program races on
GPU, and no [Nq/block_q, Nk, d] partial sums in HBM.

Layout: q [B, heads, Nq, d], k [B, heads, Nk, d], v [B, heads, Nk, dv], target_mask [B, Nk]
float (1 at target positions; any weights work, the map is linear in the mask). Softmax and
target_prob are fp32 even for bf16 inputs; ``out`` has v's dtype (as ``layers.attention``).

To satisfy Triton (power-of-two block dims, dot dims >= 16) and TPU (last two block dims equal
the array's or tile-aligned), the wrapper zero-pads d/dv to a power of two >= 16 and Nk to a
power of two >= 16; padded keys are excluded from the softmax by a column-index test inside the
kernel, and zero-padded head dims change no dot product. Padding happens outside the
``custom_vjp``, so autodiff slices the padded gradients back for free.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

DEFAULT_BLOCK_Q = 128
_MIN_DIM = 16  # Triton's tl.dot needs every matmul dim >= 16


def _pad_dim(n: int) -> int:
    return max(_MIN_DIM, 1 << (n - 1).bit_length())


def pick_block_q(nq: int, block_q: int = DEFAULT_BLOCK_Q) -> int | None:
    """Query tile the kernel would use for ``nq`` queries, or None when the kernel does not apply.

    ``block_q`` itself when it divides ``nq``; ``nq`` when it is a smaller power of two >= 16
    (e.g. the 8x8 = 64-pixel level of SD); otherwise None (the XLA path is used)."""
    if block_q <= 0:
        raise ValueError(f"block_q must be positive, got {block_q}")
    if nq % block_q == 0:
        return block_q
    if nq < block_q and nq >= _MIN_DIM and nq & (nq - 1) == 0:
        return nq
    return None


def _resolve_interpret(interpret: bool | None) -> bool:
    # interpret mode is the only way to run a Pallas kernel on CPU
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


def _masked_probs(q, k, scale: float, nk: int) -> jax.Array:
    """fp32 softmax(q kᵀ·scale) over the first ``nk`` (real) key columns of one tile."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = s * scale
    col = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(col < nk, s, -jnp.inf)  # padded keys get zero probability
    s = s - jnp.max(s, axis=1, keepdims=True)
    e = jnp.exp(s)
    return e / jnp.sum(e, axis=1, keepdims=True)


def _fwd_kernel(q_ref, k_ref, v_ref, m_ref, o_ref, t_ref, *, scale: float, nk: int):
    v = v_ref[0]
    p = _masked_probs(q_ref[0], k_ref[0], scale, nk)  # [bq, nkp] fp32, on-chip only
    o = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o_ref[0] = o.astype(o_ref.dtype)
    t_ref[0] = jnp.sum(p * m_ref[0], axis=1, keepdims=True)  # [bq, 1] fp32


def _bwd_kernel(q_ref, k_ref, v_ref, m_ref, do_ref, dt_ref, dq_ref, dk_ref, dv_ref, dm_ref,
                *, scale: float, nk: int, block_q: int, nq: int):
    k = k_ref[0]
    v = v_ref[0]
    m = m_ref[0]  # [1, nkp]

    def body(i, carry):
        dk, dv, dm = carry
        sl = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q = q_ref[0, sl, :]
        do = do_ref[0, sl, :]
        dt = dt_ref[0, sl, :]  # [bq, 1] fp32
        p = _masked_probs(q, k, scale, nk)
        # out = p v  ->  dv += pᵀ dout ; target = p·m  ->  dm += Σ_i dt_i p_i
        dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        dm = dm + jnp.sum(p * dt, axis=0, keepdims=True)
        # dp_ij = dout_i·v_j + dt_i·m_j ; softmax VJP: ds = p (dp - Σ_j p dp)
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        dp = dp + dt * m
        ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True)) * scale
        dq = jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
        dq_ref[0, sl, :] = dq.astype(dq_ref.dtype)
        dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        return dk, dv, dm

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
            jnp.zeros(m.shape, jnp.float32))
    dk, dv, dm = jax.lax.fori_loop(0, nq // block_q, body, init)
    dk_ref[0] = dk.astype(dk_ref.dtype)
    dv_ref[0] = dv.astype(dv_ref.dtype)
    dm_ref[0] = dm


def _fwd_call(qf, kf, vf, mf, scale, heads, nk, block_q, interpret):
    bh, nq, dp = qf.shape
    nkp, dvp = kf.shape[1], vf.shape[2]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, nk=nk),
        out_shape=(jax.ShapeDtypeStruct((bh, nq, dvp), vf.dtype),
                   jax.ShapeDtypeStruct((bh, nq, 1), jnp.float32)),
        grid=(bh, nq // block_q),
        in_specs=[
            pl.BlockSpec((1, block_q, dp), lambda b, i: (b, i, 0)),
            pl.BlockSpec((1, nkp, dp), lambda b, i: (b, 0, 0)),
            pl.BlockSpec((1, nkp, dvp), lambda b, i: (b, 0, 0)),
            pl.BlockSpec((1, 1, nkp), lambda b, i: (b // heads, 0, 0)),
        ],
        out_specs=(pl.BlockSpec((1, block_q, dvp), lambda b, i: (b, i, 0)),
                   pl.BlockSpec((1, block_q, 1), lambda b, i: (b, i, 0))),
        interpret=interpret,
        name="fused_cross_attention_fwd",
    )(qf, kf, vf, mf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _fused_core(qf, kf, vf, mf, scale, heads, nk, block_q, interpret):
    return _fwd_call(qf, kf, vf, mf, scale, heads, nk, block_q, interpret)


def _fused_core_fwd(qf, kf, vf, mf, scale, heads, nk, block_q, interpret):
    # residuals are the (padded) inputs only: no probability tensor is saved
    return _fwd_call(qf, kf, vf, mf, scale, heads, nk, block_q, interpret), (qf, kf, vf, mf)


def _fused_core_bwd(scale, heads, nk, block_q, interpret, res, cts):
    qf, kf, vf, mf = res
    do, dt = cts
    bh, nq, dp = qf.shape
    nkp, dvp = kf.shape[1], vf.shape[2]
    do = do.astype(vf.dtype)
    dt = dt.astype(jnp.float32)
    full = lambda *shape: pl.BlockSpec((1, *shape), lambda b: (b, 0, 0))  # noqa: E731
    dq, dk, dv, dm = pl.pallas_call(
        functools.partial(_bwd_kernel, scale=scale, nk=nk, block_q=block_q, nq=nq),
        out_shape=(jax.ShapeDtypeStruct(qf.shape, qf.dtype),
                   jax.ShapeDtypeStruct(kf.shape, kf.dtype),
                   jax.ShapeDtypeStruct(vf.shape, vf.dtype),
                   jax.ShapeDtypeStruct((bh, 1, nkp), jnp.float32)),
        grid=(bh,),
        in_specs=[
            full(nq, dp), full(nkp, dp), full(nkp, dvp),
            pl.BlockSpec((1, 1, nkp), lambda b: (b // heads, 0, 0)),
            full(nq, dvp), full(nq, 1),
        ],
        out_specs=(full(nq, dp), full(nkp, dp), full(nkp, dvp), full(1, nkp)),
        interpret=interpret,
        name="fused_cross_attention_bwd",
    )(qf, kf, vf, mf, do, dt)
    # the mask is shared by all heads of a batch row: sum their contributions
    dm = dm.reshape(-1, heads, 1, nkp).sum(axis=1).astype(mf.dtype)
    return dq, dk, dv, dm


_fused_core.defvjp(_fused_core_fwd, _fused_core_bwd)


def _check_shapes(q, k, v, target_mask) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q/k/v must be [B, heads, N, d]; got {q.shape}, {k.shape}, {v.shape}")
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(f"incompatible q/k/v shapes {q.shape}, {k.shape}, {v.shape}")
    if target_mask.shape != (b, k.shape[2]):
        raise ValueError(f"target_mask must be [B, Nk] = {(b, k.shape[2])}, got {target_mask.shape}")


def fused_cross_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    target_mask: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
) -> tuple[jax.Array, jax.Array]:
    """Pallas cross-attention returning (out [B, heads, Nq, dv] in v's dtype,
    target_prob [B, heads, Nq] fp32 = Σ_j target_mask_j · softmax(q kᵀ·scale)_j).

    Differentiable in q, k, v and target_mask (custom_vjp, Pallas backward). ``scale`` defaults
    to 1/sqrt(d). ``interpret=None`` runs the kernel in Pallas interpret mode on CPU. Raises
    ValueError when Nq cannot be tiled (see ``pick_block_q``); use
    ``cross_attention_with_target`` to fall back to XLA instead."""
    _check_shapes(q, k, v, target_mask)
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    bq = pick_block_q(nq, block_q)
    if bq is None:
        raise ValueError(f"Nq={nq} cannot be tiled with block_q={block_q}")
    scale = float(1.0 / math.sqrt(d) if scale is None else scale)
    dp, dvp, nkp = _pad_dim(d), _pad_dim(dv), _pad_dim(nk)
    qf = jnp.pad(q.reshape(b * h, nq, d), ((0, 0), (0, 0), (0, dp - d)))
    kf = jnp.pad(k.reshape(b * h, nk, d), ((0, 0), (0, nkp - nk), (0, dp - d)))
    vf = jnp.pad(v.reshape(b * h, nk, dv), ((0, 0), (0, nkp - nk), (0, dvp - dv)))
    mf = jnp.pad(target_mask.astype(jnp.float32), ((0, 0), (0, nkp - nk)))[:, None, :]
    out, tp = _fused_core(qf, kf, vf, mf, scale, h, nk, bq, _resolve_interpret(interpret))
    return out[..., :dv].reshape(b, h, nq, dv), tp.reshape(b, h, nq)


def xla_cross_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    target_mask: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
) -> tuple[jax.Array, jax.Array]:
    """Plain XLA reference with the same signature and outputs (``interpret``/``block_q`` are
    accepted and ignored). Materialises the [B, heads, Nq, Nk] fp32 probabilities."""
    del interpret, block_q
    _check_shapes(q, k, v, target_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v)
    tp = jnp.sum(p * target_mask.astype(jnp.float32)[:, None, None, :], axis=-1)
    return out, tp


def kernel_applies(nq: int, *, interpret: bool | None = None, block_q: int = DEFAULT_BLOCK_Q) -> bool:
    """Whether ``cross_attention_with_target`` will run the Pallas kernel: Nq tiles (see
    ``pick_block_q``) and either the backend is gpu/tpu or interpret mode was asked for
    explicitly (``interpret=None`` on CPU means XLA: interpret mode is a slow emulator)."""
    if pick_block_q(nq, block_q) is None:
        return False
    return interpret is True or jax.default_backend() in ("gpu", "tpu")


def cross_attention_with_target(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    target_mask: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
) -> tuple[jax.Array, jax.Array]:
    """(out, target_prob) via the fused kernel where ``kernel_applies`` else the XLA path."""
    fn = fused_cross_attention if kernel_applies(q.shape[2], interpret=interpret, block_q=block_q) \
        else xla_cross_attention
    return fn(q, k, v, target_mask, scale=scale, interpret=interpret, block_q=block_q)


def target_mask_from_tokens(probe_tokens: jax.Array, span_mask: jax.Array, nk: int) -> jax.Array:
    """Dense [B, nk] fp32 target mask from the ``probe_tokens`` [B, K] / span mask [B, K] pair the
    methods use, so that target_prob == ``methods.base.span_sum(probes, span_mask)``
    (a position probed twice counts twice, as in span_sum)."""
    b = probe_tokens.shape[0]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], probe_tokens.shape)
    return jnp.zeros((b, nk), jnp.float32).at[rows, probe_tokens].add(span_mask.astype(jnp.float32))
