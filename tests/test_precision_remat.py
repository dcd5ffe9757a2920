"""Mixed precision and rematerialization of the UNet blocks.

- remat (none | full | dots): the same outputs, attention probabilities and parameter gradients
  as without it (tolerance: abs 1e-5 on the O(1) outputs and probabilities, 1e-4 of each
  gradient's max |g|: the recomputed forward is fused differently, fp32 rounding only), and a
  lower temp buffer size of the compiled gradient program with "full"
  (compiled.memory_analysis()). The memory comparison compiles in a subprocess with XLA:CPU's
  memory-minimizing scheduler (--xla_cpu_enable_concurrency_optimized_scheduler=false): under the
  default CPU scheduler, which orders for parallelism, remat saved nothing (measured: equal temp
  sizes, 13.19 MB none vs 13.22 MB full); GPU / TPU schedulers are memory-aware.
- bf16 compute: one DFR train step with every UNet forward (student and frozen teachers) in bf16
  and fp32 params: loss within 2% of the fp32 step's (bf16 has 8 mantissa bits: ~0.4% per
  rounding; measured 2.2e-3 relative), loss and attention maps fp32, params and Adam state fp32
  after the step, and every convolution / matmul of the forward really in bf16. The step is the
  engine's AOT one (``compile_train_step`` on a data=2 x fsdp=4 mesh): output shardings of params
  and Adam state equal their input shardings, the inputs are donated, and the one executable
  runs again on its own outputs.
- the engine wiring: ``compute_dtype=bfloat16 remat=full`` on the CLI trains, logs its AOT compile,
  and snapshots fp32 params; a bad ``remat`` value is a one-line config error, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxforget import schedulers as S
from jaxforget.errors import ConfigError
from jaxforget.methods import base as B
from jaxforget.methods import dfr
from jaxforget.methods import regularizers as REG
from jaxforget.models.unet import UNet2DConditionModel, UNetConfig

REPO = Path(__file__).resolve().parents[1]

# two resolution levels (cross-attention down + up blocks, a mid block): every block kind is remat'd
TINY = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}
# test-only: XLA:CPU compiles several times faster without backend optimization (numerics are
# fp32 either way; the memory test below compiles normally)
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def tiny():
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(TINY), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(unet)
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    inputs = (jax.random.normal(ks[0], (2, 8, 8, 4)), jnp.array([10, 700]), jax.random.normal(ks[1], (2, 7, 32)))
    return graphdef, state, inputs


# ----------------------------------------------------------------------------- remat
def test_remat_same_outputs_and_gradients(tiny):
    graphdef, state, (x, t, ctx) = tiny
    probe = jnp.array([[1, 3], [2, 5]], jnp.int32)

    def run(remat):
        def loss(st):
            out = nnx.merge(graphdef, st)(x, t, ctx, probe_tokens=probe, remat=remat)
            probes = sum(jnp.sum(p * p) for p in out.attn_probes.values())
            return jnp.mean(jnp.square(out.sample)) + probes, (out.sample, out.attn_probes)

        (val, (sample, probes)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                                 compiler_options=FAST)(state)
        return float(val), np.asarray(sample), {k: np.asarray(v) for k, v in probes.items()}, grads

    ref_val, ref_sample, ref_probes, ref_grads = run("none")
    assert len(ref_probes) == 4  # down_blocks.0 (1), mid_block (1), up_blocks.1 (2): out of remat'd blocks
    ref_leaves = jax.tree.leaves(ref_grads)
    for remat in ("full", "dots", "layers"):
        val, sample, probes, grads = run(remat)
        err = {
            "loss": abs(val - ref_val) / abs(ref_val),
            "sample": float(np.max(np.abs(sample - ref_sample))),
            "probes": max(float(np.max(np.abs(probes[k] - ref_probes[k]))) for k in ref_probes),
            "grads": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / (float(np.max(np.abs(b))) + 1e-12)
                         for a, b in zip(jax.tree.leaves(grads), ref_leaves)),
        }
        print(f"remat {remat} vs none:", {k: f"{v:.2e}" for k, v in err.items()})
        # the recomputed forward is fused differently: fp32 rounding only (outputs are O(1))
        assert err["loss"] <= 1e-5 and err["sample"] <= 1e-5 and err["probes"] <= 1e-5, err
        assert err["grads"] <= 1e-4, err


def test_remat_is_a_module_setting_and_validated(tiny):
    graphdef, state, (x, t, ctx) = tiny
    # the module attribute is the default of __call__: a remat'd jaxpr has checkpoint equations
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(TINY), remat="full", rngs=nnx.Rngs(0))
    assert unet.remat == "full"
    g2, s2 = nnx.split(unet)

    def grad_jaxpr(g, remat=None):
        return str(jax.make_jaxpr(jax.grad(lambda s: jnp.sum(nnx.merge(g, s)(x, t, ctx, remat=remat).sample)))(s2))

    assert "remat" in grad_jaxpr(g2) or "checkpoint" in grad_jaxpr(g2)
    plain = grad_jaxpr(g2, remat="none")
    assert "remat" not in plain and "checkpoint" not in plain
    # "layers": one checkpoint per transformer layer and resnet, applied to a throwaway copy of
    # each block: the called module keeps its structure (and so its parameter paths)
    per_layer = grad_jaxpr(g2, remat="layers")
    n_layers = sum(len(getattr(m, name)) for _, m in unet.iter_modules()
                   for name in ("transformer_blocks", "resnets") if isinstance(getattr(m, name, None), nnx.List))
    assert n_layers > 0 and per_layer.count("checkpoint[") + per_layer.count("remat") >= n_layers
    paths = lambda st: [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(st)[0]]  # noqa: E731
    called = nnx.merge(g2, s2)
    jax.make_jaxpr(lambda x: called(x, t, ctx, remat="layers").sample)(x)
    assert paths(nnx.state(called)) == paths(s2)
    with pytest.raises(ConfigError, match="remat"):
        UNet2DConditionModel(UNetConfig.from_diffusers(TINY), remat="most", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="remat"):
        nnx.merge(graphdef, state)(x, t, ctx, remat="everything")


# ----------------------------------------------------------------------------- memory-efficient attention
def test_attention_chunk_same_outputs_and_gradients(tiny):
    """Chunked attention (queries a chunk at a time, each chunk under jax.checkpoint) computes
    each query row exactly as whole-sequence attention does: outputs, probed attention maps and
    gradients agree to fp32 rounding (abs 1e-5 on O(1) values, 1e-4 of each gradient's max |g|),
    alone and under per-layer remat. 64 tokens at the top level: chunk 16 -> 4 chunks; chunk 24
    -> the largest divisor of 64 below it (16); chunk >= 64 -> one chunk (no map)."""
    from jaxforget.models.unet import set_attention_chunk

    graphdef, state, (x, t, ctx) = tiny
    probe = jnp.array([[1, 3], [2, 5]], jnp.int32)

    def run(chunk, remat="none"):
        unet = nnx.merge(graphdef, state)
        set_attention_chunk(unet, chunk)
        g, st = nnx.split(unet)

        def loss(st):
            out = nnx.merge(g, st)(x, t, ctx, probe_tokens=probe, remat=remat)
            probes = sum(jnp.sum(p * p) for p in out.attn_probes.values())
            return jnp.mean(jnp.square(out.sample)) + probes, (out.sample, out.attn_probes)

        jaxpr = str(jax.make_jaxpr(lambda s: loss(s)[0])(st))
        (val, (sample, probes)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                                 compiler_options=FAST)(st)
        return "scan" in jaxpr, float(val), np.asarray(sample), {k: np.asarray(v) for k, v in probes.items()}, grads

    looped, ref_val, ref_sample, ref_probes, ref_grads = run(None)
    assert not looped
    for chunk, remat in ((16, "none"), (24, "none"), (16, "layers"), (64, "none")):
        looped, val, sample, probes, grads = run(chunk, remat)
        assert looped == (chunk < 64), (chunk, looped)  # lax.map over the chunks: a scan
        err = {
            "loss": abs(val - ref_val) / abs(ref_val),
            "sample": float(np.max(np.abs(sample - ref_sample))),
            "probes": max(float(np.max(np.abs(probes[k] - ref_probes[k]))) for k in ref_probes),
            "grads": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / (float(np.max(np.abs(b))) + 1e-12)
                         for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))),
        }
        print(f"attention_chunk {chunk} remat {remat}:", {k: f"{v:.2e}" for k, v in err.items()})
        assert err["loss"] <= 1e-5 and err["sample"] <= 1e-5 and err["probes"] <= 1e-5, err
        assert err["grads"] <= 1e-4, err
    with pytest.raises(ConfigError, match="attention_chunk"):
        UNet2DConditionModel(UNetConfig.from_diffusers(TINY), attention_chunk=-1, rngs=nnx.Rngs(0))


def test_attention_chunk_target_mask_probes():
    """The fused target-probability form (TargetMask) chunks too: same output and span-summed
    map as whole-sequence attention, values and gradients (tolerance 1e-5 abs / 1e-4 rel)."""
    from jaxforget.models import layers as L

    ks = jax.random.split(jax.random.PRNGKey(5), 4)
    q = jax.random.normal(ks[0], (2, 64, 16))
    k = jax.random.normal(ks[1], (2, 7, 16))
    v = jax.random.normal(ks[2], (2, 7, 16))
    w = L.TargetMask(jnp.zeros((2, 7)).at[:, 2:4].set(1.0))

    def f(q, k, v, chunk):
        out, tp = L.attention(q, k, v, 4, probe_tokens=w, query_chunk=chunk)
        return jnp.sum(out * out) + jnp.sum(jnp.sin(tp)), (out, tp)

    (l0, (o0, p0)), g0 = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v, None)
    (l1, (o1, p1)), g1 = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v, 16)
    assert p1.shape == p0.shape == (2, 4, 64, 1)
    assert float(jnp.max(jnp.abs(o1 - o0))) <= 1e-5 and float(jnp.max(jnp.abs(p1 - p0))) <= 1e-5
    for a, b in zip(g1, g0):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * float(jnp.max(jnp.abs(b))), (a, b)


_MEMORY_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
from jaxforget.models.unet import UNet2DConditionModel, UNetConfig
cfg = json.loads(sys.argv[1])
unet = UNet2DConditionModel(UNetConfig.from_diffusers(cfg), rngs=nnx.Rngs(0))
g, st = nnx.split(unet)
ks = jax.random.split(jax.random.PRNGKey(0), 2)
x = jax.random.normal(ks[0], (4, 16, 16, 4)); ctx = jax.random.normal(ks[1], (4, 7, 32)); t = jnp.arange(4) * 100
out = {}
for remat in ("none", "full", "dots"):
    f = jax.jit(jax.grad(lambda s: jnp.mean(jnp.square(nnx.merge(g, s)(x, t, ctx, remat=remat).sample))))
    out[remat] = f.lower(st).compile().memory_analysis().temp_size_in_bytes
print("TEMP " + json.dumps(out))
"""


_CHUNK_MEMORY_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
from jaxforget.models.unet import UNet2DConditionModel, UNetConfig
cfg = json.loads(sys.argv[1])
ks = jax.random.split(jax.random.PRNGKey(0), 2)
x = jax.random.normal(ks[0], (2, 32, 32, 4)); ctx = jax.random.normal(ks[1], (2, 7, 32)); t = jnp.arange(2) * 100
out = {}
for chunk in (0, 128):
    g, st = nnx.split(UNet2DConditionModel(UNetConfig.from_diffusers(cfg), attention_chunk=chunk, rngs=nnx.Rngs(0)))
    f = jax.jit(jax.grad(lambda s: jnp.mean(jnp.square(nnx.merge(g, s)(x, t, ctx, remat="layers").sample))))
    out[chunk] = f.lower(st).compile().memory_analysis().temp_size_in_bytes
print("TEMP " + json.dumps(out))
"""


def _compiled_temp_bytes(script: str, cfg: dict) -> dict:
    """Run a TEMP-printing script on ``cfg`` in a subprocess with XLA:CPU's memory-minimizing
    scheduler (see the module docstring) and return its {setting: temp bytes}."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false")
    res = subprocess.run([sys.executable, "-c", script, json.dumps(cfg)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.split("TEMP ", 1)[1])


def test_attention_chunk_lowers_compiled_temp_memory():
    # 32x32 latents: 1024 self-attention tokens, so the [2, 2, 1024, 1024] fp32 scores (16 MiB per
    # layer) dominate; chunks of 128 queries hold 1/8 of that. Measured: 113.7 MB -> 48.4 MB.
    temp = _compiled_temp_bytes(_CHUNK_MEMORY_SCRIPT, dict(TINY, sample_size=32))
    print("compiled temp bytes (attention_chunk 0 / 128):", temp)
    assert temp["128"] < 0.6 * temp["0"], temp


def test_remat_full_lowers_compiled_temp_memory(tmp_path):
    # more blocks per level than TINY, so that saved activations, not one block's internals, set the peak
    temp = _compiled_temp_bytes(_MEMORY_SCRIPT, dict(TINY, layers_per_block=2))
    print("compiled temp bytes:", temp)  # measured: none 63.7 MB, full 45.1 MB, dots 47.7 MB
    assert temp["full"] < 0.85 * temp["none"], temp
    assert temp["dots"] < temp["none"], temp


# ----------------------------------------------------------------------------- bf16
def _dfr_world(dtype, mesh):
    """The tiny UNet (compute ``dtype``, fp32 params) as student + teachers of a DFR step, its
    params sharded on ``mesh`` by the logical-axis rules (as the engine places them)."""
    from jaxforget import sharding as SH

    unet = UNet2DConditionModel(UNetConfig.from_diffusers(TINY), dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(unet, nnx.PathContains("attn2"), ...)
    params = jax.device_put(params, SH.param_shardings(params, mesh))
    rest = jax.device_put(rest, SH.param_shardings(rest, mesh))
    merge = lambda p, r: nnx.merge_state(p, r)  # noqa: E731
    unet_fn = B.UNetFn(graphdef, merge)
    method = dfr.build(dfr.Config(), unet_fn, S.make_schedule())
    prev = merge(params, rest)
    frozen = B.Frozen(rest=rest, prev=prev, base=prev)
    return unet_fn, method, params, frozen


def _dfr_batch(b: int = 8):
    ks = jax.random.split(jax.random.PRNGKey(3), 6)
    pos = jax.random.randint(ks[5], (b, 2), 1, 7, jnp.int32)
    return {
        "forget_ctx": jax.random.normal(ks[0], (b, 7, 32)),
        "mapped_ctx": jax.random.normal(ks[1], (b, 7, 32)),
        "retain_ctx": jax.random.normal(ks[2], (b, 7, 32)),
        "forget_z0": jax.random.normal(ks[3], (b, 8, 8, 4)),
        "retain_z0": jax.random.normal(ks[4], (b, 8, 8, 4)),
        "forget_pos": pos,
        "forget_pos_mask": jnp.ones((b, 2), jnp.float32).at[0, 1].set(0.0),
        "mapped_pos": pos[:, ::-1],
        "mapped_pos_mask": jnp.ones((b, 2), jnp.float32).at[1, 0].set(0.0),
    }


def test_bf16_aot_step_close_to_fp32_params_stay_fp32():
    """The engine's AOT step (compile_train_step on a data=2 x fsdp=4 mesh) in fp32 and bf16."""
    from jaxforget import engine as E
    from jaxforget import sharding as SH

    mesh = SH.make_mesh({"data": 2, "fsdp": 4})
    rep = SH.replicated(mesh)
    batch = {k: E.put_global(np.asarray(v), SH.batch_sharding(mesh, v.ndim)) for k, v in _dfr_batch().items()}
    rngs = [E.put_global(np.asarray(jax.random.PRNGKey(i)), rep) for i in (5, 6)]
    results = {}
    for name, dtype in (("fp32", None), ("bf16", jnp.bfloat16)):
        unet_fn, method, params, frozen = _dfr_world(dtype, mesh)
        params = jax.tree.map(jnp.copy, params)  # donated by the step; frozen.prev shares the buffers
        tx = optax.adamw(1e-3)
        opt_state = E.on_mesh(tx.init(params), mesh)
        frozen = E.on_mesh(frozen, mesh)
        before = jax.tree.map(np.asarray, params)
        step = E.make_train_step(method, unet_fn, REG.Config(), tx, [])
        compiled, secs = E.compile_train_step(step, params, opt_state, frozen, batch, rngs[0], mesh)
        # explicit shardings: new params / Adam state exactly as the old ones (FSDP-sharded), so
        # the donated buffers are reused and step k+1 takes step k's outputs as they are
        in_sh, out_sh = compiled.input_shardings[0], compiled.output_shardings
        for i in (0, 1):
            leaves = list(zip(jax.tree.leaves(in_sh[i]), jax.tree.leaves(out_sh[i]),
                              jax.tree.leaves((params, opt_state)[i])))
            assert leaves and all(a.is_equivalent_to(b, x.ndim) for a, b, x in leaves)
        assert any("fsdp" in str(sh.spec) for sh in jax.tree.leaves(in_sh[0]))
        old = jax.tree.leaves(params)
        new_params, new_opt, metrics = compiled(params, opt_state, frozen, batch, rngs[0])
        assert all(x.is_deleted() for x in old)  # donated
        loss = float(metrics["loss"])
        # the same executable again on its own outputs (what the engine does every step)
        again = compiled(jax.tree.map(jnp.copy, new_params), jax.tree.map(jnp.copy, new_opt), frozen, batch, rngs[1])
        assert np.isfinite(float(again[2]["loss"]))
        results[name] = (loss, metrics, new_params, new_opt, before, unet_fn, frozen)

    loss32, loss16 = results["fp32"][0], results["bf16"][0]
    print(f"DFR loss fp32 {loss32:.6g} bf16 {loss16:.6g} (rel {abs(loss16 - loss32) / loss32:.2e})")
    assert np.isfinite(loss16) and loss16 != loss32  # bf16 really ran
    assert abs(loss16 - loss32) <= 2e-2 * abs(loss32)

    _, metrics, new_params, new_opt, before, unet_fn, frozen = results["bf16"]
    assert all(v.dtype == jnp.float32 for v in metrics.values())
    for leaf in jax.tree.leaves(new_params) + [x for x in jax.tree.leaves(new_opt) if x.ndim]:
        assert leaf.dtype == jnp.float32
    moved = [not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(before))]
    assert all(moved)

    # the forward (student and teachers share the graphdef): every conv / matmul in bf16, ε and
    # the attention maps handed to the losses in fp32
    x = batch["forget_z0"]
    t = jnp.arange(8) * 120
    eps, probes = unet_fn(frozen.prev, x, t, batch["forget_ctx"], probe_tokens=batch["forget_pos"])
    assert eps.dtype == jnp.float32 and all(p.dtype == jnp.float32 for p in probes.values())
    jaxpr = jax.make_jaxpr(lambda s: unet_fn(s, x, t, batch["forget_ctx"])[0])(frozen.prev)
    heavy = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert len(heavy) > 20
    # (the attention score einsum takes bf16 q, k and asks for an fp32 result: inputs checked here)
    assert all(v.aval.dtype == jnp.bfloat16 for e in heavy for v in e.invars[:2])


def _all_eqns(jaxpr):
    """Equations of a jaxpr and of every jaxpr nested in its equations' params (pjit, checkpoint)."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


# ----------------------------------------------------------------------------- engine wiring
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tiny_pipelines import build_sd_folder

    path = tmp_path_factory.mktemp("precision") / "sd1"
    build_sd_folder(path, "sd1")
    return path


def test_engine_bf16_remat_run(model_dir, tmp_path, capsys):
    from safetensors.numpy import load_file
    from test_engine import _snapshot_params, _unlearn

    from jaxforget.checkpoints import RunStore

    req = tmp_path / "req.txt"
    req.write_text("cat -> dog\n")
    run_dir = tmp_path / "run"
    assert _unlearn(model_dir, run_dir, req, "compute_dtype=bfloat16", "remat=full", "attention_chunk=16",
                    "steps=3") == 0
    out = capsys.readouterr().out
    # compiled once (AOT, explicit shardings) and reused for the 3 steps
    assert out.count("train step compiled in") == 1 and "compute bfloat16, remat full" in out
    with RunStore.open(run_dir, create=False, lock=False) as store:
        meta = store.metadata(1)
    assert meta["config"]["compute_dtype"] == "bfloat16" and meta["config"]["remat"] == "full"
    assert meta["config"]["attention_chunk"] == 16
    assert np.isfinite(meta["metrics"]["loss"])
    params = _snapshot_params(run_dir, 1)
    base = load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == np.float32 for v in params.values())
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert not np.array_equal(params[key], base[key])


@pytest.mark.parametrize("override", ["remat=most", "compute_dtype=float16", "attention_chunk=-4"])
def test_bad_precision_or_remat_config(tmp_path, capsys, override):
    from jaxforget.cli import main

    req = tmp_path / "req.txt"
    req.write_text("cat\n")
    code = main(["--concepts", str(req), "--run-dir", str(tmp_path / "run"), override], command="unlearn")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert override.split("=")[0] in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError):
        from jaxforget.engine import RunConfig

        RunConfig(**{override.split("=")[0]: override.split("=")[1]})


def test_fused_sdpa_path_matches_the_xla_attention(monkeypatch):
    """Probe-free, mask-free attention goes to jax.nn.dot_product_attention (cuDNN flash
    attention on GPUs, bf16). Here the same wiring (layout, scale, reshape) runs with its XLA
    implementation and must give the model's own attention: values and gradients (1e-5 abs);
    with probes or off-GPU the model's path is taken."""
    from jaxforget.models import layers as L

    assert not L.fused_sdpa_applies(jnp.bfloat16, 40) or jax.default_backend() == "gpu"
    assert not L.fused_sdpa_applies(jnp.float32, 40)
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    q = jax.random.normal(ks[0], (2, 64, 32))
    k = jax.random.normal(ks[1], (2, 9, 32))
    v = jax.random.normal(ks[2], (2, 9, 32))

    def f(q, k, v):
        out, probes = L.attention(q, k, v, 4)
        assert probes is None
        return jnp.sum(jnp.sin(out)), out

    (l0, o0), g0 = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(L, "fused_sdpa_applies", lambda dtype, head_dim: True)
    monkeypatch.setattr(L, "SDPA_IMPLEMENTATION", "xla")
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    (l1, o1), g1 = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert calls and calls[0]["implementation"] == "xla"
    assert float(jnp.max(jnp.abs(o1 - o0))) <= 1e-5
    for a, b in zip(g0, g1):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5
    # attention maps requested: never the fused call
    calls.clear()
    L.attention(q, k, v, 4, probe_tokens=jnp.zeros((2, 1), jnp.int32))
    assert not calls
