#!/usr/bin/env python3
"""Attention alone, forward + backward, on one CPU core: jaxforget's ``layers.attention`` against
the layout it replaced (session 12: ``bqhd`` einsums with the 1/sqrt(d) scale on the scores) and
torch's ``scaled_dot_product_attention``. Each framework runs in its own subprocess pinned to the
same core; times are medians of synced calls after two warm-ups.

    python3 launch/bench_attention.py                        # the shapes of NOTES.md
    python3 launch/bench_attention.py --shapes 16,8,256,256,4 --reps 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

SHAPES = ("16,8,256,256,4", "16,8,256,77,4", "8,8,1024,77,40", "8,8,1024,1024,40")  # B,H,Lq,Lk,D
ONE_CORE = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
            "OMP_NUM_THREADS": "1"}


def _median_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _inputs(b: int, lq: int, lk: int, inner: int):
    import numpy as np

    rs = np.random.default_rng(0)
    return [rs.standard_normal(s).astype(np.float32) for s in ((b, lq, inner), (b, lk, inner), (b, lk, inner))]


def attention_before(q, k, v, num_heads: int):
    """``layers.attention``'s XLA path as it was before session 12 (reference only): ``bqhd``
    einsums, the 1/sqrt(d) scale on the [B, H, Lq, Lk] scores."""
    import jax
    import jax.numpy as jnp

    b, lq, inner = q.shape
    d = inner // num_heads
    qh, kh, vh = (x.reshape(b, -1, num_heads, d) for x in (q, k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", qh, kh, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(d))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vh).reshape(b, lq, inner)


def jax_worker(b: int, h: int, lq: int, lk: int, d: int, reps: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from jaxforget.models.layers import attention

    args = [jnp.asarray(x) for x in _inputs(b, lq, lk, h * d)]
    out = {}
    for name, fn in (("jax_before", lambda q, k, v: attention_before(q, k, v, h)),
                     ("jax_now", lambda q, k, v: attention(q, k, v, h)[0])):
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.square(fn(q, k, v))), argnums=(0, 1, 2)))
        out[name] = _median_ms(lambda: jax.block_until_ready(grad(*args)), reps)
    return out


def torch_worker(b: int, h: int, lq: int, lk: int, d: int, reps: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    q, k, v = (torch.tensor(x, requires_grad=True) for x in _inputs(b, lq, lk, h * d))

    def step():
        qh, kh, vh = (x.view(b, -1, h, d).transpose(1, 2) for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
        o.transpose(1, 2).reshape(b, lq, h * d).square().sum().backward()

    return {"torch_sdpa": _median_ms(step, reps)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=";".join(SHAPES), help="B,H,Lq,Lk,D;...")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--core", type=int, default=None, help="CPU to pin both workers to (default: the last)")
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        shape = [int(x) for x in args.shape.split(",")]
        fn = jax_worker if args.worker == "jax" else torch_worker
        print(json.dumps(fn(*shape, args.reps)))
        return
    core = args.core if args.core is not None else max(os.sched_getaffinity(0))
    # four decimals: the tiny shapes (tests) take microseconds, which one decimal rounds to 0.0
    print(f"attention forward + backward, ms (median of {args.reps}), one core (cpu {core})")
    print(f"{'B, H, Lq, Lk, D':>22}  {'jax before':>10}  {'jax now':>8}  {'torch SDPA':>10}")
    for shape in args.shapes.split(";"):
        row = {}
        for worker in ("jax", "torch"):
            cmd = [sys.executable, __file__, "--worker", worker, "--shape", shape, "--reps", str(args.reps)]
            res = subprocess.run(cmd, env={**os.environ, **ONE_CORE}, capture_output=True, text=True, check=True,
                                 preexec_fn=lambda: os.sched_setaffinity(0, {core}))
            row.update(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{shape.replace(',', ', '):>22}  {row['jax_before']:10.4f}  {row['jax_now']:8.4f}  {row['torch_sdpa']:10.4f}")


if __name__ == "__main__":
    main()
