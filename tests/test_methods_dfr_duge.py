"""DFR and DUGE losses against a direct reference.

The reference applies the same tiny UNet through ``nnx.merge`` once per call (no UNetFn, no
method code), redraws (t, ε) with the documented key derivation (``k_u, k_p = split(rng)``, then
``k_t, k_n = split(k)`` as ``base.noisy``) and does the squared-error means / sums / masked sums in
numpy float64. Tolerance: relative 1e-5 (fp32 model outputs; only summation order differs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxforget import schedulers as S
from jaxforget.errors import ConfigError
from jaxforget.methods import base as B
from jaxforget.methods import dfr, duge
from jaxforget.models.unet import UNet2DConditionModel, UNetConfig

# TINY_SD-like, one resolution level to keep compile time low on busy CPUs; it still has four
# cross-attention layers: down_blocks.0 (1), mid_block (1), up_blocks.0 (2).
TINY = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}
BSZ, SEQ, DIM = 2, 7, 32
RTOL = 1e-5
# Test-only: XLA CPU compiles these programs several times faster without backend optimization;
# numerics are unchanged up to fp32 rounding (covered by RTOL).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(f):
    return jax.jit(f, compiler_options=FAST)


def merge_states(params: nnx.State, rest: nnx.State) -> nnx.State:
    """materialize for a path-filtered trainable subset: the union of the two States."""
    return nnx.merge_state(params, rest)


def _random_like(state: nnx.State, seed: int, scale: float = 1.0, delta: bool = False) -> nnx.State:
    """Fill an (abstract) state with numpy random values: fan-in scaled kernels, norm scales near
    1 (or, with delta, a perturbation of that size added to the given values). Initializing with
    numpy avoids compiling the UNet's initializers."""
    rs = np.random.default_rng(seed)
    pairs, tree = jax.tree_util.tree_flatten_with_path(state)
    out = []
    for path, x in pairs:
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            std = 1.0 / np.sqrt(np.prod(x.shape[:-1]))
        else:
            std = 0.1
        noise = rs.normal(0.0, scale * std, x.shape).astype(np.float32)
        if delta:
            out.append(x + noise)
        else:
            out.append(jnp.asarray(noise + (1.0 if "scale" in name else 0.0)))
    return jax.tree.unflatten(tree, out)


@pytest.fixture(scope="module")
def world():
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_diffusers(TINY), rngs=nnx.Rngs(0)))
    graphdef, params0, rest = nnx.split(abstract, nnx.PathContains("attn2"), ...)
    params0, rest = _random_like(params0, 0), _random_like(rest, 1)
    prev = merge_states(params0, rest)  # θ_{k-1}: the whole UNet
    params = _random_like(params0, 2, 0.1, delta=True)  # the student has moved away from θ_{k-1}
    base = _random_like(prev, 3, 0.05, delta=True)  # a different θ_0
    ks = jax.random.split(jax.random.PRNGKey(3), 8)
    batch = {
        "forget_ctx": jax.random.normal(ks[0], (BSZ, SEQ, DIM)),
        "mapped_ctx": jax.random.normal(ks[1], (BSZ, SEQ, DIM)),
        "retain_ctx": jax.random.normal(ks[2], (BSZ, SEQ, DIM)),
        "prior_ctx": jax.random.normal(ks[3], (BSZ, SEQ, DIM)),
        "forget_z0": jax.random.normal(ks[4], (BSZ, 8, 8, 4)),
        "mapped_z0": jax.random.normal(ks[5], (BSZ, 8, 8, 4)),
        "retain_z0": jax.random.normal(ks[6], (BSZ, 8, 8, 4)),
        "prior_z0": jax.random.normal(ks[7], (BSZ, 8, 8, 4)),
        # K = 3 probe slots; the last slot of row 0 is padding (mask 0) pointing at position 0
        "forget_pos": jnp.array([[2, 3, 0], [1, 4, 5]], jnp.int32),
        "forget_pos_mask": jnp.array([[1, 1, 0], [1, 1, 1]], jnp.float32),
        "mapped_pos": jnp.array([[2, 0, 0], [3, 4, 0]], jnp.int32),
        "mapped_pos_mask": jnp.array([[1, 0, 0], [1, 1, 0]], jnp.float32),
    }

    # the reference UNet call: nnx.merge + the module, one call per use (always probing, so one
    # compiled program serves every call)
    def apply(state, x, t, ctx, pos):
        out = nnx.merge(graphdef, state)(x, t, ctx, probe_tokens=pos)
        return out.sample, out.attn_probes

    return {
        "graphdef": graphdef, "params0": params0, "params": params, "rest": rest, "prev": prev,
        "base": base, "batch": batch, "unet_fn": B.UNetFn(graphdef, merge_states),
        "frozen": B.Frozen(rest=rest, prev=prev, base=base), "apply": jit(apply), "vg": {},
    }


def value_and_grads(w, m):
    """One compiled program per method: (loss, metrics) and grads wrt (params, frozen)."""
    key = (m.name, m.cfg, m.schedule)
    if key not in w["vg"]:
        w["vg"][key] = jit(jax.value_and_grad(m.loss, argnums=(0, 1), has_aux=True))
    return w["vg"][key]


# ----------------------------------------------------------------------------- reference
def ref_apply(w, state, x, t, ctx, pos=None):
    pos = w["batch"]["forget_pos"] if pos is None else pos
    sample, probes = w["apply"](state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), pos)
    return np.asarray(sample, np.float64), {k: np.asarray(v, np.float64) for k, v in probes.items()}


def ref_noisy(schedule, z0, key, t_max):
    k_t, k_n = jax.random.split(key)
    t = np.asarray(jax.random.randint(k_t, (z0.shape[0],), 0, t_max + 1, dtype=jnp.int32))
    eps = np.asarray(jax.random.normal(k_n, z0.shape, jnp.float32), np.float64)
    ac = np.asarray(schedule.alphas_cumprod, np.float64)[t][:, None, None, None]
    z = np.asarray(z0, np.float64)
    x = np.sqrt(ac) * z + np.sqrt(1 - ac) * eps
    target = eps if schedule.prediction_type == "epsilon" else np.sqrt(ac) * eps - np.sqrt(1 - ac) * z
    return x.astype(np.float32), t, target


def sqmean(a, b):
    return float(np.mean((a - b) ** 2))


def hand_reg(params, prev_params):
    return float(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
                     for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(prev_params))))


def _close(got, want, rtol=RTOL):
    got = float(got)
    assert abs(got - want) <= rtol * max(abs(want), 1e-12), (got, want, abs(got - want) / max(abs(want), 1e-12))


def _student(w):
    return merge_states(w["params"], w["rest"])


def _check_grads(w, m, g_params, g_frozen):
    # the gradient is a tree over the trainable subset only (the optimizer's state shape)
    assert jax.tree.structure(g_params) == jax.tree.structure(w["params"])
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(g_params)[0]}
    assert all(np.isfinite(x).all() for x in flat.values())
    assert all("attn2" in k for k in flat)
    assert any(np.abs(x).max() > 0 for k, x in flat.items() if "to_k" in k), m.name
    # sg on every teacher (ε_prev, its attention maps, θ_{k-1} in L_reg): frozen.prev gets nothing
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g_frozen.prev)) == 0.0, m.name


def _with_removed(w, seed, weights):
    """w's batch plus a random removed set (removed_ctx / z0) with per-item weights."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 2)
    return dict(w["batch"], removed_ctx=jax.random.normal(ks[0], (BSZ, SEQ, DIM)),
                removed_z0=jax.random.normal(ks[1], (BSZ, 8, 8, 4)),
                removed_w=jnp.array(weights, jnp.float32))


def _removed_per_item(w, sch, batch, rng):
    """Hand evaluation of L_rm's per-item terms: mean (ε_θ − ε_prev)² on the removed set, key fold_in(rng, 2)."""
    x, t, _ = ref_noisy(sch, batch["removed_z0"], jax.random.fold_in(rng, 2), 999)
    diff = (ref_apply(w, _student(w), x, t, batch["removed_ctx"])[0]
            - ref_apply(w, w["prev"], x, t, batch["removed_ctx"])[0])
    return np.mean(diff ** 2, axis=(1, 2, 3))


# ----------------------------------------------------------------------------- DFR
def test_dfr_terms_grads_reg_and_jit(world):
    w, sch = world, S.make_schedule()
    m = dfr.build(dfr.Config(), w["unet_fn"], sch)
    assert m.needs == B.DataNeeds(forget=True, retain=True) and not m.needs_base
    rng = jax.random.PRNGKey(11)
    (loss, met), (g_params, g_frozen) = value_and_grads(w, m)(w["params"], w["frozen"], w["batch"], rng)

    b, st = w["batch"], _student(w)
    k_u, k_p = jax.random.split(rng)
    x, t, _ = ref_noisy(sch, b["forget_z0"], k_u, 700)
    assert t.max() <= 700
    want_u = sqmean(ref_apply(w, st, x, t, b["forget_ctx"])[0], ref_apply(w, w["prev"], x, t, b["mapped_ctx"])[0])
    x, t, _ = ref_noisy(sch, b["retain_z0"], k_p, 999)
    want_p = sqmean(ref_apply(w, st, x, t, b["retain_ctx"])[0], ref_apply(w, w["prev"], x, t, b["retain_ctx"])[0])
    want_r = hand_reg(w["params"], w["params0"])
    assert min(want_u, want_p, want_r) > 0
    _close(met["unlearn"], want_u)
    _close(met["preserve"], want_p)
    _close(met["reg"], want_r)  # L_reg after a perturbation = the hand sum over attn2 elements
    _close(loss, 1.0 * want_u + 10.0 * want_p + 1e-4 * want_r)
    assert set(met) == {"loss", "unlearn", "preserve", "reg"}
    assert all(v.dtype == jnp.float32 and v.shape == () for v in met.values())
    _check_grads(w, m, g_params, g_frozen)

    # L_reg (and its gradient) is zero at θ = θ_{k-1}
    (_, met0), (g0, _) = value_and_grads(w, m)(w["params0"], w["frozen"], w["batch"], rng)
    assert float(met0["reg"]) == 0.0
    # d L_reg / dθ = 2 (θ − θ_{k-1}) on the trainable leaves (a small program: no UNet call)
    g_r = jax.grad(lambda p: dfr.param_sq_dist(merge_states(p, w["rest"]), w["prev"]))(w["params"])
    for gr, p, p0 in zip(jax.tree.leaves(g_r), jax.tree.leaves(w["params"]), jax.tree.leaves(w["params0"])):
        np.testing.assert_allclose(np.asarray(gr), 2 * (np.asarray(p) - np.asarray(p0)), rtol=1e-5, atol=1e-7)


def test_dfr_replay_mode_vpred_and_base_teacher(world):
    w, b, st = world, world["batch"], _student(world)
    sch = S.make_schedule(prediction_type="v_prediction")
    replay = dfr.build(dfr.Config(preserve_mode="replay"), w["unet_fn"], sch)
    teach = dfr.build(dfr.Config(teacher="base"), w["unet_fn"], sch)
    assert teach.needs_base and not replay.needs_base
    rng = jax.random.PRNGKey(12)
    met_replay, met_teach = jit(lambda p, f, bb, r: (replay.loss(p, f, bb, r)[1], teach.loss(p, f, bb, r)[1]))(
        w["params"], w["frozen"], b, rng)

    _, k_p = jax.random.split(rng)
    x, t, v = ref_noisy(sch, b["retain_z0"], k_p, 999)
    pred = ref_apply(w, st, x, t, b["retain_ctx"])[0]
    _close(met_replay["preserve"], sqmean(pred, v))  # v-prediction: the target is v, not ε
    _close(met_teach["preserve"], sqmean(pred, ref_apply(w, w["base"], x, t, b["retain_ctx"])[0]))


def test_dfr_removed_term_holds_earlier_removals(world):
    """dfr lambda_rm > 0: L_rm (base.removed_distill) on the removed set with key fold_in(rng, 2),
    weighted per item; unlearn / preserve / reg keep their draws; all-zero weights give 0."""
    w, sch = world, S.make_schedule()
    m = dfr.build(dfr.Config(lambda_rm=2.0), w["unet_fn"], sch)
    assert m.needs == B.DataNeeds(forget=True, retain=True, removed=True)
    batch = _with_removed(w, 6, [0.0, 1.0])
    rng = jax.random.PRNGKey(13)
    (loss, met), (g_params, g_frozen) = jit(jax.value_and_grad(m.loss, argnums=(0, 1), has_aux=True))(
        w["params"], w["frozen"], batch, rng)
    plain = dfr.build(dfr.Config(), w["unet_fn"], sch)
    _, met_plain = jit(lambda p, f, b, r: plain.loss(p, f, b, r))(w["params"], w["frozen"], batch, rng)

    per_item = _removed_per_item(w, sch, batch, rng)
    want_rm = float(per_item[1])  # item 0 has weight 0
    assert want_rm > 0 and abs(per_item[0] - want_rm) > 1e-3 * want_rm  # the weight matters
    for k in ("unlearn", "preserve", "reg"):
        _close(met[k], float(met_plain[k]))
    _close(met["removed"], want_rm)
    _close(loss, float(met_plain["loss"]) + 2.0 * want_rm)
    _check_grads(w, m, g_params, g_frozen)

    zero = dict(batch, removed_w=jnp.zeros(BSZ, jnp.float32))
    loss0, met0 = jit(lambda p, f, b, r: m.loss(p, f, b, r))(w["params"], w["frozen"], zero, rng)
    assert float(met0["removed"]) == 0.0
    _close(loss0, float(met_plain["loss"]))
    with pytest.raises(ConfigError, match="lambda_rm"):
        dfr.build(dfr.Config(lambda_rm=-1.0), w["unet_fn"], sch)


def test_dfr_config_is_validated(world):
    sch = S.make_schedule()
    for cfg in (dfr.Config(teacher="student"), dfr.Config(preserve_mode="x"), dfr.Config(unlearn_t_max=1000)):
        with pytest.raises(ConfigError):
            dfr.build(cfg, world["unet_fn"], sch)


def test_auto_anchor_picks_the_forget_prompt(world):
    w, sch = world, S.make_schedule()
    b = w["batch"]
    forget = {"ctx": b["forget_ctx"][:1]}  # F = 1 template
    cands = {"ctx": jnp.stack([b["mapped_ctx"][:1], b["forget_ctx"][:1], b["retain_ctx"][:1]])}  # [C=3,F=1,S,D]
    pick = jit(lambda st, fc, cc, z, r: dfr.auto_anchor(w["unet_fn"], st, sch, fc, cc, z, r, n=4))
    idx, d = pick(w["prev"], forget, cands, b["forget_z0"], jax.random.PRNGKey(5))
    assert d.shape == (3,) and d.dtype == jnp.float32
    assert int(idx) == 1, np.asarray(d)
    assert float(d[1]) < 1e-6 * float(jnp.min(d[jnp.array([0, 2])]))


@dataclasses.dataclass(frozen=True)
class RecordingFn(B.UNetFn):
    """A stand-in UNetFn that records the conditioning it is given (SDXL wiring check)."""

    calls: list = dataclasses.field(default_factory=list)

    def __call__(self, state, x_t, t, ctx, *, pooled=None, time_ids=None, probe_tokens=None):
        self.calls.append((ctx, pooled, time_ids))
        w = sum(jnp.sum(x) for x in jax.tree.leaves(state))
        out = x_t * w + jnp.mean(ctx) + jnp.mean(pooled) + jnp.mean(time_ids)
        probes = {} if probe_tokens is None else {
            "mid_block.attn2": jnp.ones((x_t.shape[0], 1, 4, probe_tokens.shape[1])) * w}
        return out, probes


def test_sdxl_conditioning_wiring_and_general_reg_path():
    """Traced only (jax.eval_shape: nothing compiles): every UNet call gets its own set's pooled
    embedding and the batch's time_ids."""
    graphdef, params0, rest = nnx.split(
        nnx.Dict(attn2=nnx.Linear(2, 2, rngs=nnx.Rngs(0)), other=nnx.Linear(2, 2, rngs=nnx.Rngs(1))),
        nnx.PathContains("attn2"), ...)
    prev = merge_states(params0, rest)
    params = _random_like(params0, 4, 0.1, delta=True)
    frozen = B.Frozen(rest=rest, prev=prev)
    sets = ("forget", "mapped", "retain", "prior")
    batch = {f"{s}_{k}": jax.ShapeDtypeStruct(shape, jnp.float32)
             for s in sets for k, shape in (("ctx", (BSZ, 3, 4)), ("pooled", (BSZ, 5)), ("z0", (BSZ, 2, 2, 4)))}
    batch.update(time_ids=jax.ShapeDtypeStruct((BSZ, 6), jnp.float32),
                 forget_pos=jax.ShapeDtypeStruct((BSZ, 2), jnp.int32),
                 forget_pos_mask=jax.ShapeDtypeStruct((BSZ, 2), jnp.float32),
                 mapped_pos=jax.ShapeDtypeStruct((BSZ, 2), jnp.int32),
                 mapped_pos_mask=jax.ShapeDtypeStruct((BSZ, 2), jnp.float32))
    sch = S.make_schedule()
    for mod, n_calls in ((dfr, 4), (duge, 3)):
        fn = RecordingFn(graphdef, merge_states)
        method = mod.build(mod.Config(), fn, sch)

        def check(b):
            out = method.loss(params, frozen, b, jax.random.PRNGKey(0))
            assert len(fn.calls) == n_calls
            for ctx, pooled, time_ids in fn.calls:
                (prefix,) = [s for s in sets if ctx is b[f"{s}_ctx"]]
                assert pooled is b[f"{prefix}_pooled"] and time_ids is b["time_ids"], prefix
            return out

        jax.eval_shape(check, batch)

    fn = RecordingFn(graphdef, merge_states)
    forget = {"ctx": batch["forget_ctx"], "pooled": batch["forget_pooled"],
              "time_ids": jax.ShapeDtypeStruct((1, 6), jnp.float32)}
    cands = {"ctx": jax.ShapeDtypeStruct((3, BSZ, 3, 4), jnp.float32),  # [C=3, F=2, S, D]
             "pooled": jax.ShapeDtypeStruct((3, BSZ, 5), jnp.float32)}
    idx, d = jax.eval_shape(lambda f_, c_, z: dfr.auto_anchor(fn, prev, sch, f_, c_, z, jax.random.PRNGKey(1), n=7),
                            forget, cands, batch["forget_z0"])
    assert idx.shape == () and d.shape == (3,)
    assert len(fn.calls) == 2  # the forget prompt, then the candidate body of lax.map
    assert all(c.shape == (7, 3, 4) and p.shape == (7, 5) and ti.shape == (7, 6) for c, p, ti in fn.calls)

    # L_reg: the general path (every leaf of the materialized student vs θ_{k-1}) and the path
    # that skips leaves passed through from frozen.rest both give the hand sum over attn2
    student = merge_states(params, rest)
    want = hand_reg(params, params0)
    _close(dfr.param_sq_dist(student, prev), want)
    _close(dfr.param_sq_dist(student, prev, rest), want)
    assert float(dfr.param_sq_dist(merge_states(params0, rest), prev, rest)) == 0.0


# ----------------------------------------------------------------------------- DUGE
def _duge_ref(w, sch, rng, layers, mode, x_source="mapped"):
    b, st = w["batch"], _student(w)
    k_u, k_pr = jax.random.split(rng)
    x, t, _ = ref_noisy(sch, b[f"{x_source}_z0"], k_u, 999)
    es, ps = ref_apply(w, st, x, t, b["forget_ctx"], b["forget_pos"])
    ep, pp = ref_apply(w, w["prev"], x, t, b["mapped_ctx"], b["mapped_pos"])
    fm, mm = np.asarray(b["forget_pos_mask"]), np.asarray(b["mapped_pos_mask"])
    assert set(layers) <= set(ps)
    if mode == "match":
        attn = sum(sqmean(np.einsum("bhpk,bk->bhp", ps[k], fm), np.einsum("bhpk,bk->bhp", pp[k], mm))
                   for k in layers)
    else:
        attn = float(np.sqrt(sum(np.sum((ps[k] * fm[:, None, None, :]) ** 2) for k in layers)))
    x, t, target = ref_noisy(sch, b["prior_z0"], k_pr, 999)
    prior = sqmean(ref_apply(w, st, x, t, b["prior_ctx"])[0], target)
    return {"eps": sqmean(es, ep), "attn": attn, "prior": prior}


def test_duge_match_terms_and_grads(world):
    w, sch = world, S.make_schedule()
    m = duge.build(duge.Config(gamma=2.0, lambda_pr=0.5), w["unet_fn"], sch)
    assert m.needs == B.DataNeeds(mapped=True, prior=True, token_positions=True) and not m.needs_base
    rng = jax.random.PRNGKey(21)
    (loss, met), (g_params, g_frozen) = value_and_grads(w, m)(w["params"], w["frozen"], w["batch"], rng)
    layers = sorted(ref_apply(w, w["prev"], np.zeros((BSZ, 8, 8, 4), np.float32), np.ones(BSZ, np.int32),
                              w["batch"]["forget_ctx"])[1])
    assert len(layers) == 4, layers  # down 1 + mid 1 + up 2 cross-attention layers
    want = _duge_ref(w, sch, rng, layers, "match")
    assert min(want.values()) > 0
    for k in ("eps", "attn", "prior"):
        _close(met[k], want[k])
    _close(met["unlearn"], want["eps"] + 2.0 * want["attn"])
    _close(loss, want["eps"] + 2.0 * want["attn"] + 0.5 * want["prior"])
    assert set(met) == {"loss", "unlearn", "eps", "attn", "prior"}
    assert all(v.dtype == jnp.float32 and v.shape == () for v in met.values())
    _check_grads(w, m, g_params, g_frozen)


def test_duge_fmn_mode_layer_regex_vpred(world):
    w = world
    sch = S.make_schedule(prediction_type="v_prediction")
    m = duge.build(duge.Config(attn_mode="fmn", layers=r"^up_blocks\."), w["unet_fn"], sch)
    rng = jax.random.PRNGKey(22)
    loss, met = jit(lambda p, f, b, r: m.loss(p, f, b, r))(w["params"], w["frozen"], w["batch"], rng)
    layers = ["up_blocks.0.attentions.0.transformer_blocks.0.attn2",
              "up_blocks.0.attentions.1.transformer_blocks.0.attn2"]
    want = _duge_ref(w, sch, rng, layers, "fmn")
    for k in ("eps", "attn", "prior"):
        _close(met[k], want[k])
    _close(loss, want["eps"] + want["attn"] + want["prior"])


def test_duge_x_source_forget_noises_the_target_images(world):
    w, sch = world, S.make_schedule()
    m = duge.build(duge.Config(x_source="forget"), w["unet_fn"], sch)
    assert m.needs == B.DataNeeds(mapped=True, prior=True, token_positions=True, forget=True)
    rng = jax.random.PRNGKey(23)
    loss, met = jit(lambda p, f, b, r: m.loss(p, f, b, r))(w["params"], w["frozen"], w["batch"], rng)
    layers = sorted(ref_apply(w, w["prev"], np.zeros((BSZ, 8, 8, 4), np.float32), np.ones(BSZ, np.int32),
                              w["batch"]["forget_ctx"])[1])
    want = _duge_ref(w, sch, rng, layers, "match", x_source="forget")
    mapped = _duge_ref(w, sch, rng, layers, "match")
    assert abs(want["eps"] - mapped["eps"]) > 1e-3 * mapped["eps"]  # the source matters
    for k in ("eps", "attn", "prior"):
        _close(met[k], want[k])
    _close(loss, want["eps"] + want["attn"] + want["prior"])


def test_duge_removed_term_holds_earlier_removals(world):
    """lambda_rm > 0: L_rm = Σ w_b·mean_b (ε_θ − sg ε_prev)² / max(Σ w, 1) on the removed set, with
    key fold_in(rng, 2); the other terms keep their keys; all-zero weights give 0."""
    w, sch = world, S.make_schedule()
    m = duge.build(duge.Config(lambda_rm=3.0), w["unet_fn"], sch)
    assert m.needs == B.DataNeeds(mapped=True, prior=True, token_positions=True, removed=True)
    batch = _with_removed(w, 5, [1.0, 0.0])
    rng = jax.random.PRNGKey(24)
    (loss, met), (g_params, g_frozen) = jit(jax.value_and_grad(m.loss, argnums=(0, 1), has_aux=True))(
        w["params"], w["frozen"], batch, rng)
    per_item = _removed_per_item(w, sch, batch, rng)
    want_rm = float(per_item[0])  # item 1 has weight 0
    assert want_rm > 0 and abs(per_item[1] - want_rm) > 1e-3 * want_rm  # the weight matters
    layers = sorted(ref_apply(w, w["prev"], np.zeros((BSZ, 8, 8, 4), np.float32), np.ones(BSZ, np.int32),
                              w["batch"]["forget_ctx"])[1])
    want = _duge_ref(w, sch, rng, layers, "match")
    for k in ("eps", "attn", "prior"):
        _close(met[k], want[k])
    _close(met["removed"], want_rm)
    _close(loss, want["eps"] + want["attn"] + want["prior"] + 3.0 * want_rm)
    _check_grads(w, m, g_params, g_frozen)

    # the first request has nothing removed: zero weights, zero term, the loss of lambda_rm = 0
    zero = dict(batch, removed_w=jnp.zeros(BSZ, jnp.float32))
    loss0, met0 = jit(lambda p, f, b, r: m.loss(p, f, b, r))(w["params"], w["frozen"], zero, rng)
    assert float(met0["removed"]) == 0.0
    _close(loss0, want["eps"] + want["attn"] + want["prior"])
    with pytest.raises(ConfigError, match="lambda_rm"):
        duge.build(duge.Config(lambda_rm=-1.0), w["unet_fn"], sch)


def test_duge_config_is_validated(world):
    sch = S.make_schedule()
    for cfg in (duge.Config(attn_mode="x"), duge.Config(layers="("), duge.Config(t_max=1000),
                duge.Config(x_source="prior")):
        with pytest.raises(ConfigError):
            duge.build(cfg, world["unet_fn"], sch)
    with pytest.raises(ConfigError, match="matches none"):
        duge.select_layers(["mid_block.attentions.0.transformer_blocks.0.attn2"], "down")
    assert duge.select_layers(["b.attn2", "a.attn2"], "") == ["a.attn2", "b.attn2"]
