#!/usr/bin/env python3
"""Compile and step time of one AdamW training step of a small SD-style UNet + CLIP text encoder.

    python launch/time_unet_step.py --batch 64 --channels 32,64,64
"""
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # run from a clone without installing
import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxforget.models.clip import CLIPTextConfig, CLIPTextModel
from jaxforget.models.unet import UNet2DConditionModel, UNetConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", default="32,64,64")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    ch = [int(c) for c in args.channels.split(",")]
    cfg = UNetConfig.from_diffusers({
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": ch, "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D"] * (len(ch) - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(ch) - 1),
        "attention_head_dim": 4, "cross_attention_dim": 64, "norm_num_groups": 16})
    text = CLIPTextModel(CLIPTextConfig(vocab_size=647, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4), rngs=nnx.Rngs(0))
    models = {"unet": UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)), "text": text}
    graphdef, params = nnx.split(models, nnx.Param)
    tx = optax.adamw(1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, ids, t, noise):
        def loss_fn(p):
            m = nnx.merge(graphdef, p)
            ctx = m["text"](ids).last_hidden_state
            return jnp.mean((m["unet"](x, t, ctx).sample - noise) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    b = args.batch
    x = jax.random.normal(jax.random.PRNGKey(0), (b, 8, 8, 4))
    ids = jnp.ones((b, 77), jnp.int32)
    t = jnp.arange(b) % 1000
    n_params = sum(v.size for v in jax.tree.leaves(params))
    t0 = time.perf_counter()
    params, opt, loss = step(params, opt, x, ids, t, x)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt, loss = step(params, opt, x, ids, t, x)
    loss.block_until_ready()
    print(f"params {n_params:,}  batch {b}  channels {ch}  compile+first step {compile_s:.1f}s  "
          f"step {(time.perf_counter() - t0) / args.steps * 1000:.0f} ms")


if __name__ == "__main__":
    main()
