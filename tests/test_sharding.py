"""Sharding: a (data=2, fsdp=2, tensor=2) mesh over 8 simulated CPU devices gives the same UNet
forward and training gradient as one device, and parameters are really sharded as the rules say.

Tolerance: fp32, max relative error (max|a-b| / max|b|) <= 1e-5 — only the reduction order differs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxforget.errors import ConfigError
from jaxforget.models.unet import UNet2DConditionModel, UNetConfig
from jaxforget.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    param_shardings,
    shard_module,
)

TOL = 1e-5

TINY_SD = {
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


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="module")
def setup():
    assert len(jax.devices()) >= 8, "conftest must simulate 8 CPU devices"
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    cfg = UNetConfig.from_diffusers(TINY_SD)
    unet = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    key = jax.random.PRNGKey(1)
    k1, k2, k3 = jax.random.split(key, 3)
    batch = {
        "x": jax.random.normal(k1, (4, 8, 8, 4)),
        "t": jnp.array([1, 250, 500, 999]),
        "ctx": jax.random.normal(k2, (4, 7, 32)),
        "target": jax.random.normal(k3, (4, 8, 8, 4)),
    }
    return mesh, unet, batch


def _forward(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    return model(batch["x"], batch["t"], batch["ctx"]).sample


def _loss(state, graphdef, batch):
    out = _forward(graphdef, state, batch)
    return jnp.mean(jnp.square(out - batch["target"]))


def test_forward_and_gradient_match_single_device(setup):
    mesh, unet, batch = setup
    graphdef, state = nnx.split(unet)
    fwd = jax.jit(_forward, static_argnums=0)
    grad = jax.jit(jax.grad(_loss), static_argnums=1)

    ref_out = fwd(graphdef, state, batch)
    ref_grad = grad(state, graphdef, batch)

    sharded_unet = shard_module(nnx.clone(unet), mesh)
    _, sharded_state = nnx.split(sharded_unet)
    sharded_batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    out = fwd(graphdef, sharded_state, sharded_batch)
    g = grad(sharded_state, graphdef, sharded_batch)

    assert len(out.sharding.device_set) == 8
    assert _rel(out, ref_out) <= TOL
    ref_leaves = jax.tree.leaves(ref_grad)
    leaves = jax.tree.leaves(g)
    assert len(ref_leaves) == len(leaves)
    worst = max(_rel(a, b) for a, b in zip(leaves, ref_leaves) if np.abs(np.asarray(b)).max() > 0)
    assert worst <= 1e-4, worst  # gradients of tiny params accumulate more reordering noise


def test_parameters_are_sharded_by_the_rules(setup):
    mesh, unet, _ = setup
    sharded = shard_module(nnx.clone(unet), mesh)
    # cross-attention query: logical (embed, heads) -> (fsdp, tensor)
    q = sharded.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q.kernel
    assert q.get_metadata()["logical_axes"] == ("embed", "heads")
    assert q[...].sharding.spec == P("fsdp", "tensor")
    assert q[...].addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1] // 2)
    # a conv kernel: (None, None, conv_in, conv_out) -> (None, None, fsdp): convs are FSDP-only
    conv = sharded.down_blocks[0].resnets[0].conv1.kernel
    assert conv[...].sharding.spec == P(None, None, "fsdp")
    assert conv[...].addressable_shards[0].data.shape == conv.shape[:2] + (conv.shape[2] // 2, conv.shape[3])
    # every parameter's sharding is exactly what the rules give for its logical axes
    specs = param_shardings(sharded, mesh)
    n_sharded = 0
    for (path, var), (_, sh) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(specs)):
        assert var[...].sharding.is_equivalent_to(sh, var.ndim), path
        n_sharded += any(s is not None for s in sh.spec)
    assert n_sharded > 10
    # a dimension the mesh axis does not divide stays replicated
    assert logical_to_spec(("embed",), (3,), mesh) == P()


def test_rules_fall_back_to_replication_and_use_each_mesh_axis_once():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    assert logical_to_spec(("embed", "mlp"), (8, 6), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), (7, 6), mesh) == P(None, "tensor")
    assert logical_to_spec(("embed", "embed"), (8, 8), mesh) == P("fsdp")
    assert logical_to_spec(("vocab", "embed"), (10, 8), mesh, {**DEFAULT_RULES, "vocab": "tensor"}) == P(
        "tensor", "fsdp"
    )
    assert isinstance(batch_sharding(mesh, 4), NamedSharding)


def test_mesh_shapes_and_errors():
    mesh = make_mesh({"data": -1, "tensor": 2}, jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ConfigError, match="needs 12 devices"):
        make_mesh({"data": 3, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    with pytest.raises(ConfigError, match="unknown axis 'model'"):
        make_mesh({"model": 2}, jax.devices()[:8])
