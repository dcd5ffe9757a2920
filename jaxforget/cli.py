"""Command-line entry points (``jaxforget <command>``; ``launch/*.py`` call the same functions).

Every user error is a JaxforgetError: printed as one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from jaxforget.errors import JaxforgetError

ASSETS = Path(__file__).resolve().parent / "assets" / "toyworld"
DEFAULT_MODEL = ASSETS / "model"
DEFAULT_JUDGE = ASSETS / "judge"


def _run(fn: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    try:
        return int(fn(args) or 0)
    except JaxforgetError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- generate
def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", help="one grid row per prompt")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="diffusers folder (default: shipped toy-world model)")
    p.add_argument("--num-images", type=int, default=8, help="images per prompt (grid columns)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "euler"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=0, help="pixel upscaling in the grid (0: auto)")
    p.add_argument("--out", default="grid.png", help="output PNG")


def cmd_generate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from jaxforget.eval.grids import save_grid
    from jaxforget.io.diffusers_folder import load_model_folder
    from jaxforget.pipeline import DiffusionModel, generate

    if args.num_images < 1:
        raise JaxforgetError(f"--num-images must be >= 1, got {args.num_images}")
    model = DiffusionModel.from_folder(load_model_folder(args.model))
    prompts = [p for p in args.prompts for _ in range(args.num_images)]
    t0 = time.time()
    out = generate(model, prompts, jax.random.PRNGKey(args.seed), sampler=args.sampler,
                   num_inference_steps=args.steps, guidance_scale=args.guidance)
    images = np.asarray(out.images)
    scale = args.scale or max(1, 128 // images.shape[1])
    path = save_grid(images, args.out, rows=len(args.prompts), cols=args.num_images, scale=scale,
                     row_labels=args.prompts if len(args.prompts) > 1 else None)
    print(f"wrote {path} ({len(prompts)} images, {images.shape[1]}x{images.shape[2]}, {time.time() - t0:.1f}s)")
    return 0


# ----------------------------------------------------------------------------- pretrain
def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: configs/toyworld/pretrain.yaml values)")
    p.add_argument("--install", action="store_true", help="copy the result into the package (what ships)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. unet.steps=100")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from jaxforget.config import load_config, save_config
    from jaxforget.toyworld.pretrain import Pretrainer, PretrainConfig, install_assets

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    trainer = Pretrainer(cfg)
    save_config(cfg, trainer.work / "config.yaml")
    report = trainer.run()
    if args.install:
        install_assets(trainer.work)
        print(f"installed model and judge into {ASSETS}")
    print(f"pre-training done: {trainer.work} ({sum(v.get('seconds', 0) for v in report.values()):.0f}s of stages)")
    return 0


# ----------------------------------------------------------------------------- unlearn
def add_unlearn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concepts", required=True, help="requests file (.txt, one per line, or .yaml)")
    p.add_argument("--config", default=None,
                   help="run config YAML (default: configs/toyworld/dfr.yaml with the shipped toy-world model; "
                        "RunConfig's defaults with --model)")
    p.add_argument("--run-dir", default=None, help="run directory (overrides run_dir)")
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped toy-world model)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. steps=100 dfr.lambda_p=5")


# the tuned toy-world run (benchmark.md figures) for the main command with no config and no model
TOYWORLD_DFR_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toyworld" / "dfr.yaml"


def run_config_path(config: str | None, overrides: Sequence[str], model: str | None = None) -> str | None:
    """The YAML a run reads: the one given, else the toy-world DFR config when no model is named."""
    names_model = model is not None or any(o.split("=", 1)[0].strip() == "model" for o in overrides)
    if config is None and not names_model and TOYWORLD_DFR_CONFIG.is_file():
        return str(TOYWORLD_DFR_CONFIG)
    return config


def load_run_config(config: str | None, overrides: Sequence[str], run_dir: str | None = None,
                    model: str | None = None):
    from jaxforget.config import load_config
    from jaxforget.engine import RunConfig

    config = run_config_path(config, overrides, model)
    extra = list(overrides)
    if run_dir:
        extra.append(f"run_dir={run_dir}")
    if model:
        extra.append(f"model={model}")
    for item in extra:
        if "=" not in item:
            raise JaxforgetError(f"command line: expected key=value, got {item!r}")
    return load_config(RunConfig, config, extra)


def _check_requests_file(path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise JaxforgetError(f"{path}: requests file not found")


def cmd_unlearn(args: argparse.Namespace) -> int:
    from jaxforget.engine import ContinualRun
    from jaxforget.eval.hook import make_evaluator

    _check_requests_file(args.concepts)
    config = run_config_path(args.config, args.overrides, args.model)
    if config != args.config:
        print(f"config: {config} (the default with the shipped toy-world model)")
    cfg = load_run_config(config, args.overrides, args.run_dir, args.model)
    run = ContinualRun(cfg, evaluator=make_evaluator(cfg))
    try:
        summaries = run.run(args.concepts)
    finally:
        run.close()
    print(f"done: {len(summaries)} request(s) applied; run directory {cfg.run_dir}")
    return 0


def add_rollback_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True)
    p.add_argument("--to", type=int, required=True, help="snapshot id to continue from (0 = base model)")
    p.add_argument("--delete-later", action="store_true", help="delete snapshots after it (default: keep)")


def cmd_rollback(args: argparse.Namespace) -> int:
    from jaxforget.checkpoints import RunStore

    with RunStore.open(Path(args.run_dir), create=False) as store:
        store.rollback(args.to, delete_later=args.delete_later)
        chain = [e["request"]["target"] for e in store.ledger()]
    print(f"head is now snapshot {args.to}; applied requests: {', '.join(chain) or '(none)'}")
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True)
    p.add_argument("--step", type=int, required=True, help="snapshot id to export")
    p.add_argument("--out", required=True, help="new diffusers folder")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))


def cmd_export(args: argparse.Namespace) -> int:
    from jaxforget.engine import export_snapshot

    out = export_snapshot(Path(args.run_dir), args.step, Path(args.out), dtype=args.dtype)
    print(f"exported snapshot {args.step} to {out}")
    return 0


# ----------------------------------------------------------------------------- evaluate
def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="an existing run directory")
    p.add_argument("--model", default=None, help="the run's base model folder, if it moved")
    p.add_argument("--attack", action="store_true",
                   help="also run the soft-prompt attack on every removed concept at the last snapshot")
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides of the run's config (eval.images_per_prompt=8) and of the attack "
                        "(attack.steps=100)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from jaxforget.config import load_config
    from jaxforget.eval.attack import AttackConfig
    from jaxforget.eval.hook import evaluate_run

    for item in args.overrides:
        if "=" not in item:
            raise JaxforgetError(f"command line: expected key=value, got {item!r}")
    attack_over = [o[len("attack."):] for o in args.overrides if o.startswith("attack.")]
    run_over = [o for o in args.overrides if not o.startswith("attack.")]
    attack = load_config(AttackConfig, None, ["enabled=true", *attack_over]) if args.attack else None
    rows = evaluate_run(args.run_dir, run_over, attack=attack, model_dir=args.model)
    print(f"evaluated {len(rows) - 1} snapshot(s) and the base model; report in {Path(args.run_dir) / 'report'}")
    return 0


COMMANDS = {
    "generate": (add_generate_args, cmd_generate, "generate a PNG grid of images for prompts"),
    "pretrain-toyworld": (add_pretrain_args, cmd_pretrain, "pre-train the embedded toy-world model"),
    "unlearn": (add_unlearn_args, cmd_unlearn, "apply deletion requests one after another (resumable)"),
    "rollback": (add_rollback_args, cmd_rollback, "continue a run from an earlier snapshot"),
    "export": (add_export_args, cmd_export, "export a snapshot to a diffusers folder"),
    "evaluate": (add_evaluate_args, cmd_evaluate, "re-evaluate every snapshot of a run and rewrite its report"),
}


def main(argv: Sequence[str] | None = None, command: str | None = None) -> int:
    """``jaxforget COMMAND ...``; launch scripts pass ``command`` and only its arguments.
    JAX's persistent compilation cache is turned on ($JAXFORGET_CACHE_DIR, default
    ~/.cache/jaxforget/xla) unless a cache directory is already configured."""
    from jaxforget.distributed import enable_compilation_cache

    enable_compilation_cache()
    if command is not None:
        add, fn, help_ = COMMANDS[command]
        parser = argparse.ArgumentParser(prog=f"jaxforget {command}", description=help_)
        add(parser)
        return _run(fn, parser.parse_args(argv))
    parser = argparse.ArgumentParser(prog="jaxforget")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, fn, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    return _run(COMMANDS[args.command][1], args)


if __name__ == "__main__":
    sys.exit(main())
