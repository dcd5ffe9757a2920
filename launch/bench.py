#!/usr/bin/env python3
"""jaxforget vs a plain PyTorch / diffusers reference: the same unlearning step, timed in one run.

    python3 launch/bench.py --model toyworld --method all
    python3 launch/bench.py --model small-sd --method dfr --batch 8 --steps 20 --json out.json
    python3 launch/bench.py --model toyworld --scaling          # + step time / memory vs batch, width
    python3 launch/bench.py --model sd15 --device cuda --dtype bfloat16 --method dfr --no-gen   # GPU MFU

What is compared, per method (DFR; DUGE with its cross-attention loss):

- one training step on the same model config and weights (one diffusers folder, loaded by both),
  the same batch (one .npz: latents, prompt contexts, token positions) and the same (t, ε) draws
  (those jaxforget's jitted step makes from its PRNG key, precomputed here and fed to the torch
  step, so both follow one trajectory and their losses are compared step by step).
  jaxforget: the engine's own ``make_train_step`` (jitted, params + optimizer state donated),
  ``make_optimizer``, ``trainable.split_trainable`` and ``methods.build_method`` — the product path.
  PyTorch: ``launch/bench_reference.py`` (diffusers UNet2DConditionModel, a custom attn2
  processor for the attention maps, torch.optim.AdamW after global-norm clipping).
  Trainable sets: DFR all UNet parameters (its reference), DUGE ``attn2`` (jaxforget's default).
- the request's data build: prompt contexts + the teacher's DDIM latents for the sets the method
  needs (DFR: forget + retain replay, DUGE: mapped anchors + prior), ``--replay-images`` per set.
  jaxforget: ``engine.generate_latents`` (the jitted sampler, one ``lax.scan``) and
  ``engine.encode_texts``; PyTorch: CLIPTextModel + a DDIMScheduler loop. Run twice: cold (jax:
  compiles) and warm.

Fairness: fp32 everywhere (``--dtype bfloat16``: both run the UNet in bf16 — jaxforget's
compute_dtype, torch.autocast — with fp32 params, AdamW state and losses); each framework runs in its own subprocess (so ru_maxrss is its own
peak), with the same CPU threads (default all: torch.set_num_threads(os.cpu_count()), XLA uses
every core; ``--threads n`` pins each worker to n cores and gives torch n threads); warm-up steps
for both; per-step times are medians of individually timed steps (each synced: the loss is read
back as a Python float, as the engine's loop does); jaxforget's compile time is excluded from its
step time and reported separately (first step − median). No persistent compilation cache.

On a machine shared with other busy processes, torch's OpenMP pool with several threads can
stall at every parallel region (measured here: a toy-UNet forward + backward 40 ms with 1 thread,
~10 s with 2 threads while a higher-priority job held the cores; jax's pool was unaffected). Use
``--threads 1`` (or OMP_WAIT_POLICY=PASSIVE, inherited by the workers) for figures that compare
the frameworks rather than the schedulers. ``--repeats R`` runs each main-table cell R times,
jax and torch alternating, and reports medians with each repeat's ratios: a host whose speed
drifts moves a jax run and the torch run right after it alike.

Whole request = teacher data build + ``--request-steps`` training steps, composed from the
measured parts: warm (compiled programs reused, e.g. a later request in the same process:
gen_warm + N·median) and cold (a fresh process: gen_cold + first step + (N−1)·median).

MFU (DFR) = model FLOPs per step / (median step × peak): the planner's analytic count (8 UNet
forwards: two student passes at forward + backward, two teacher forwards) against the device's
published dense bf16 peak (``planning.device_peak_flops``) or ``--peak-tflops``; none on a CPU.
``--model sd15`` is SD 1.5's UNet (random weights, 768-wide contexts) at ``--resolution`` (512).
"""

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # run from a clone without installing
_sys.path.insert(0, str(_Path(__file__).resolve().parent))  # bench_reference (torch worker only)

import argparse
import hashlib
import json
import os
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# NOTE: jax / jaxforget and torch are imported inside the functions that need them, so that each
# worker subprocess loads one framework only (its peak memory is its own).

METHODS = ("dfr", "duge")
MODELS = ("toyworld", "small-sd", "sd15")
# the batch keys each method's loss reads (jaxforget/methods/{dfr,duge}.py)
BATCH_KEYS: dict[str, tuple[str, ...]] = {
    "dfr": ("forget_ctx", "forget_z0", "mapped_ctx", "retain_ctx", "retain_z0"),
    "duge": ("forget_ctx", "mapped_ctx", "mapped_z0", "forget_pos", "forget_pos_mask", "mapped_pos",
             "mapped_pos_mask", "prior_ctx", "prior_z0"),
}
# the two noised terms of each loss: (latent key, inclusive t max) — the draw order of the method
# modules' docstrings: k_0, k_1 = split(rng); per term k_t, k_n = split(k_i)
NOISE_TERMS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "dfr": (("forget_z0", "unlearn_t_max"), ("retain_z0", "")),
    "duge": (("mapped_z0", "t_max"), ("prior_z0", "")),
}
TRAINABLE = {"dfr": "all", "duge": "attn2"}
DTYPES = ("float32", "bfloat16")
# the benchmark's deletion request (toy-world words, so the shipped tokenizer knows them)
TARGET, ANCHOR, RELATED = "circle", "square", ("ellipse", "ring")
TEMPLATES = ("a {}", "a picture of a {}", "a {} on plain background", "a red {} on checker background",
             "a blue {} in waves style", "a {} on grid background")
RETAIN_POOL = ("a star on dots background", "a green heart in bricks style", "an empty grid background",
               "a diamond on noise background")
MAX_POSITIONS = 8


# ============================================================================ models
def small_sd_unet_config(width: int = 32, sample_size: int = 16, cross_attention_dim: int = 64) -> dict[str, Any]:
    """SD 1.x's UNet architecture at reduced width: four levels (w, 2w, 4w, 4w) — SD 1.5 is
    w = 320 — three cross-attention levels, two resnets per level, 8 heads, 1x1-conv proj_in/out,
    GroupNorm(32). ``sample_size``: latent side (SD 1.5: 64)."""
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [width, 2 * width, 4 * width, 4 * width], "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "attention_head_dim": 8, "cross_attention_dim": cross_attention_dim,
        "norm_num_groups": 32 if width % 32 == 0 else 8, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
    }


def scaled_unet_config(config: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """``config`` with every block width multiplied by ``factor`` (GroupNorm groups kept)."""
    out = dict(config)
    out["block_out_channels"] = [int(round(c * factor)) for c in config["block_out_channels"]]
    groups = int(config.get("norm_num_groups", 32))
    if any(c % groups for c in out["block_out_channels"]):
        raise ValueError(f"width factor {factor}: channels {out['block_out_channels']} not divisible by {groups} groups")
    return out


def sd15_unet_config(resolution: int = 512) -> dict[str, Any]:
    """SD 1.5's UNet config as shipped (``configs/models/sd15``), for ``resolution``² images
    (latent side resolution / 8; SD 1.5 is 512)."""
    from jaxforget.planning import load_unet_config

    return {**load_unet_config("sd15"), "sample_size": latent_side(resolution)}


def latent_side(resolution: int) -> int:
    """The latent side of ``resolution``-pixel images (the planner's check: a multiple of 8)."""
    from jaxforget.planning import check_resolution

    return check_resolution(resolution) // 8


def toyworld_dir() -> Path:
    from jaxforget.engine import default_model_dir

    return default_model_dir()


def build_random_folder(out: Path, unet_config: Mapping[str, Any], *, seed: int = 0,
                        base_dir: Path | None = None) -> Path:
    """A diffusers folder: the base folder's text encoder, tokenizer, VAE and scheduler (default:
    the shipped toy-world model) with a randomly initialized jaxforget UNet of ``unet_config``,
    written with jaxforget's io (``export_model_folder``). Every parameter is perturbed by
    N(0, 0.05²) so norms and biases are off their init (a parity check cannot pass by accident).
    Reused when ``out`` already holds it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxforget.io.diffusers_folder import export_model_folder, load_model_folder
    from jaxforget.models.unet import UNet2DConditionModel, UNetConfig

    out = Path(out)
    if (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file():
        return out
    base = load_model_folder(base_dir or toyworld_dir())
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(dict(unet_config)), rngs=nnx.Rngs(seed))
    context_width = set(np.atleast_1d(unet.config.cross_attention_dim).tolist())  # one int or one per block
    if context_width != {base.text_encoder.config.hidden_size}:
        if len(context_width) != 1:
            raise ValueError(f"cross_attention_dim {unet.config.cross_attention_dim}: one context width expected")
        base = replace(base, text_encoder=context_text_encoder(base.text_encoder, context_width.pop(), seed))
    graphdef, state = nnx.split(unet)
    leaves, tree = jax.tree.flatten(state)
    rs = np.random.default_rng(seed)
    leaves = [x + jnp.asarray(rs.normal(0.0, 0.05, x.shape).astype(np.float32)) for x in leaves]
    unet = nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))
    return export_model_folder(base, out, unet=unet)


def context_text_encoder(base: Any, width: int, seed: int = 0) -> Any:
    """A random one-layer CLIP text encoder on ``base``'s vocabulary and token ids whose contexts
    are ``width`` wide (SD 1.5: 768), for a UNet whose cross-attention expects that width. One
    layer: the text encoder runs outside the timed step, it only has to give contexts of the
    right shape."""
    from flax import nnx

    from jaxforget.models.clip import CLIPTextModel

    heads = next(h for h in (12, 8, 4, 2, 1) if width % h == 0)
    cfg = replace(base.config, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
                  num_attention_heads=heads, projection_dim=width)
    return CLIPTextModel(cfg, rngs=nnx.Rngs(seed))


def resolve_model(model: str, work_dir: Path, *, width: float = 1.0, model_dir: str | None = None,
                  resolution: int | None = None) -> Path:
    """The diffusers folder of a benchmark model: ``toyworld`` (the shipped model; width ≠ 1:
    the toy-world architecture at scaled width, random weights), ``small-sd`` (SD 1.x
    architecture, width 32·``width``, random weights), ``sd15`` (SD 1.5's UNet config at
    ``width`` × its channels, random weights, a 768-wide text encoder), or an explicit
    ``model_dir``. ``resolution`` (pixels; small-sd and sd15 only): the latent side is
    resolution / 8 (defaults: small-sd 128, sd15 512)."""
    if model_dir:
        return Path(model_dir)
    if model == "toyworld" and resolution is not None:
        raise ValueError("--resolution: the toy-world model has a fixed size (use small-sd or sd15)")
    if model == "toyworld":
        if width == 1.0:
            return toyworld_dir()
        cfg = json.loads((toyworld_dir() / "unet" / "config.json").read_text())
        cfg = scaled_unet_config(cfg, width)
    elif model == "small-sd":
        cfg = small_sd_unet_config(int(round(32 * width)), sample_size=latent_side(resolution or 128))
    elif model == "sd15":
        cfg = sd15_unet_config(resolution or 512)
        cfg = cfg if width == 1.0 else scaled_unet_config(cfg, width)
    else:
        raise ValueError(f"unknown model {model!r} (one of {', '.join(MODELS)})")
    tag = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    return build_random_folder(Path(work_dir) / f"{model}-w{width:g}-{tag}", cfg)


# ============================================================================ shared inputs
def bench_prompts() -> dict[str, list[str]]:
    """The request's prompt sets, built by the engine (``engine.request_prompts``)."""
    from jaxforget.engine import DataConfig, request_prompts
    from jaxforget.requests import Request

    req = Request(TARGET, anchor=ANCHOR, related=RELATED, domain="object", templates=TEMPLATES)
    p = request_prompts(req, DataConfig(retain_pool=RETAIN_POOL), [], ANCHOR)
    return {"forget": p.forget, "mapped": p.mapped, "retain": p.retain, "prior": p.prior}


def _cycle(items: Sequence[Any], n: int) -> list[Any]:
    return [items[i % len(items)] for i in range(n)]


def make_batch(model_dir: Path, batch_size: int, prompts: Mapping[str, list[str]], seed: int = 0) -> dict[str, np.ndarray]:
    """One training batch with every key of BATCH_KEYS (NHWC latents ~ N(0, 1), contexts from the
    folder's text encoder through jaxforget, target / anchor token positions), numpy."""
    from jaxforget import engine as E
    from jaxforget import pipeline as PL
    from jaxforget.io.diffusers_folder import load_model_folder

    model = PL.DiffusionModel.from_folder(load_model_folder(model_dir))
    c = model.unet.config
    side = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    rs = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name in ("forget", "mapped", "retain", "prior"):
        plist = _cycle(prompts[name], batch_size)
        out[f"{name}_ctx"] = E.encode_texts(model, plist)[0]
        out[f"{name}_z0"] = rs.standard_normal((batch_size, side, side, c.in_channels)).astype(np.float32)
    for name, concept in (("forget", TARGET), ("mapped", ANCHOR)):
        pos, mask = E.token_positions(model, _cycle(prompts[name], batch_size), concept, "none", MAX_POSITIONS)
        if not mask.sum(axis=1).all():
            raise ValueError(f"'{concept}' is missing from some {name} prompts")
        out[f"{name}_pos"], out[f"{name}_pos_mask"] = pos, mask
    return out


def method_config(method: str) -> Any:
    """The method's Config with its methods.md defaults (what both sides use)."""
    from jaxforget.methods import method_config_types

    return method_config_types()[method]()


def noise_draws(method: str, batch: Mapping[str, np.ndarray], n_steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The (t, ε) draws jaxforget's step ``s`` makes from rng = fold_in(PRNGKey(seed), s): t_0 /
    eps_0 for the unlearning term, t_1 / eps_1 for the preserve (DFR) / prior (DUGE) term."""
    import jax
    import jax.numpy as jnp

    cfg = method_config(method)
    terms = NOISE_TERMS[method]
    root = jax.random.PRNGKey(seed)

    @jax.jit
    def one(step):
        ks = jax.random.split(jax.random.fold_in(root, step))
        out = []
        for k, (zkey, attr) in zip(ks, terms):
            hi = getattr(cfg, attr) if attr else 999
            k_t, k_n = jax.random.split(k)
            z = batch[zkey]
            out.append((jax.random.randint(k_t, (z.shape[0],), 0, hi + 1, dtype=jnp.int32),
                        jax.random.normal(k_n, z.shape, jnp.float32)))
        return out

    per = [one(s) for s in range(n_steps)]
    return {f"{kind}_{i}": np.stack([np.asarray(p[i][j]) for p in per])
            for i in range(2) for j, kind in enumerate(("t", "eps"))}


# ============================================================================ the jax worker
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _jax_memory() -> dict[str, float]:
    import jax

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


def jax_request_data(model: Any, unet: Any, method: str, prompts: Mapping[str, list[str]], n: int,
                     dcfg: Any, key: Any) -> dict[str, np.ndarray]:
    """The request's data as the engine builds it (``ContinualRun._request_data``'s work, minus
    the dataset cache on disk): contexts of every set, the teacher's latents for the needed sets."""
    import jax

    from jaxforget import engine as E

    sets = ("forget", "retain") if method == "dfr" else ("mapped", "prior")
    data = {}
    for name in ("forget", "mapped", sets[1]):
        data[f"{name}_ctx"] = E.encode_texts(model, prompts[name])[0]
    for i, name in enumerate(sets):
        data[f"{name}_z0"] = E.generate_latents(model, unet, _cycle(prompts[name], n), jax.random.fold_in(key, i), dcfg)
    return data


def run_jax_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The jaxforget half of one benchmark cell: load; the request's data build twice (cold: with
    compilation, warm); ``warmup`` + ``steps`` steps of the engine's jitted train step on the shared
    batch (step 0 compiles), each timed. Returns the figures (see ``bench_reference.run_worker``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxforget import engine as E
    from jaxforget import pipeline as PL
    from jaxforget.io.diffusers_folder import load_model_folder
    from jaxforget.methods import base as MB
    from jaxforget.methods import build_method
    from jaxforget.methods import regularizers as REG
    from jaxforget.methods import trainable as TR

    method_name = spec["method"]
    t0 = time.perf_counter()
    # bf16: the UNet computes in bf16, params / optimizer state / losses stay fp32 (the engine's
    # compute_dtype: bfloat16)
    compute_dtype = jnp.bfloat16 if spec.get("dtype", "float32") == "bfloat16" else None
    model = PL.DiffusionModel.from_folder(load_model_folder(spec["model_dir"], compute_dtype=compute_dtype))
    res: dict[str, Any] = {"framework": "jax", "method": method_name, "load_s": time.perf_counter() - t0,
                           "jax_version": jax.__version__, "backend": jax.default_backend(),
                           "device_kind": jax.devices()[0].device_kind, "threads": len(os.sched_getaffinity(0))}
    seed = int(spec.get("seed", 0))
    res["rss_after_load_mb"] = _rss_mb()  # high-water marks after each phase: which one set the peak

    if spec.get("gen", True):
        dcfg = E.DataConfig(num_inference_steps=int(spec["sampler_steps"]), guidance_scale=float(spec["guidance"]),
                            gen_batch_size=int(spec["gen_batch_size"]))
        gen_times = []
        for _ in range(2):  # cold (compiles the sampler and the text encoder), warm
            t1 = time.perf_counter()
            data = jax_request_data(model, model.unet, method_name, spec["prompts"], int(spec["replay_images"]),
                                    dcfg, jax.random.PRNGKey(seed))
            gen_times.append(time.perf_counter() - t1)  # generate_latents returns host numpy: synced
        z = np.concatenate([v.ravel() for k, v in data.items() if k.endswith("_z0")])
        res.update(gen_cold_s=gen_times[0], gen_warm_s=gen_times[1], gen_latent_std=float(z.std()),
                   rss_after_gen_mb=_rss_mb())
        del data

    if spec.get("train", True):
        shared = np.load(spec["batch_npz"])
        graphdef, state = nnx.split(model.unet)
        split = TR.split_trainable(state, TR.Config(filter=TRAINABLE[method_name]))
        unet_fn = MB.UNetFn(graphdef, split.materialize)
        method = build_method(method_name, method_config(method_name), unet_fn, model.schedule)
        frozen = MB.Frozen(rest=split.rest, prev=state, base=None)
        n_steps = int(spec["warmup"]) + int(spec["steps"])
        tx = E.make_optimizer(E.OptimConfig(), n_steps)
        params = jax.tree.map(jnp.copy, split.params)  # donated each step; prev keeps its own buffers
        opt_state = tx.init(params)
        step_fn = E.make_train_step(method, unet_fn, REG.Config(), tx, split.trainable_paths)
        batch = {k: jax.device_put(shared[k]) for k in spec["batch_keys"]}
        key = jax.random.PRNGKey(seed)
        res["n_trainable"] = int(split.count)
        times, metrics = [], []
        for step in range(n_steps):
            t1 = time.perf_counter()
            params, opt_state, met = step_fn(params, opt_state, frozen, batch, jax.random.fold_in(key, step))
            met = {k: float(v) for k, v in met.items()}  # syncs, as the engine's loop reads the loss
            times.append(time.perf_counter() - t1)
            metrics.append(met)
            if step == 0:
                res["rss_after_step0_mb"] = _rss_mb()
        res.update(_step_figures(times, int(spec["warmup"])), losses=[m["loss"] for m in metrics], metrics=metrics)
        res.update(_jax_memory())  # before the profile below
        if spec.get("bare", False):
            del params, opt_state
            res.update(jax_bare_unet_times(model.unet, {k: shared[k] for k in spec["batch_keys"]}, int(spec["steps"])))
    return {**_jax_memory(), **res}


def jax_bare_unet_times(unet: Any, batch: Mapping[str, np.ndarray], reps: int) -> dict[str, float]:
    """Profile: median seconds of one bare jitted UNet forward and one forward + backward (grad
    of mean(ε²) wrt every parameter), as ``bench_reference.bare_unet_times``; compile excluded."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxforget.distributed import runtime_jit

    graphdef, state = nnx.split(unet)
    key = next(k for k in batch if k.endswith("_z0"))
    x = jnp.asarray(batch[key])
    ctx = jnp.asarray(batch[key.replace("_z0", "_ctx")])
    t = jnp.arange(x.shape[0]) * 37 % 1000

    def fwd(s):
        return nnx.merge(graphdef, s)(x, t, ctx).sample

    def loss(s):
        return jnp.mean(jnp.square(fwd(s).astype(jnp.float32)))

    # the train step's and the sampler's XLA options, so the profile matches what they pay
    fns = {"fwd": runtime_jit(fwd), "fwd_bwd": runtime_jit(jax.grad(loss))}
    res = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn(state))  # compile
        times = []
        for _ in range(reps):
            t1 = time.perf_counter()
            jax.block_until_ready(fn(state))
            times.append(time.perf_counter() - t1)
        res[f"bare_{name}_s"] = float(np.median(times))
    return res


def _step_figures(times: list[float], warmup: int) -> dict[str, Any]:
    timed = times[warmup:] or times[-1:]
    med = float(np.median(timed))
    return {"step_times_s": times, "first_step_s": times[0], "step_median_s": med,
            "steps_per_s": 1.0 / med if med > 0 else float("inf")}


# ============================================================================ running cells
@dataclass
class Cell:
    """One (method, model, batch) comparison."""

    method: str
    model: str
    model_dir: str
    batch: int
    spec: dict[str, Any]
    jax: dict[str, Any] = field(default_factory=dict)
    torch: dict[str, Any] = field(default_factory=dict)


def worker_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cuda" if device == "cuda" else "cpu"
    # one real device per framework: drop simulated host devices (the test suite sets 8)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def run_worker(framework: str, spec: Mapping[str, Any], work: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run one framework's half of a cell in a fresh subprocess; returns its figures."""
    tag = f"{framework}-{spec['method']}-{os.getpid()}-{time.time_ns()}"
    spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [_sys.executable, str(Path(__file__).resolve()), "--worker", framework, "--spec", str(spec_path),
           "--out", str(out_path)]
    proc = subprocess.run(cmd, env=worker_env(spec.get("device", "cpu")), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not out_path.exists():
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise RuntimeError(f"{framework} worker failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


def prepare_cell(method: str, model: str, model_dir: Path, work: Path, *, batch: int, steps: int, warmup: int,
                 replay_images: int, sampler_steps: int, guidance: float, device: str, seed: int = 0,
                 gen: bool = True, bare: bool = False, gen_batch_size: int = 64, threads: int | None = None,
                 prompts: Mapping[str, list[str]] | None = None, dtype: str = "float32",
                 peak_flops: float | None = None) -> Cell:
    """Write the shared batch + draws (.npz) and the worker spec of one cell. ``dtype``: the
    UNet's compute dtype in both frameworks (bfloat16: jax compute_dtype, torch autocast; fp32
    params and losses). ``peak_flops``: the FLOP/s MFU is measured against (default: the
    device's published dense bf16 peak, ``planning.device_peak_flops``)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    prompts = dict(prompts or bench_prompts())
    arrays = make_batch(model_dir, batch, prompts, seed)
    keys = BATCH_KEYS[method]
    arrays = {k: arrays[k] for k in keys}
    arrays.update(noise_draws(method, arrays, warmup + steps, seed))
    npz = work / f"batch-{method}-{model}-b{batch}-{time.time_ns()}.npz"
    np.savez(npz, **arrays)
    spec = {"method": method, "model_dir": str(model_dir), "batch_npz": str(npz), "batch_keys": list(keys),
            "steps": steps, "warmup": warmup, "replay_images": replay_images, "sampler_steps": sampler_steps,
            "guidance": guidance, "gen_batch_size": gen_batch_size, "device": device, "seed": seed,
            "prompts": prompts, "gen": gen, "train": True, "bare": bare, "threads": int(threads or os.cpu_count() or 1),
            "dtype": dtype, "peak_flops": peak_flops,
            "model_flops_per_step": model_flops_per_step(method, model_dir, batch, arrays[keys[0]].shape[1])}
    return Cell(method, model, str(model_dir), batch, spec)


def model_flops_per_step(method: str, model_dir: Path, batch: int, seq_len: int) -> float | None:
    """Model FLOPs of one training step (the MFU numerator, same for both frameworks): the
    planner's analytic UNet forward count (``planning.unet_forward_flops``, matmuls and convs)
    times its forwards-per-step (``planning.step_forward_multiplier``: DFR's two student passes
    at 3× a forward, forward + backward, and two teacher forwards; no remat). None for methods
    the planner does not count (DUGE)."""
    from jaxforget import planning as PN

    if method not in PN.METHODS:
        return None
    cfg = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    side = cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0]
    fwd = PN.unet_forward_flops(cfg, batch, side, side, seq_len=seq_len)["total"]
    return PN.step_forward_multiplier(method, "none") * fwd


def run_cell(cell: Cell, work: Path, timeout: float | None = None, log=print) -> Cell:
    for fw in ("jax", "torch"):
        t0 = time.perf_counter()
        setattr(cell, fw, run_worker(fw, cell.spec, work, timeout))
        log(f"  {cell.method} {cell.model} b={cell.batch}: {fw} done in {time.perf_counter() - t0:.0f}s")
    return cell


# ============================================================================ figures
def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def summarize(cell: Cell, request_steps: int) -> dict[str, Any]:
    """The comparison figures of one cell (ratios are jax / torch: < 1 means jaxforget is faster)."""
    j, t = cell.jax, cell.torch
    out: dict[str, Any] = {"method": cell.method, "model": cell.model, "batch": cell.batch,
                           "steps": cell.spec["steps"], "warmup": cell.spec["warmup"]}
    for fw, r in (("jax", j), ("torch", t)):
        for k in ("steps_per_s", "step_median_s", "first_step_s", "peak_rss_mb", "device_peak_mb", "n_trainable",
                  "gen_cold_s", "gen_warm_s", "load_s", "bare_fwd_s", "bare_fwd_bwd_s", "rss_after_load_mb",
                  "rss_after_gen_mb", "rss_after_step0_mb"):
            if k in r:
                out[f"{fw}_{k}"] = r[k]
    out["jax_compile_s"] = j["first_step_s"] - j["step_median_s"]
    out["step_ratio"] = j["step_median_s"] / t["step_median_s"]
    lj, lt = j["losses"], t["losses"]
    out["loss0_jax"], out["loss0_torch"] = lj[0], lt[0]
    out["loss0_rel_diff"] = _rel(lj[0], lt[0])
    out["loss_max_rel_diff"] = max(_rel(a, b) for a, b in zip(lj, lt))
    if "gen_warm_s" in j and "gen_warm_s" in t:
        n = int(request_steps)
        out["request_steps"] = n
        out["jax_gen_compile_s"] = j["gen_cold_s"] - j["gen_warm_s"]
        out["gen_ratio"] = j["gen_warm_s"] / t["gen_warm_s"]
        for fw, r in (("jax", j), ("torch", t)):
            out[f"{fw}_request_warm_s"] = r["gen_warm_s"] + n * r["step_median_s"]
            out[f"{fw}_request_cold_s"] = r["gen_cold_s"] + r["first_step_s"] + (n - 1) * r["step_median_s"]
        out["request_ratio_warm"] = out["jax_request_warm_s"] / out["torch_request_warm_s"]
        out["request_ratio_cold"] = out["jax_request_cold_s"] / out["torch_request_cold_s"]
    out.update(mfu_figures(cell))
    if "bare_fwd_s" in j and "bare_fwd_s" in t:
        out["bare_fwd_ratio"] = j["bare_fwd_s"] / t["bare_fwd_s"]
        out["bare_fwd_bwd_ratio"] = j["bare_fwd_bwd_s"] / t["bare_fwd_bwd_s"]
    return out


# the paired ratios whose spread over repeats the notes print
REPEAT_RATIOS = ("step_ratio", "request_ratio_warm", "gen_ratio")


def combine_repeats(sums: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One cell's summary over R repeats (``--repeats``): each float figure is its median over
    the repeats, a ratio the median of the per-repeat ratios (each from one jax run and the
    torch run right after it); the per-repeat ratios are kept as ``<ratio>s`` lists. Other
    values (names, counts) are the first repeat's."""
    out = dict(sums[0])
    if len(sums) == 1:
        return out
    for k, v in sums[0].items():
        if isinstance(v, float) and all(isinstance(s.get(k), float) for s in sums):
            out[k] = float(np.median([s[k] for s in sums]))
    out["repeats"] = len(sums)
    for k in REPEAT_RATIOS:
        if all(k in s for s in sums):
            out[f"{k}s"] = [s[k] for s in sums]
    return out


def mfu_figures(cell: Cell) -> dict[str, Any]:
    """Model-FLOPs utilization of each framework's median step: model FLOPs per step / (step
    seconds × peak FLOP/s). The peak is ``--peak-tflops`` or the framework's device's published
    dense bf16 peak; none (no MFU) on a device without a listed peak, e.g. a CPU."""
    flops = cell.spec.get("model_flops_per_step")
    if not flops:
        return {}
    out: dict[str, Any] = {"model_flops_per_step": flops}
    from jaxforget.planning import device_peak_flops

    for fw, r in (("jax", cell.jax), ("torch", cell.torch)):
        peak = cell.spec.get("peak_flops") or device_peak_flops(r.get("device_kind", ""))
        out[f"{fw}_tflops_per_s"] = flops / r["step_median_s"] / 1e12
        if peak:
            out[f"{fw}_peak_flops"] = peak
            out[f"{fw}_mfu"] = flops / (r["step_median_s"] * peak)
    return out


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width table (readable in a log file)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [list(headers)] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    head = ["method", "model", "batch", "jax steps/s", "torch steps/s", "step ratio", "jax compile s",
            "jax peak MB", "torch peak MB", "gen jax s", "gen torch s", "req jax s", "req torch s",
            "req ratio warm", "req ratio cold", "jax MFU", "torch MFU", "loss0 rel diff"]
    rows = []
    for s in summaries:
        mem = "device_peak_mb" if "jax_device_peak_mb" in s else "peak_rss_mb"
        rows.append([s["method"], s["model"], s["batch"], s["jax_steps_per_s"], s["torch_steps_per_s"],
                     s["step_ratio"], s["jax_compile_s"], s[f"jax_{mem}"], s[f"torch_{mem}"],
                     s.get("jax_gen_warm_s", "-"), s.get("torch_gen_warm_s", "-"),
                     s.get("jax_request_warm_s", "-"), s.get("torch_request_warm_s", "-"),
                     s.get("request_ratio_warm", "-"), s.get("request_ratio_cold", "-"), s.get("jax_mfu", "-"),
                     s.get("torch_mfu", "-"), s["loss0_rel_diff"]])
    return format_table(head, rows)


def scaling_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    head = ["method", "model", "width", "params", "batch", "jax ms/step", "torch ms/step", "step ratio",
            "jax compile s", "jax peak MB", "torch peak MB"]
    rows = [[s["method"], s["model"], s["width"], s["params"], s["batch"], 1000 * s["jax_step_median_s"],
             1000 * s["torch_step_median_s"], s["step_ratio"], s["jax_compile_s"], s["jax_peak_rss_mb"],
             s["torch_peak_rss_mb"]] for s in summaries]
    return format_table(head, rows)


def _unet_param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted((Path(model_dir) / "unet").glob("*.safetensors")):
        with safe_open(str(f), "np") as fh:
            for k in fh.keys():
                n += int(np.prod(fh.get_slice(k).get_shape()))
    return n


# ============================================================================ entry point
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="toyworld")
    ap.add_argument("--model-dir", default=None, help="an explicit diffusers folder (overrides --model)")
    ap.add_argument("--method", choices=(*METHODS, "all"), default="all")
    ap.add_argument("--batch", type=int, default=8, help="examples per set in a training batch")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (jax: the first compiles)")
    ap.add_argument("--replay-images", type=int, default=32, help="teacher images per generated set")
    ap.add_argument("--sampler-steps", type=int, default=30, help="DDIM steps of the teacher sampler")
    ap.add_argument("--guidance", type=float, default=1.0, help="sampler guidance (DFR's reference: 1.0)")
    ap.add_argument("--request-steps", type=int, default=200, help="N of the whole-request figure (engine default)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="UNet compute dtype in both (bfloat16: jax compute_dtype / torch autocast; fp32 params)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="image side in pixels for small-sd / sd15 (latent = resolution / 8; default 128 / 512)")
    ap.add_argument("--width", type=float, default=1.0, help="width multiplier of the model's channels (main table)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s for MFU (default: the device's published dense bf16 peak; none on CPU)")
    ap.add_argument("--no-gen", action="store_true", help="skip the teacher data build (step figures only)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="CPU threads per framework (default: all; fewer pins each worker to that many cores)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each main-table cell R times, jax and torch alternating; figures are medians over "
                         "the repeats (drift on a shared host moves both frameworks' runs alike)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bare", action="store_true", help="profile: also time a bare UNet fwd and fwd+bwd in both")
    ap.add_argument("--scaling", action="store_true", help="add a table over batch sizes and widths")
    ap.add_argument("--scaling-batches", default="2,8,32")
    ap.add_argument("--scaling-widths", default="1,2", help="width multipliers of the model's block channels")
    ap.add_argument("--scaling-steps", type=int, default=5)
    ap.add_argument("--scaling-only", action="store_true", help="skip the main table")
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "jaxforget-bench"),
                    help="where generated model folders are cached")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    ap.add_argument("--timeout", type=float, default=None, help="per-worker timeout (s)")
    # internal: one framework's half of a cell, in its own process
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.resolution is not None:
        if args.model == "toyworld" or args.model_dir:
            ap.error("--resolution: only for the generated models (small-sd, sd15); this model has a fixed size")
        from jaxforget.errors import ConfigError

        try:
            latent_side(args.resolution)
        except ConfigError as err:
            ap.error(str(err))
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        ap.error(f"--peak-tflops: must be > 0, got {args.peak_tflops}")
    if args.width <= 0:
        ap.error(f"--width: must be > 0, got {args.width}")
    if args.repeats < 1:
        ap.error(f"--repeats: must be >= 1, got {args.repeats}")
    return args


def pin_threads(n: int) -> None:
    """Confine this process to ``n`` of its CPUs (before jax / torch start their thread pools), so
    both frameworks get the same cores; torch additionally gets set_num_threads(n)."""
    cpus = sorted(os.sched_getaffinity(0))
    if 0 < n < len(cpus):
        os.sched_setaffinity(0, set(cpus[:n]))


def worker_main(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    pin_threads(int(spec.get("threads") or 0))
    if args.worker == "jax":
        res = run_jax_worker(spec)
    else:
        import bench_reference

        res = bench_reference.run_worker(spec)
    Path(args.out).write_text(json.dumps(res))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return {}
    # this process only builds folders and batches: keep its jax (if it starts one here) off the
    # accelerator, whose memory belongs to the workers (each sets its own JAX_PLATFORMS)
    os.environ["JAX_PLATFORMS"] = "cpu"
    methods = list(METHODS) if args.method == "all" else [args.method]
    work_root = Path(args.work_dir)
    work_root.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"argv": list(argv) if argv is not None else _sys.argv[1:], "cpu_count": os.cpu_count(),
                              "device": args.device, "results": [], "scaling": []}
    model_name = "custom" if args.model_dir else args.model
    with tempfile.TemporaryDirectory(prefix="bench-", dir=work_root) as tmp:
        work = Path(tmp)
        model_dir = resolve_model(args.model, work_root, width=args.width, model_dir=args.model_dir,
                                  resolution=args.resolution)
        prompts = bench_prompts()
        common = dict(replay_images=args.replay_images, sampler_steps=args.sampler_steps, guidance=args.guidance,
                      device=args.device, seed=args.seed, prompts=prompts, threads=args.threads, dtype=args.dtype,
                      peak_flops=None if args.peak_tflops is None else args.peak_tflops * 1e12)
        if not args.scaling_only:
            print(f"model {model_name} ({model_dir}, {_unet_param_count(model_dir):,} UNet params), "
                  f"batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps, "
                  f"{args.replay_images} replay images x {args.sampler_steps} DDIM steps, device {args.device}, "
                  f"{args.threads} CPU threads per framework (of {os.cpu_count()}), compute {args.dtype}", flush=True)
            for m in methods:
                cell = prepare_cell(m, model_name, model_dir, work, batch=args.batch, steps=args.steps,
                                    warmup=args.warmup, bare=args.bare, gen=not args.no_gen, **common)
                runs = []
                for _ in range(args.repeats):  # jax, torch, jax, torch, ...: neighbours in time are paired
                    run_cell(cell, work, args.timeout)
                    runs.append({"summary": summarize(cell, args.request_steps), "jax": cell.jax, "torch": cell.torch})
                result = {"summary": combine_repeats([r["summary"] for r in runs]),
                          "jax": runs[0]["jax"], "torch": runs[0]["torch"]}
                if len(runs) > 1:
                    result["repeats"] = runs
                report["results"].append(result)
            sums = [r["summary"] for r in report["results"]]
            print("\n" + main_table(sums))
            print(_notes(sums, args))
        if args.scaling:
            for wf in [float(w) for w in args.scaling_widths.split(",")]:
                # widths scale --model's architecture (an explicit --model-dir is used at width 1 only)
                mdir = resolve_model(args.model, work_root, width=wf, model_dir=args.model_dir if wf == 1.0 else None,
                                     resolution=args.resolution)
                name = model_name if wf == 1.0 else args.model
                n_params = _unet_param_count(mdir)
                for b in [int(x) for x in args.scaling_batches.split(",")]:
                    for m in methods:
                        cell = prepare_cell(m, name, mdir, work, batch=b, steps=args.scaling_steps, warmup=2,
                                            gen=False, **common)
                        run_cell(cell, work, args.timeout)
                        s = summarize(cell, args.request_steps) | {"width": wf, "params": n_params}
                        report["scaling"].append({"summary": s, "jax": cell.jax, "torch": cell.torch})
            print("\nscaling (step time and peak memory vs batch and width; no data generation)")
            print(scaling_table([r["summary"] for r in report["scaling"]]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def _notes(sums: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> str:
    lines = ["",
             "ratios are jaxforget / PyTorch (< 1: jaxforget faster); targets: step <= 0.67, whole request <= 0.5 (CPU); "
             "DFR MFU >= 40 % (GPU: SD 1.5 at 512², bf16)",
             f"req = teacher data build + {args.request_steps} steps; warm = compiled programs reused, "
             "cold = fresh process (jax compile included)"]
    for s in sums:
        gen = (f" + {s['jax_gen_compile_s']:.1f}s (sampler); gen ratio {s['gen_ratio']:.2f}" if "gen_ratio" in s
               else " (no data build: --no-gen)")
        lines.append(
            f"{s['method']}: step {1000 * s['jax_step_median_s']:.1f} ms (jax) vs {1000 * s['torch_step_median_s']:.1f} ms "
            f"(torch); jax compile {s['jax_compile_s']:.1f}s (step){gen}; trainable {s['jax_n_trainable']:,} / "
            f"{s['torch_n_trainable']:,}; loss@0 {s['loss0_jax']:.6g} / {s['loss0_torch']:.6g} "
            f"(max rel diff over all steps {s['loss_max_rel_diff']:.1e})")
        if s.get("repeats", 1) > 1:
            spread = "; ".join(f"{k.replace('_', ' ')} " + ", ".join(f"{x:.3f}" for x in s[f"{k}s"])
                               for k in REPEAT_RATIOS if f"{k}s" in s)
            lines.append(f"   medians over {s['repeats']} repeats (jax, torch alternating); per repeat: {spread}")
        phases = [(name, k) for name, k in (("load", "rss_after_load_mb"), ("gen", "rss_after_gen_mb"),
                                            ("step 0", "rss_after_step0_mb"), ("end", "peak_rss_mb"))
                  if f"jax_{k}" in s and f"torch_{k}" in s]
        rss = {fw: "/".join(f"{s[f'{fw}_{k}']:.0f}" for _, k in phases) for fw in ("jax", "torch")}
        lines.append(f"   peak RSS MB after {'/'.join(n for n, _ in phases)}: jax {rss['jax']}, torch {rss['torch']}")
        if "model_flops_per_step" in s:
            mfu = {fw: (f"{100 * s[f'{fw}_mfu']:.1f} % of {s[f'{fw}_peak_flops'] / 1e12:.4g} TFLOP/s"
                        if f"{fw}_mfu" in s else "no peak for this device") for fw in ("jax", "torch")}
            lines.append(f"   model FLOPs/step {s['model_flops_per_step'] / 1e12:.4g} T (analytic, planning.py): "
                         f"jax {s['jax_tflops_per_s']:.3g} TFLOP/s, MFU {mfu['jax']}; "
                         f"torch {s['torch_tflops_per_s']:.3g} TFLOP/s, MFU {mfu['torch']}")
        if "bare_fwd_ratio" in s:
            lines.append(
                f"   bare UNet: fwd {1000 * s['jax_bare_fwd_s']:.1f} / {1000 * s['torch_bare_fwd_s']:.1f} ms "
                f"(ratio {s['bare_fwd_ratio']:.2f}), fwd+bwd {1000 * s['jax_bare_fwd_bwd_s']:.1f} / "
                f"{1000 * s['torch_bare_fwd_bwd_s']:.1f} ms (ratio {s['bare_fwd_bwd_ratio']:.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
