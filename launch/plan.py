#!/usr/bin/env python3
"""Plan an unlearning run without weights or accelerators: AOT-compile the real step on simulated
CPU devices and print per-device memory, FLOPs per step, collective bytes and estimated step times.

One plan:
    python launch/plan.py --model sdxl --mesh fsdp=8 --batch 8 --method dfr \
        [--resolution 1024] [--remat none|full|dots|layers] [--dtype fp32|bf16] [--attention-chunk 0] [--mfu 0.4]

The same, compiled by the TPU compiler for a v5e-8 slice (libtpu's deviceless AOT; no TPU needed,
pip install "jax[tpu]"): add --target v5e-8 (also v5e-1, v5e-4).

Only the FLOP count and its check against the analytic count (the step lowered, not compiled):
    python launch/plan.py --model sdxl --mesh fsdp=8 --batch 8 --method dfr --resolution 1024 --flops-only

A sweep (CSV + plot; failed combinations are rows with their error):
    python launch/plan.py sweep --models sd15,sd21,sdxl --resolutions 512,1024 --batches 1,8 \
        --meshes "fsdp=8;data=2,fsdp=4" [--remat full] [--dtype bf16] --out DIR
    -> DIR/plan_sweep.csv, DIR/plan_sweep.png

--model / --models: shipped names (sd15, sd21, sdxl: configs/models/<name>/unet/config.json) or
paths to a diffusers UNet config.json. --batch is the global number of rows per set (forget and
retain each), sharded over data × fsdp. Bad input: one line on stderr, exit status 2. With a TPU
--target, a step over the chip's HBM is rejected by its compiler: the plan prints "DOES NOT FIT"
with the compiler's figures (exit status 0; a sweep writes it in the row's error column).
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other bad input), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="dfr", help="unlearning method (dfr)")
    p.add_argument("--remat", default="none", help="none | full | dots (jax.checkpoint per UNet block) | layers (per transformer layer and resnet)")
    p.add_argument("--dtype", default="fp32", help="compute dtype: fp32 | bf16 (params stay fp32)")
    p.add_argument("--attention-chunk", type=int, default=0,
                   help="memory-efficient attention: queries per chunk (0: whole-sequence attention)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization")
    p.add_argument("--seq-len", type=int, default=77, help="text tokens per prompt")
    p.add_argument("--trainable", default="all", help="trainable filter (preset or regex); DFR trains all")
    p.add_argument("--target", default="cpu",
                   help="compiler to plan with: cpu (XLA:CPU on simulated devices) or a TPU slice "
                        "(v5e-1, v5e-4, v5e-8: the TPU compiler from libtpu, deviceless; pip install \"jax[tpu]\")")


def _plan_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="plan.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--mesh", default="data=1", help="axis=size pairs over data, fsdp, tensor")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: config sample_size × 8)")
    p.add_argument("--flops-only", action="store_true",
                   help="only the FLOP count and its analytic check: lower the step, skip the XLA compile "
                        "(seconds instead of up to an hour for SDXL); no memory figures")
    _common(p)
    return p


def _sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="plan.py sweep", description="tabulate plans over models × resolutions × batches × meshes")
    p.add_argument("--models", default="sd15,sd21,sdxl", help="comma-separated names or config.json paths")
    p.add_argument("--resolutions", default="512,1024", help="comma-separated pixel sizes")
    p.add_argument("--batches", default="1,8", help="comma-separated global batch sizes")
    p.add_argument("--meshes", default="fsdp=8;data=2,fsdp=4", help="';'-separated meshes")
    p.add_argument("--out", required=True, help="output folder (plan_sweep.csv, plan_sweep.png)")
    _common(p)
    return p


def _set_device_count(n: int) -> None:
    # JAX's CPU client reads XLA_FLAGS when the backend starts (the first device query, inside
    # planning), not at import; a count the caller already set wins, so tests and wrappers can
    # fix their own
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _spec_common(args: argparse.Namespace) -> dict:
    return dict(method=args.method, remat=args.remat, dtype=args.dtype, attention_chunk=args.attention_chunk,
                seq_len=args.seq_len,
                trainable=args.trainable, mfu=args.mfu)


def _plan(argv: list[str]) -> int:
    args = _plan_parser().parse_args(argv)
    from jaxforget import planning as PL  # imports JAX, does not start its backend

    mesh = PL.parse_mesh(args.mesh)
    spec = PL.PlanSpec(model=args.model, mesh=tuple(mesh.items()), batch=args.batch,
                       resolution=args.resolution, **_spec_common(args))
    PL.check_spec(spec)  # bad input fails here, before the backend starts or anything compiles
    _set_device_count(spec.devices)
    devices = PL.target_devices(args.target)
    t0 = time.time()
    if args.flops_only:
        print(PL.count_flops(spec, devices).report(), flush=True)
        return 0
    progress = lambda line: print(f"[{time.time() - t0:7.1f} s] {line}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        print(PL.plan(spec, devices, progress=progress).report(), flush=True)
    except PL.DoesNotFit as verdict:  # the target's compiler said no: an answer, printed as one
        print(verdict.report(), flush=True)
    return 0


def _sweep(argv: list[str]) -> int:
    args = _sweep_parser().parse_args(argv)
    from jaxforget import planning as PL

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise PL.ConfigError(f"--models {args.models!r}: empty list")
    # input errors common to every combination are fatal at once, not a column of errors
    for m in models:
        PL.load_config(m)
    resolutions = [PL.check_resolution(r) for r in PL.parse_int_list(args.resolutions, "resolutions")]
    batches = PL.parse_int_list(args.batches, "batches")
    meshes = PL.parse_meshes(args.meshes)
    specs = PL.sweep_specs(models, resolutions, batches, meshes, **_spec_common(args))
    PL.check_options(specs[0])
    _set_device_count(max(s.devices for s in specs))
    out = Path(args.out)
    PL.run_sweep(specs, out, PL.target_devices(args.target), log=lambda line: print(line, flush=True))
    print(f"wrote {out / 'plan_sweep.csv'} and {out / 'plan_sweep.png'} ({len(specs)} combinations)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from jaxforget.errors import JaxforgetError

    try:
        if argv and argv[0] == "sweep":
            return _sweep(argv[1:])
        return _plan(argv)
    except JaxforgetError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", USAGE_ERROR)


if __name__ == "__main__":
    sys.exit(main())
