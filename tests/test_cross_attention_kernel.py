"""Fused Pallas cross-attention (interpret mode on CPU) vs the plain XLA path.

Tolerances: fp32 values and gradients within 1e-5 relative to the reference's max magnitude
(measured ~5e-7); bf16 inputs within 2e-2 absolute on out / 1e-2 on target_prob (bf16 has an
8-bit mantissa; softmax and target_prob stay fp32 in both paths). ``layers.attention`` with a
``TargetMask`` and DUGE with ``attention_kernel="pallas"``: 1e-5 relative (see their sections).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxforget.kernels import (
    cross_attention_with_target,
    fused_cross_attention,
    kernel_applies,
    pick_block_q,
    target_mask_from_tokens,
    xla_cross_attention,
)
from jaxforget import schedulers as S
from jaxforget.errors import ConfigError
from jaxforget.methods import base as MB
from jaxforget.methods import duge
from jaxforget.methods.base import span_sum
from jaxforget.models.layers import TargetMask, attention
from test_methods_dfr_duge import jit, merge_states, world  # noqa: F401  (world: pytest fixture)

B, H, NQ, D = 2, 2, 64, 8
BLOCK_Q = 32  # two query blocks, so the tiling and the backward loop are exercised


def _inputs(nk: int, nq: int = NQ, dtype=jnp.float32, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = 2.0 * jax.random.normal(ks[0], (B, H, nq, D), dtype)  # peaky softmax, not near-uniform
    k = jax.random.normal(ks[1], (B, H, nk, D), dtype)
    v = jax.random.normal(ks[2], (B, H, nk, D), dtype)
    mask = (jax.random.uniform(ks[3], (B, nk)) < 0.3).astype(jnp.float32)
    return q, k, v, mask


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("nk", [77, 16])
def test_forward_fp32_matches_xla(nk):
    q, k, v, mask = _inputs(nk)
    fused = jax.jit(lambda *a: fused_cross_attention(*a, interpret=True, block_q=BLOCK_Q))
    out, tp = fused(q, k, v, mask)
    ref_out, ref_tp = xla_cross_attention(q, k, v, mask)
    assert out.shape == (B, H, NQ, D) and tp.shape == (B, H, NQ) and tp.dtype == jnp.float32
    assert _rel(out, ref_out) < 1e-5
    assert _rel(tp, ref_tp) < 1e-5
    # non-trivial map: some queries put real mass on the targets, none above 1
    assert float(tp.max()) > 0.2 and float(tp.max()) <= 1.0 + 1e-6


def test_forward_bf16_within_bf16_tolerance():
    q, k, v, mask = _inputs(77, dtype=jnp.bfloat16)
    out, tp = fused_cross_attention(q, k, v, mask, interpret=True, block_q=BLOCK_Q)
    assert out.dtype == jnp.bfloat16 and tp.dtype == jnp.float32
    ref_out, ref_tp = xla_cross_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
    assert float(jnp.abs(out.astype(jnp.float32) - ref_out).max()) < 2e-2
    assert float(jnp.abs(tp - ref_tp).max()) < 1e-2


def _loss(fn):
    # uses both outputs non-linearly so every cotangent path of the backward is exercised
    def loss(q, k, v, mask):
        out, tp = fn(q, k, v, mask, interpret=True, block_q=BLOCK_Q)
        return jnp.sum(jnp.sin(out) * out) + 3.0 * jnp.sum((tp - 0.1) ** 2)
    return loss


def test_gradients_match_xla():
    q, k, v, mask = _inputs(77, seed=1)
    grad = jax.jit(jax.grad(_loss(fused_cross_attention), argnums=(0, 1, 2, 3)))
    got = grad(q, k, v, mask)
    want = jax.grad(_loss(xla_cross_attention), argnums=(0, 1, 2, 3))(q, k, v, mask)
    for name, g, w in zip(("q", "k", "v", "mask"), got, want):
        assert g.shape == w.shape, name
        assert float(jnp.abs(w).max()) > 1e-3, name  # the reference gradient is not trivially 0
        assert _rel(g, w) < 1e-5, (name, _rel(g, w))


def _grad_jaxpr_stats(fn):
    """(pallas_call count, shapes of all non-kernel intermediates) of the jaxpr of grad(loss)."""
    q, k, v, mask = _inputs(77)
    jaxpr = jax.make_jaxpr(jax.grad(_loss(fn), argnums=(0, 1, 2)))(q, k, v, mask)
    shapes, n_pallas = [], 0

    def walk(jx):
        nonlocal n_pallas
        for eqn in jx.eqns:
            if eqn.primitive.name == "pallas_call":
                n_pallas += 1
                continue
            shapes.extend(tuple(getattr(o.aval, "shape", ())) for o in eqn.outvars)
            for p in eqn.params.values():  # pjit / custom_vjp bodies
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr.jaxpr)
    return n_pallas, shapes


def test_backward_never_materializes_probabilities():
    # outside the kernels no array of the value+grad computation spans both Nq and Nk(padded)
    has_probs = lambda shapes: [s for s in shapes if NQ in s and any(n in s for n in (77, 128))]  # noqa: E731
    n_pallas, shapes = _grad_jaxpr_stats(fused_cross_attention)
    assert n_pallas == 2  # forward + backward kernel
    assert len(shapes) > 5 and not has_probs(shapes), has_probs(shapes)
    # control: the check does see the XLA path's [B, H, Nq, Nk] probabilities
    n_pallas, shapes = _grad_jaxpr_stats(xla_cross_attention)
    assert n_pallas == 0 and (B, H, NQ, 77) in has_probs(shapes)


def test_dispatch_and_fallback():
    assert pick_block_q(64, 32) == 32 and pick_block_q(64, 128) == 64 and pick_block_q(48, 32) is None
    assert kernel_applies(64, interpret=True, block_q=32)
    assert not kernel_applies(48, interpret=True, block_q=32)  # non-divisible Nq -> XLA
    assert not kernel_applies(64, interpret=None, block_q=32)  # CPU without explicit interpret -> XLA

    def n_pallas(nq, interpret):
        q, k, v, mask = _inputs(77, nq=nq)
        f = lambda *a: cross_attention_with_target(*a, interpret=interpret, block_q=BLOCK_Q)  # noqa: E731
        return str(jax.make_jaxpr(f)(q, k, v, mask)).count("pallas_call")

    assert n_pallas(64, True) == 1
    assert n_pallas(48, True) == 0
    assert n_pallas(64, None) == 0

    q, k, v, mask = _inputs(77, nq=48)
    out, tp = jax.jit(lambda *a: cross_attention_with_target(*a, interpret=True, block_q=BLOCK_Q))(q, k, v, mask)
    ref_out, ref_tp = jax.jit(xla_cross_attention)(q, k, v, mask)  # same XLA program
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    np.testing.assert_array_equal(np.asarray(tp), np.asarray(ref_tp))
    with pytest.raises(ValueError):
        fused_cross_attention(q, k, v, mask, interpret=True, block_q=BLOCK_Q)


def test_matches_layers_attention_probes_span_sum():
    # the recommended wiring: [B, L, H*D] -> [B, H, L, D]; probe_tokens/span mask -> dense mask
    q, k, v, _ = _inputs(77, seed=2)
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(B, x.shape[2], H * D)  # noqa: E731
    probe_tokens = jnp.array([[3, 4, 5, 0], [10, 11, 0, 0]], jnp.int32)
    span = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
    ref_out, probes = attention(flat(q), flat(k), flat(v), H, probe_tokens=probe_tokens)
    out, tp = cross_attention_with_target(q, k, v, target_mask_from_tokens(probe_tokens, span, 77),
                                          interpret=True, block_q=BLOCK_Q)
    assert _rel(flat(out), ref_out) < 1e-5
    assert _rel(tp, span_sum(probes, span)) < 1e-5


# ----------------------------------------------------------------------------- layers.attention(TargetMask)
# Tolerance: 1e-5 relative to the reference's max magnitude, values and gradients (fp32; only
# summation order differs from the XLA int-probe path + span_sum).
POS = jnp.array([[3, 4, 5, 0], [10, 11, 10, 0]], jnp.int32)  # row 1 probes position 10 twice
SPAN = jnp.array([[1, 1, 1, 0], [1, 1, 1, 0]], jnp.float32)


def _count_pallas(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("pallas_call")


def _flat_inputs(nq: int, seed: int = 3):
    q, k, v, _ = _inputs(77, nq=nq, seed=seed)
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(B, x.shape[2], H * D)  # noqa: E731
    return flat(q), flat(k), flat(v)


@pytest.mark.parametrize("nq", [64, 48])  # 64: the Pallas kernel (interpret on CPU); 48: XLA fallback
def test_attention_target_mask_matches_probe_span_sum(nq):
    q, k, v = _flat_inputs(nq)
    tm = TargetMask.from_positions(POS, SPAN, 77)
    assert tm.weights.shape == (B, 77) and float(tm.weights[1, 10]) == 2.0

    def fused(q, k, v):
        return attention(q, k, v, H, probe_tokens=tm)

    def ref(q, k, v):
        out, probes = attention(q, k, v, H, probe_tokens=POS)
        return out, span_sum(probes, SPAN)[..., None]

    assert _count_pallas(fused, q, k, v) == (1 if nq == 64 else 0)
    (out, tp), (r_out, r_tp) = jax.jit(fused)(q, k, v), ref(q, k, v)
    assert tp.shape == (B, H, nq, 1) and tp.dtype == jnp.float32 and out.shape == (B, nq, H * D)
    assert float(r_tp.max()) > 0.2  # the targets get real mass
    errs = {"out": _rel(out, r_out), "probes": _rel(tp, r_tp)}

    def loss(fn):
        def f(q, k, v):
            o, p = fn(q, k, v)
            return jnp.sum(jnp.sin(o) * o) + 3.0 * jnp.sum((p - 0.1) ** 2)
        return f

    got = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    errs.update({f"d{n}": _rel(g, w) for n, g, w in zip("qkv", got, want)})
    assert all(float(jnp.abs(w).max()) > 1e-3 for w in want)
    assert max(errs.values()) < 1e-5, errs
    print(f"nq={nq}: max rel err {max(errs.values()):.2e}")


# ----------------------------------------------------------------------------- DUGE attention_kernel
# Tolerance: 1e-5 relative (loss and metrics; each gradient leaf relative to its max magnitude).
# The two paths differ only in fp32 summation order (measured ~1e-7 .. 1e-6).
DUGE_RTOL = 1e-5
NK_PROBS = (2, 2, 64, 7)  # [B, heads, HW, Nk] of the tiny UNet's cross-attention probabilities


def _shapes_in_jaxpr(closed) -> list[tuple[int, ...]]:
    shapes = []

    def walk(jx):
        for eqn in jx.eqns:
            shapes.extend(tuple(getattr(o.aval, "shape", ())) for o in eqn.outvars)
            for p in eqn.params.values():
                for inner in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = getattr(inner, "jaxpr", inner)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(closed.jaxpr)
    return shapes


def _duge_vg(w, kernel: str, remat: str = "none"):
    fn = MB.UNetFn(w["graphdef"], merge_states, remat=remat)
    m = duge.build(duge.Config(gamma=2.0, lambda_pr=0.5, attention_kernel=kernel), fn, S.make_schedule())
    return m, jax.value_and_grad(m.loss, argnums=0, has_aux=True)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_duge_pallas_matches_xla(world, remat):
    w = world
    args = (w["params"], w["frozen"], w["batch"], jax.random.PRNGKey(21))
    _, ref_vg = _duge_vg(w, "xla")
    _, vg = _duge_vg(w, "pallas", remat)
    if "ref" not in w["vg"]:  # shared by both parametrizations
        w["vg"]["ref"] = jit(ref_vg)(*args)
    (r_loss, r_met), r_grads = w["vg"]["ref"]
    (loss, met), grads = jit(vg)(*args)

    errs = {k: abs(float(met[k]) - float(r_met[k])) / abs(float(r_met[k])) for k in r_met}
    assert float(r_met["attn"]) > 0 and set(met) == set(r_met)
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    r_leaves = jax.tree.leaves(r_grads)
    assert len(leaves) == len(r_leaves)
    g_err = 0.0
    for (path, g), r in zip(leaves, r_leaves):
        assert g.shape == r.shape
        scale = float(jnp.abs(r).max())
        assert scale > 0, jax.tree_util.keystr(path)
        g_err = max(g_err, _rel(g, r))
    assert max(errs.values()) < DUGE_RTOL and g_err < DUGE_RTOL, (errs, g_err)
    print(f"remat={remat}: max rel err metrics {max(errs.values()):.2e}, grads {g_err:.2e}")

    # the fused path never builds a [B, heads, HW, Nk] tensor (forward or backward); XLA does
    jaxpr = jax.make_jaxpr(vg)(*args)
    shapes = _shapes_in_jaxpr(jaxpr)
    assert len(shapes) > 100 and NK_PROBS not in shapes
    text = str(jaxpr)
    # 4 attn2 layers x (student fwd + bwd, teacher fwd, prior-call fwd + bwd)
    # remat="full": the backward recomputes the 8 student forward kernels (remat really applies)
    assert text.count("pallas_call") == 20 + (8 if remat == "full" else 0)
    if remat == "none":
        assert NK_PROBS in _shapes_in_jaxpr(jax.make_jaxpr(ref_vg)(*args))


def test_duge_attention_kernel_config_errors(world):
    sch = S.make_schedule()
    for cfg in (duge.Config(attention_kernel="triton"),
                duge.Config(attn_mode="fmn", attention_kernel="pallas")):
        with pytest.raises(ConfigError, match="attention_kernel"):
            duge.build(cfg, world["unet_fn"], sch)
    duge.build(duge.Config(attention_kernel="pallas"), world["unet_fn"], sch)  # match + pallas is fine
    duge.build(duge.Config(attn_mode="fmn", attention_kernel="xla"), world["unet_fn"], sch)
