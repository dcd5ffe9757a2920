#!/usr/bin/env python3
"""Small-output convolutions, forward + backward, on one CPU core: XLA's
``lax.conv_general_dilated`` against ``layers.conv_as_patches`` (one matmul over the patches,
which ``layers.Conv2d`` uses for outputs of at most ``PATCHES_MAX_OUTPUT_PIXELS`` pixels).
One subprocess pinned to one core; times are medians of synced calls after two warm-ups.

    python3 launch/bench_conv.py                          # the shapes of NOTES.md (session 13)
    python3 launch/bench_conv.py --shapes 16,2,128,1 --reps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import ONE_CORE, _median_ms  # noqa: E402

# B,H(=W) input side,C,stride: the toy world's and the small-SD config's deepest levels and above
SHAPES = ("16,2,96,1", "16,2,128,1", "16,4,96,2", "16,4,128,2", "16,4,96,1", "16,4,128,1", "16,8,64,1",
          "16,8,96,1", "16,1,64,1")


def worker(b: int, side: int, c: int, stride: int, reps: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxforget.models.layers import conv_as_patches

    padding = ((1, 1), (1, 1))
    rs = np.random.default_rng(0)
    x = jnp.asarray(rs.standard_normal((b, side, side, c)), jnp.float32)
    w = jnp.asarray(rs.standard_normal((3, 3, c, c)) * 0.05, jnp.float32)

    def lax_conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def patches(x, w):
        return conv_as_patches(x, w, stride, padding)

    out = {}
    for name, f in (("lax_conv", lax_conv), ("patches", patches)):
        step = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
        out[name] = _median_ms(lambda: jax.block_until_ready(step(x, w)), reps)
    out["out_side"] = int(lax_conv(x, w).shape[1])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=";".join(SHAPES), help="B,side,C,stride;...")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--core", type=int, default=None, help="CPU to pin the worker to (default: the last)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*(int(x) for x in args.shape.split(",")), args.reps)))
        return
    core = args.core if args.core is not None else max(os.sched_getaffinity(0))
    print(f"3x3 convolution forward + backward, ms (median of {args.reps}), one core (cpu {core})")
    print(f"{'B, side, C, stride':>20}  {'output':>6}  {'lax conv':>8}  {'patches':>8}")
    for shape in args.shapes.split(";"):
        cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--reps", str(args.reps)]
        res = subprocess.run(cmd, env={**os.environ, **ONE_CORE}, capture_output=True, text=True, check=True,
                             preexec_fn=lambda: os.sched_setaffinity(0, {core}))
        row = json.loads(res.stdout.strip().splitlines()[-1])
        side = row["out_side"]
        print(f"{shape.replace(',', ', '):>20}  {f'{side}x{side}':>6}  {row['lax_conv']:8.4f}  {row['patches']:8.4f}")


if __name__ == "__main__":
    main()
