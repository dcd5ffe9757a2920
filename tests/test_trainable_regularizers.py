"""Trainable-parameter selection (presets, regex, LoRA) and the method-agnostic regularizers
(L1/L2 penalties, EWC Fisher, gradient projection, TIES merging) on a tiny UNet.

Tolerances: exact equality where nothing is computed (split/merge round trips, LoRA at init);
fp32 relative error <= 1e-5 against numpy float64 references (penalties, LoRA kernels,
projection) and against an independent per-example-gradient Fisher.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxforget import schedulers as S
from jaxforget.errors import ConfigError
from jaxforget.methods import regularizers as R
from jaxforget.methods import trainable as T
from jaxforget.methods.base import Frozen, UNetFn
from jaxforget.models.unet import UNet2DConditionModel, UNetConfig

TOL = 1e-5

# a micro UNet (one cross-attention level, no mid block): every code path, fast to compile.
# 122 leaves; 3 transformer blocks (down 0, up 0 x2), each attn2 with to_q/to_k/to_v kernels +
# to_out.0 kernel/bias (5 leaves); time_embedding 4, conv_norm_out 2, conv_out 2 leaves
MICRO_SD = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [16],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"],
    "mid_block_type": None,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}
N_LEAVES, N_ATTN2, N_KV, N_EMB_OUT, N_BLOCKS = 122, 15, 6, 8, 3
KV0 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.kernel"


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _dot(path):
    return ".".join(map(str, path))


def _flat(state):
    return {_dot(p): v[...] for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def tiny():
    cfg = UNetConfig.from_diffusers(MICRO_SD)
    build = lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    # one jitted init (persistently cached) instead of ~100 eager random-init dispatches
    graphdef = nnx.graphdef(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.state(build()))()
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    inputs = (jax.random.normal(k1, (2, 8, 8, 4)), jnp.array([10, 700]), jax.random.normal(k2, (2, 5, 32)))
    fwd = jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c).sample)
    return graphdef, state, inputs, fwd


# ----------------------------------------------------------------------------- trainable
def test_presets_select_expected_paths(tiny):
    _, state, _, _ = tiny
    counts = {}
    for name in T.PRESETS:
        tr = T.split_trainable(state, T.Config(filter=name))
        counts[name] = len(tr.trainable_paths)
        assert tr.trainable_paths == tuple(sorted(tr.trainable_paths))
        assert len(_flat(tr.params)) + len(_flat(tr.rest)) == N_LEAVES
        assert tr.count == sum(int(np.prod(v.shape)) for v in _flat(tr.params).values())
    assert counts == {"all": N_LEAVES, "attn2": N_ATTN2, "attn2_kv": N_KV,
                      "non_attn2": N_LEAVES - N_ATTN2 - N_EMB_OUT, "non_attn2_all": N_LEAVES - N_ATTN2}

    x = T.split_trainable(state, T.Config(filter="attn2")).trainable_paths
    assert KV0 in x and "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0.bias" in x
    assert all(".attn2." in p for p in x)
    kv = T.split_trainable(state, T.Config(filter="attn2_kv")).trainable_paths
    assert {p.split(".attn2.")[1] for p in kv} == {"to_k.kernel", "to_v.kernel"}
    u = T.split_trainable(state, T.Config(filter="non_attn2")).trainable_paths
    assert not any(".attn2." in p or p.startswith(("time_embedding.", "conv_out.", "conv_norm_out."))
                   for p in u)
    # resnets' time_emb_proj, conv_in and the self-attention stay trainable (as in ESD-u)
    assert "down_blocks.0.resnets.0.time_emb_proj.kernel" in u and "conv_in.kernel" in u
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.kernel" in u
    u_all = T.split_trainable(state, T.Config(filter="non_attn2_all")).trainable_paths
    assert "time_embedding.linear_1.kernel" in u_all and "conv_out.kernel" in u_all
    # a regex is searched in the dotted path
    rx = T.split_trainable(state, T.Config(filter=r"attn2\.to_k\.kernel$")).trainable_paths
    assert len(rx) == N_BLOCKS and all(p.endswith("attn2.to_k.kernel") for p in rx)


def test_filter_matching_nothing_is_a_config_error(tiny):
    _, state, _, _ = tiny
    with pytest.raises(ConfigError, match="no_such_layer") as err:
        T.split_trainable(state, T.Config(filter="no_such_layer"))
    assert "down_blocks" in str(err.value) or "up_blocks" in str(err.value)  # example paths shown
    with pytest.raises(ConfigError, match="lora_targets.*'conv_in'"):  # conv kernels are 4-D
        T.split_trainable(state, T.Config(lora_rank=2, lora_targets="conv_in"))
    with pytest.raises(ConfigError, match="regex"):
        T.Config(filter="attn2[")
    with pytest.raises(ConfigError):
        T.Config(lora_rank=-1)


def test_materialize_reproduces_state_exactly(tiny):
    graphdef, state, inputs, fwd = tiny
    ref = _flat(state)
    for name in ("attn2", "non_attn2", "all"):
        tr = T.split_trainable(state, T.Config(filter=name))
        full = jax.jit(tr.materialize)(tr.params, tr.rest)
        assert jax.tree.structure(full) == jax.tree.structure(state)
        got = _flat(full)
        assert got.keys() == ref.keys()
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
        assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(full))
    np.testing.assert_array_equal(fwd(full, *inputs), fwd(state, *inputs))


def test_lora_init_is_identity_then_matches_hand_computed_update(tiny):
    graphdef, state, inputs, fwd = tiny
    cfg = T.Config(lora_rank=2, lora_alpha=3.0)  # targets = filter = attn2 -> 4 kernels per block
    tr = T.split_trainable(state, cfg, rng=jax.random.PRNGKey(7))
    assert len(tr.trainable_paths) == 4 * N_BLOCKS and KV0 in tr.trainable_paths
    factors = _flat(tr.params)
    assert KV0 + ".lora_a" in factors and factors[KV0 + ".lora_a"].shape == (32, 2)
    assert factors[KV0 + ".lora_b"].shape == (2, 16)
    assert tr.count == sum(int(np.prod(v.shape)) for v in factors.values())
    assert not np.any(np.asarray(factors[KV0 + ".lora_b"]))
    np.testing.assert_array_equal(fwd(tr.materialize(tr.params, tr.rest), *inputs), fwd(state, *inputs))

    # B != 0: every adapted kernel is W + (alpha / r) A @ B (scale 1.5), everything else untouched
    bumped = jax.tree.map(lambda v: v + 0.1, tr.params)
    full = jax.jit(tr.materialize)(bumped, tr.rest)
    got, ref, fac = _flat(full), _flat(state), _flat(bumped)
    expect = dict(ref)
    for k in tr.trainable_paths:
        a = np.asarray(fac[k + ".lora_a"], np.float64)
        b = np.asarray(fac[k + ".lora_b"], np.float64)
        expect[k] = np.asarray(ref[k], np.float64) + 1.5 * a @ b
        assert _rel(got[k], expect[k]) <= TOL
    assert all(np.array_equal(got[k], ref[k]) for k in ref if k not in tr.trainable_paths)
    hand = nnx.from_flat_state([(p, v.replace(jnp.asarray(expect[_dot(p)], jnp.float32)))
                                for p, v in nnx.to_flat_state(state)])
    assert _rel(fwd(full, *inputs), fwd(hand, *inputs)) <= TOL
    assert _rel(fwd(T.merge_lora(bumped, tr.rest, cfg), *inputs), fwd(hand, *inputs)) <= TOL

    kv = T.split_trainable(state, T.Config(lora_rank=4, lora_targets="attn2_kv"))
    assert len(kv.trainable_paths) == N_KV


# ----------------------------------------------------------------------------- penalties
def _perturbed(state, paths, seed, scale=0.01):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), N_LEAVES))
    return nnx.from_flat_state([
        (p, v.replace(v[...] + scale * jax.random.normal(next(keys), v.shape)) if _dot(p) in paths else v)
        for p, v in nnx.to_flat_state(state)])


def test_penalties_match_numpy(tiny):
    _, prev, _, _ = tiny
    paths = T.split_trainable(prev, T.Config(filter="attn2")).trainable_paths
    student = _perturbed(prev, paths, 1)
    base = _perturbed(prev, paths, 2)
    fisher = nnx.from_flat_state([(p, v.replace(jnp.abs(jax.random.normal(jax.random.PRNGKey(i), v.shape))))
                                  for i, (p, v) in enumerate(nnx.to_flat_state(prev)) if _dot(p) in paths])
    frozen = Frozen(rest=None, prev=prev, base=base, reg=fisher)
    s, pv, bs, fs = _flat(student), _flat(prev), _flat(base), _flat(fisher)
    d_prev = np.concatenate([(np.float64(s[k]) - pv[k]).ravel() for k in paths])
    d_base = np.concatenate([(np.float64(s[k]) - bs[k]).ravel() for k in paths])
    f = np.concatenate([np.float64(fs[k]).ravel() for k in paths])
    refs = {"l1_prev": np.abs(d_prev).mean(), "l2_prev": np.square(d_prev).mean(),
            "l2_base": np.square(d_base).mean(), "ewc": np.sum(f * np.square(d_prev))}
    for kind, ref in refs.items():
        cfg = R.Config(kind=kind, weight=2.0)
        value, metrics = jax.jit(lambda st, fr: R.penalty(cfg, st, fr, paths))(student, frozen)
        assert _rel(value, 2.0 * ref) <= TOL, kind
        assert _rel(metrics["reg_raw"], ref) <= TOL, kind
    # the trained leaves alone (paths=None) give the same value
    only = nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(student) if _dot(p) in paths])
    value, _ = R.penalty(R.Config(kind="l2_prev", weight=1.0), only, frozen)
    assert _rel(value, refs["l2_prev"]) <= TOL
    value, _ = R.penalty(R.Config(kind="ewc", weight=1.0), only, frozen)
    assert _rel(value, refs["ewc"]) <= TOL
    assert float(R.penalty(R.Config(), student, frozen, paths)[0]) == 0.0
    with pytest.raises(ConfigError, match="base"):
        R.penalty(R.Config(kind="l2_base", weight=1.0), student, frozen._replace(base=None), paths)
    with pytest.raises(ConfigError, match="kind"):
        R.Config(kind="l3")


# ----------------------------------------------------------------------------- Fisher
def test_fisher_equals_per_example_gradient_reference(tiny):
    graphdef, state, _, _ = tiny
    schedule = S.make_schedule()
    z0 = jax.random.normal(jax.random.PRNGKey(11), (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.PRNGKey(12), (2, 5, 32))
    paths = T.split_trainable(state, T.Config(filter="attn2_kv")).trainable_paths
    rng = jax.random.PRNGKey(5)
    unet_fn = UNetFn(graphdef, T.Materializer(T.Config()))
    fisher = R.fisher_diagonal(unet_fn, state, schedule, z0, ctx, rng, 2, paths=paths)
    assert set(_flat(fisher)) == set(paths)

    # reference: gradient of each example's loss w.r.t. the WHOLE state via the module itself
    idx, t, eps = R.fisher_draws(schedule, rng, 2, 2, z0.shape[1:])
    ac = np.asarray(schedule.alphas_cumprod, np.float64)

    @jax.jit
    def example_grad(st, x_t, t1, c1, e1):  # one example's loss via the module itself
        return jax.grad(lambda s_: jnp.mean(jnp.square(nnx.merge(graphdef, s_)(
            x_t[None], t1[None], c1[None]).sample - e1[None])))(st)

    assert list(np.asarray(idx)) == [0, 1]
    grads = []
    for i in range(2):
        ti = int(t[i])
        x_t = np.sqrt(ac[ti]) * np.float64(z0[i]) + np.sqrt(1 - ac[ti]) * np.float64(eps[i])
        grads.append(_flat(example_grad(state, jnp.asarray(x_t, jnp.float32), t[i], ctx[i], eps[i])))
    got = _flat(fisher)
    for k in paths:
        ref = (np.square(np.float64(grads[0][k])) + np.square(np.float64(grads[1][k]))) / 2
        assert _rel(got[k], ref) <= 1e-4, k  # fp32 gradients, squared


def test_update_fisher_normalizes_to_mean_one():
    mk = lambda **kw: nnx.from_flat_state({(k,): nnx.Param(jnp.asarray(v, jnp.float32)) for k, v in kw.items()})
    new = mk(a=[1.0, 3.0], b=[4.0, 0.0])  # mean 2
    f1 = _flat(R.update_fisher(None, new, 0.5))
    np.testing.assert_allclose(np.concatenate([f1["a"], f1["b"]]), [0.5, 1.5, 2.0, 0.0], rtol=1e-6)
    prev = mk(a=[2.0, 0.0], c=[1.0, 1.0])  # path b new, path c only in prev
    f2 = _flat(R.update_fisher(prev, new, 0.5))
    # γ·prev + normalize(new) = a [1.5, 1.5], b [2, 0], c [.5, .5]; mean 1.0 -> unchanged
    np.testing.assert_allclose(f2["a"], [1.5, 1.5], rtol=1e-6)
    np.testing.assert_allclose(f2["b"], [2.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(f2["c"], [0.5, 0.5], rtol=1e-6)
    f3 = _flat(R.update_fisher(mk(a=[3.0, 3.0], b=[3.0, 3.0]), new, 1.0))
    np.testing.assert_allclose(np.mean(np.concatenate(list(f3.values()))), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- projection
def test_projection_matrix_matches_formula_and_annihilates_c():
    c = np.random.default_rng(0).normal(size=(3, 32))
    p = np.asarray(R.projection_matrix(jnp.asarray(c, jnp.float32), 1e-3), np.float64)
    ref = np.eye(32) - c.T @ np.linalg.solve(c @ c.T + 1e-3 * np.eye(3), c)  # methods.md, C' = cᵀ
    assert np.abs(p - ref).max() <= TOL
    assert np.abs(p - p.T).max() <= TOL
    g = np.random.default_rng(1).normal(size=(32, 16))
    assert np.abs(c @ p @ g).max() <= 1e-4 * np.abs(c @ g).max()


def test_projected_sgd_and_adam_steps_keep_kv_of_protected_embeddings(tiny):
    graphdef, state, _, _ = tiny
    c = jax.random.normal(jax.random.PRNGKey(21), (4, 32))  # protected text embeddings [n, D]
    p = R.projection_matrix(c, 1e-3)
    tr = T.split_trainable(state, T.Config(filter="attn2"))
    # the projection is linear and leaf-local: random gradients exercise it fully
    keys = iter(jax.random.split(jax.random.PRNGKey(22), N_ATTN2))
    grads = jax.tree.map(lambda w: jax.random.normal(next(keys), w.shape), tr.params)
    proj = _flat(R.project_gradients(grads, p))
    raw, before = _flat(grads), _flat(tr.params)
    kv = [k for k in raw if k.endswith(("attn2.to_k.kernel", "attn2.to_v.kernel"))]
    assert len(kv) == N_KV
    for k in raw:
        if k not in kv:
            assert np.array_equal(proj[k], raw[k])  # to_q / to_out untouched
    lr = 10.0
    for k in kv:
        old = np.asarray(c) @ np.float64(before[k])  # keys / values of the protected embeddings
        new = np.asarray(c) @ (np.float64(before[k]) - lr * np.float64(proj[k]))
        moved = np.asarray(c) @ (np.float64(before[k]) - lr * np.float64(raw[k]))
        assert np.abs(new - old).max() <= 1e-4 * np.abs(moved - old).max(), k
    # through the UNet layers themselves: to_k(c) / to_v(c) stay put after the projected SGD step
    def layers(g):
        params = jax.tree.map(lambda w, gi: w - lr * gi, tr.params, g)
        unet = nnx.merge(graphdef, tr.materialize(params, tr.rest))
        return [a.attn2 for u in unet.down_blocks[0].attentions for a in u.transformer_blocks]
    old_l, proj_l, raw_l = layers(jax.tree.map(jnp.zeros_like, grads)), layers(R.project_gradients(grads, p)), layers(grads)
    for a0, a1, a2 in zip(old_l, proj_l, raw_l):
        for name in ("to_k", "to_v"):
            o, n, m = (getattr(a, name)(c) for a in (a0, a1, a2))
            assert np.abs(n - o).max() <= 1e-4 * np.abs(m - o).max()

    # Adam + projection of the updates (chained last): exactly orthogonal as well
    opt = optax.chain(optax.adam(1e-2), R.project_updates(p))
    updates, _ = opt.update(grads, opt.init(tr.params), tr.params)
    up = _flat(updates)
    plain = _flat(optax.adam(1e-2).update(grads, optax.adam(1e-2).init(tr.params), tr.params)[0])
    for k in kv:
        assert np.abs(np.asarray(c) @ np.float64(up[k])).max() <= 1e-4 * np.abs(np.asarray(c) @ plain[k]).max()

    with pytest.raises(ConfigError, match="LoRA"):
        lora = T.split_trainable(state, T.Config(lora_rank=2))
        R.project_gradients(lora.params, p)
    with pytest.raises(ConfigError, match="no attn2"):
        R.project_gradients(T.split_trainable(state, T.Config(filter="non_attn2")).params, p)


# ----------------------------------------------------------------------------- TIES
def test_ties_merge_on_hand_made_vectors():
    mk = lambda **kw: nnx.from_flat_state({(k,): nnx.Param(jnp.asarray(v, jnp.float32)) for k, v in kw.items()})
    base = mk(a=[10.0, 10.0, 10.0], b=[0.0, 0.0, 0.0], c=[7.0])
    # density 0.5 of 6 elements keeps 3 per delta, ranked across both leaves together
    d1 = mk(a=[1.0, -2.0, 0.1], b=[3.0, -0.2, 0.5])  # trimmed: a [1, -2, 0], b [3, 0, 0]
    d2 = mk(a=[-3.0, -1.0, 0.3], b=[2.0, 4.0, 0.05])  # trimmed: a [-3, 0, 0], b [2, 4, 0]
    # elected signs: sum a [-2, -2, 0], b [5, 4, 0] -> [-, -, 0 -> majority], [+, +, 0]
    # disjoint means: a [-3, -2, 0], b [2.5, 4, 0]
    out = _flat(R.ties_merge(base, [d1, d2], density=0.5))
    np.testing.assert_allclose(out["a"], [7.0, 8.0, 10.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [2.5, 4.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out["c"], [7.0])
    # a single delta at density 1 is plain addition; state_delta inverts it
    tuned = R.ties_merge(base, [d1], density=1.0, scale=1.0)
    back = _flat(R.state_delta(tuned, base, paths=["a", "b"]))
    np.testing.assert_allclose(back["a"], [1.0, -2.0, 0.1], rtol=1e-5)
    with pytest.raises(ConfigError):
        R.ties_merge(base, [d1], density=0.0)
