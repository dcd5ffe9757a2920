#!/usr/bin/env python3
"""Train the toy-world judge and save it: python launch/train_judge.py [OUT_DIR] [--steps N] [--seed S]

Deterministic for a given seed (scenes, init and augmentation all derive from it). Prints the
loss as it goes and the per-head accuracy on freshly rendered scenes with held-out seeds.
"""

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # run from a clone without installing
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from jaxforget.toyworld.judge import (
    DEFAULT_JUDGE_DIR,
    HEADS,
    evaluate_judge,
    load_judge,
    save_judge,
    train_judge,
    write_judge_config,
)

REQUIRED_ACCURACY = 0.98


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(DEFAULT_JUDGE_DIR), help="output folder (default: the packaged judge)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)

    bar = tqdm(total=args.steps, desc="judge", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 5.0)

    def on_step(step: int, metrics: dict) -> None:
        bar.update(1)
        if metrics:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", **{h[:3]: f"{metrics[f'acc_{h}']:.2f}" for h in HEADS})
            tqdm.write(
                f"step {step:5d}  loss {metrics['loss']:.4f}  "
                + "  ".join(f"{h} {metrics[f'loss_{h}']:.4f}/{metrics[f'acc_{h}']:.3f}" for h in HEADS)
            )

    result = train_judge(args.steps, args.seed, batch_size=args.batch_size, learning_rate=args.lr,
                         log_every=args.log_every, callback=on_step)
    bar.close()
    out = save_judge(result.model, Path(args.out))
    # evaluate what ships: the saved (float16) weights, reloaded
    t0 = time.perf_counter()
    acc = evaluate_judge(load_judge(out), args.eval_images)
    print(f"trained {args.steps} steps in {result.seconds:.0f} s; evaluation took {time.perf_counter() - t0:.1f} s")
    for head in HEADS:
        print(f"  {head:7s} accuracy on {args.eval_images} fresh renders (held-out seeds): {acc[head] * 100:.2f} %")
    record = {
        "steps": args.steps, "seed": args.seed, "batch_size": args.batch_size, "learning_rate": args.lr,
        "train_seconds": round(result.seconds, 1), "accuracy": acc, "eval_images": args.eval_images,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs (shared)",
        "jax": jax.__version__,
        "final_loss": result.history[-1]["loss"] if result.history else None,
    }
    write_judge_config(out, result.model.config, record)  # the config again, now with the record
    print(f"saved {out}")
    worst = min(acc.values())
    if worst < REQUIRED_ACCURACY:
        print(f"warning: accuracy {worst * 100:.2f} % is below the required {REQUIRED_ACCURACY * 100:.0f} %",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
